"""convert.py: Meta's shards and HF directories in, this project's format out, and back to HF.

The checkpoints are built here from a random state dict, by the rules of the issue written out
independently of convert.py: Meta's model-parallel split and HF's names and q/k row permutation.
"""

import io
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch

import checkpoint
import convert
import data
from model import ModelArgs, Transformer, apply_rotary_emb, precompute_freqs_cis

ROOT = Path(__file__).resolve().parents[1]
# Small, but with every part of a real checkpoint: 8 query heads over MP up to 4, and GQA.
SHAPE = dict(dim=64, n_layers=2, n_heads=8, multiple_of=32, norm_eps=1e-5, max_seq_len=64)
N_PIECES = 64  # the test tokenizer's sentencepiece size

# Meta's split over model-parallel shards, by role (fairscale's Parallel* layers); norms are copied.
META_SPLIT = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}
HF_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
            "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}


def hf_key(key: str) -> str:
    name = key.removesuffix(".weight")
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"model.layers.{i}.{HF_NAMES[rest]}.weight"
    return f"{HF_NAMES[name]}.weight"


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF for wq and wk, as HF's own conversion script writes it."""
    dim_out, dim = w.shape
    return w.view(n_heads, dim_out // n_heads // 2, 2, dim).transpose(1, 2).reshape(dim_out, dim)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    """A real sentencepiece model with N_PIECES pieces (<unk>, <s>, </s> at 0, 1, 2, as Meta's)."""
    rng = random.Random(0)
    words = "the a of tea cup water hot leaf green black milk sugar pour steep boil kettle how do i".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto,
                                             vocab_size=N_PIECES, model_type="bpe", minloglevel=2)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(proto.getvalue())
    return path


def make_args(n_kv_heads=4, vocab_size=N_PIECES) -> ModelArgs:
    return ModelArgs(**SHAPE, n_kv_heads=n_kv_heads, vocab_size=vocab_size)


def random_weights(args: ModelArgs, dtype=torch.bfloat16, seed=0) -> dict[str, torch.Tensor]:
    """Every weight random, norms included (so that a norm taken from the wrong place shows)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        shapes = Transformer(args).state_dict()
    return {k: torch.randn(v.shape).to(dtype) for k, v in shapes.items()}


def write_meta(weights: dict, args: ModelArgs, mp: int, root: Path, tokenizer: Path) -> Path:
    """Meta's release layout: root/tokenizer.model, root/model/{consolidated.NN.pth, params.json}."""
    src = root / "model"
    src.mkdir(parents=True)
    for i in range(mp):
        shard = {}
        for k, w in weights.items():
            role = k.split(".")[-2]
            # clone: torch.save writes a view's whole storage
            shard[k] = w.chunk(mp, dim=META_SPLIT[role])[i].clone() if role in META_SPLIT else w.clone()
        # Meta saves its RoPE frequencies too, the same in every shard
        shard["rope.freqs"] = 1.0 / 10000.0 ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim)
        torch.save(shard, src / f"consolidated.{i:02d}.pth")
    params = dict(dim=args.dim, multiple_of=args.multiple_of, n_heads=args.n_heads, n_layers=args.n_layers,
                  norm_eps=args.norm_eps, vocab_size=-1)
    if args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads  # as llama2-70b's params.json
    (src / "params.json").write_text(json.dumps(params))
    (root / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return src


def write_hf(weights: dict, args: ModelArgs, src: Path, tokenizer: Path, fmt: str) -> Path:
    """HF's layout: config.json, tokenizer.model, permuted q/k, one file or shards with an index."""
    src.mkdir(parents=True)
    hf = {}
    for k, w in weights.items():
        if k.endswith("wq.weight"):
            w = hf_permute(w, args.n_heads)
        elif k.endswith("wk.weight"):
            w = hf_permute(w, args.n_kv_heads)
        hf[hf_key(k)] = w.contiguous()
    if fmt.startswith("bin"):  # older conversions saved HF's RoPE table too
        hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(args.head_dim // 2)
    single, suffix = {"safetensors": ("model.safetensors", ".safetensors"),
                      "bin": ("pytorch_model.bin", ".bin")}[fmt.removesuffix("-sharded")]
    if fmt.endswith("-sharded"):
        halves = [dict(list(hf.items())[:len(hf) // 2]), dict(list(hf.items())[len(hf) // 2:])]
        names = [f"{single.removesuffix(suffix)}-0000{i + 1}-of-00002{suffix}" for i in range(2)]
        weight_map = {k: name for name, half in zip(names, halves) for k in half}
        (src / f"{single}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        parts = list(zip(names, halves))
    else:
        parts = [(single, hf)]
    for name, part in parts:
        if suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(part, src / name, metadata={"format": "pt"})
        else:
            torch.save(part, src / name)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=args.dim,
                  intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                  num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
                  vocab_size=args.vocab_size, max_position_embeddings=args.max_seq_len,
                  rms_norm_eps=args.norm_eps, rope_theta=10000.0, rope_scaling=None)
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return src


def write_converted(weights: dict, args: ModelArgs, dst: Path, tokenizer: Path) -> Path:
    """This project's format, as a fine-tuned model exported by checkpoint.py is."""
    dst.mkdir()
    torch.save(weights, dst / "model.pth")
    params = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                            "multiple_of", "norm_eps", "max_seq_len")}
    (dst / "params.json").write_text(json.dumps(params))
    (dst / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return dst


def assert_same_weights(dst: Path, weights: dict):
    loaded = torch.load(dst / "model.pth", mmap=True, weights_only=True)
    assert loaded.keys() == weights.keys()
    for k, w in weights.items():
        assert loaded[k].dtype == w.dtype and torch.equal(loaded[k], w), k
    # Written tensor by tensor, the file is still byte for byte torch.save's, checksums and all.
    (dst.parent / "saved-by-torch").mkdir()
    torch.save({k: weights[k] for k in loaded}, dst.parent / "saved-by-torch/model.pth")
    assert (dst / "model.pth").read_bytes() == (dst.parent / "saved-by-torch/model.pth").read_bytes()


def assert_same_logits(dst: Path, weights: dict, args: ModelArgs):
    """A model loaded from dst computes what one holding the weights does (both in float32)."""
    reference = Transformer(args).eval()
    reference.load_state_dict(weights)  # into float32 parameters: exact
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loaded, _ = checkpoint.load_model(dst, dtype=torch.float32)  # a base model: LIMA's EOT row added, last
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[..., :args.vocab_size], reference(tokens))


def fails(argv, capsys) -> str:
    """Run the CLI in-process; it must exit 2 with one line, 'error: ...'; return that line."""
    with pytest.raises(SystemExit) as e:
        convert.main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ---- Meta's shards ----

@pytest.mark.parametrize("mp", [1, 2, 4])
@pytest.mark.parametrize("n_kv_heads", [8, 4], ids=["mha", "gqa"])
def test_meta_shards_give_back_the_weights_and_logits(tmp_path, tokenizer, mp, n_kv_heads):
    args = make_args(n_kv_heads)
    weights = random_weights(args)
    src = write_meta(weights, args, mp, tmp_path / "llama", tokenizer)
    convert.main([str(src), str(tmp_path / "out")])
    dst = tmp_path / "out"
    assert sorted(p.name for p in dst.iterdir()) == ["model.pth", "params.json", "tokenizer.model"]
    assert_same_weights(dst, weights)  # rope.freqs dropped, bf16 kept
    params = json.loads((dst / "params.json").read_text())
    assert params["vocab_size"] == N_PIECES and params["n_kv_heads"] == n_kv_heads
    assert params["max_seq_len"] == 2048  # LLaMA-1's context: Meta's params.json does not say
    assert (dst / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    assert_same_logits(dst, weights, args)


def test_dtype_cast_on_the_way(tmp_path, tokenizer):
    args = make_args()
    weights = random_weights(args)
    src = write_meta(weights, args, 2, tmp_path / "llama", tokenizer)
    convert.main([str(src), str(tmp_path / "out"), "--dtype", "fp32"])
    assert_same_weights(tmp_path / "out", {k: w.float() for k, w in weights.items()})


# ---- Hugging Face in ----

@pytest.mark.parametrize("fmt", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
def test_hf_gives_back_the_weights_and_logits(tmp_path, tokenizer, fmt):
    args = make_args()
    weights = random_weights(args)
    src = write_hf(weights, args, tmp_path / "hf", tokenizer, fmt)
    convert.main([str(src), str(tmp_path / "out")])
    assert_same_weights(tmp_path / "out", weights)
    assert_same_logits(tmp_path / "out", weights, args)


def test_hf_permutation_makes_rotate_half_rope_equal_to_meta_pairs():
    """Attention scores from HF's weights with HF's RoPE equal Meta's with Meta's: the permutation
    in write_hf (and so the inverse convert.py applies) is the right one."""
    torch.manual_seed(0)
    T, D, H, hd = 5, 32, 4, 8
    x, wq, wk = torch.randn(1, T, D), torch.randn(H * hd, D), torch.randn(H * hd, D)
    freqs = precompute_freqs_cis(hd, T, 10000.0)
    q = apply_rotary_emb((x @ wq.T).view(1, T, H, hd), freqs)  # Meta: adjacent pairs
    k = apply_rotary_emb((x @ wk.T).view(1, T, H, hd), freqs)

    def rotate_half_rope(t):  # HF's apply_rotary_pos_emb: pair i is (t[i], t[i + hd/2])
        cos = torch.cat([freqs[..., 0]] * 2, dim=-1)[:, None]  # (T, 1, hd)
        sin = torch.cat([freqs[..., 1]] * 2, dim=-1)[:, None]
        half1, half2 = t[..., :hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-half2, half1], dim=-1) * sin

    q_hf = rotate_half_rope((x @ hf_permute(wq, H).T).view(1, T, H, hd))
    k_hf = rotate_half_rope((x @ hf_permute(wk, H).T).view(1, T, H, hd))
    scores = torch.einsum("bthd,bshd->bhts", q, k)
    scores_hf = torch.einsum("bthd,bshd->bhts", q_hf, k_hf)
    torch.testing.assert_close(scores_hf, scores)
    # and convert.py's own pair of permutations are inverses
    assert torch.equal(convert.permute_from_hf(convert.permute_to_hf(wq, H), H), wq)


# ---- Hugging Face out ----

# tokenizer.json is written only for LLaMA's kind of sentencepiece model (convert.check_exportable),
# which the 64-piece test tokenizer is not (it normalizes, and has no byte fallback): the export
# tests use the project's own, and Meta's where this machine has it (its licence keeps it out of
# the repository).
DEMO_TOKENIZER = ROOT / "data" / "tokenizer.model"  # BPE, 1,024 pieces, byte fallback, as Meta's
DEMO_PIECES = 1024
META_TOKENIZER = Path("/work/shared/tokenizers/llama/tokenizer.model")  # 32,000 pieces

# Texts on which HF's own Llama tokenizers have given other ids than sentencepiece's, or could:
# spaces that lead or run, indentation, the special tokens' names written as text (sentencepiece
# reads them as text), characters outside the vocabulary (byte pieces), digits, nothing at all.
DRIFT_CASES = [" hello", "a  b   c", "def f():\n    return 1\n\tx", "<s>", "</s>", "<unk>", "<EOT>",
               "x<s>y</s>z", "hot tea<EOT>", "naïve café, Ωμέγα, 日本語 🙂 𝄞 \U0001fae0", "1234567 + 3.14159",
               "", "\n", "a\n\nb\n", " ", "   ", "  both ends  ", "tab\tand\r\nCRLF"]
# Meta's whitespace pieces ("▁▁" ... 16 of them) all score -1e9: sentencepiece merges such ties by
# position, a merge list by rank (convert.bpe_merges).
SPACE_RUNS = [f"a{' ' * k}b" for k in range(1, 41)] + [" " * k for k in range(1, 41)] + \
             [f"x\n{' ' * k}y" for k in range(1, 41)]


def varied_texts(count: int = 300, seed: int = 0) -> list[str]:
    """Real text (slices of the demo's texts and conversations, data/demo/*.jsonl) and random strings:
    ASCII, runs of spaces, tabs and newlines, digits, and characters from anywhere in Unicode, seeded."""
    rng = random.Random(seed)
    records = [json.loads(line) for path in sorted((ROOT / "data" / "demo").glob("*.jsonl"))
               for line in path.read_text().splitlines()]
    turns = [turn for r in records for turn in r.get("conversations", [r.get("text")])]
    texts = []
    for _ in range(count // 2):
        turn = rng.choice(turns)
        start = rng.randrange(len(turn))
        texts.append(turn[start:start + rng.randrange(1, 160)])
    ascii_ = "abcdefghijklmnopqrstuvwxyz ABC XYZ 0123456789 .,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|"
    for _ in range(count - count // 2):
        chars = []
        for _ in range(rng.randrange(1, 40)):
            kind = rng.random()
            if kind < 0.6:
                chars.append(rng.choice(ascii_))
            elif kind < 0.8:
                chars.append(rng.choice([" ", "  ", "    ", "\t", "\n", "\n\n", "\r"]))
            else:  # any code point past ASCII but a surrogate, which UTF-8 cannot hold
                code = rng.randrange(0x80, 0x30000 - 0x800)
                chars.append(chr(code + 0x800 if code >= 0xD800 else code))
        texts.append("".join(chars))
    return texts


@pytest.fixture(scope="module", params=["demo", "meta"])
def llama_tokenizer(request) -> Path:
    """The project's tokenizer, then Meta's (skipped where this machine does not have it)."""
    if request.param == "meta" and not META_TOKENIZER.is_file():
        pytest.skip(f"{META_TOKENIZER}: not on this machine")
    return DEMO_TOKENIZER if request.param == "demo" else META_TOKENIZER


@pytest.fixture(scope="module")
def exported(llama_tokenizer, tmp_path_factory) -> Path:
    """A small fine-tuned model (with EOT) on llama_tokenizer, exported by convert.py --to_hf."""
    n = sentencepiece.SentencePieceProcessor(model_file=str(llama_tokenizer)).get_piece_size()
    args = make_args(vocab_size=n + 1)
    root = tmp_path_factory.mktemp("export")
    src = write_converted(random_weights(args, dtype=torch.float32), args, root / "lima", llama_tokenizer)
    convert.to_hf(src, root / "hf")
    return root / "hf"


@pytest.mark.parametrize("eot", [True, False], ids=["fine-tuned", "base"])
def test_to_hf_then_back_is_the_identity(tmp_path, eot):
    args = make_args(vocab_size=DEMO_PIECES + eot)
    weights = random_weights(args)
    src = write_converted(weights, args, tmp_path / "lima", DEMO_TOKENIZER)
    # Files of ~40 KB, so that HF's index of several files is exercised.
    convert.to_hf(src, tmp_path / "hf", max_file_bytes=40_000)
    hf = tmp_path / "hf"
    assert (hf / "model.safetensors.index.json").is_file() and len(list(hf.glob("*.safetensors"))) > 2
    convert.main([str(hf), str(tmp_path / "back")])
    assert_same_weights(tmp_path / "back", weights)
    back = ModelArgs.from_params(tmp_path / "back" / "params.json")
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "norm_eps",
                  "rope_theta", "max_seq_len"):
        assert getattr(back, field) == getattr(args, field), field

    config = json.loads((hf / "config.json").read_text())
    tok_config = json.loads((hf / "tokenizer_config.json").read_text())
    generation = json.loads((hf / "generation_config.json").read_text())
    added = [(t["id"], t["content"]) for t in json.loads((hf / "tokenizer.json").read_text())["added_tokens"]]
    if eot:  # EOT is an added special token with id = the number of pieces, and generation stops at it
        assert tok_config["added_tokens_decoder"][str(DEMO_PIECES)]["content"] == "<EOT>"
        assert tok_config["added_tokens_decoder"][str(DEMO_PIECES)]["special"]
        assert tok_config["eos_token"] == "<EOT>" and config["eos_token_id"] == DEMO_PIECES
        assert generation["eos_token_id"] == [DEMO_PIECES, 2]
        assert added == [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (DEMO_PIECES, "<EOT>")]
    else:
        assert str(DEMO_PIECES) not in tok_config["added_tokens_decoder"]
        assert tok_config["eos_token"] == "</s>" and generation["eos_token_id"] == 2
        assert added == [(0, "<unk>"), (1, "<s>"), (2, "</s>")]


def test_tokenizer_json_holds_sentencepiece_pieces_and_merges(llama_tokenizer):
    """Checked against SentencePieceProcessor, not the model file convert.py reads: the vocabulary
    is sentencepiece's ids, every merge makes a normal piece of two normal ones, best score first,
    and every normal piece longer than one character can be made; EOT comes after the pieces."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama_tokenizer))
    n = sp.get_piece_size()
    tokens = convert.hf_tokenizer(llama_tokenizer, n + 1, 2048)[0]["tokenizer.json"]
    assert tokens["model"]["vocab"] == {sp.id_to_piece(i): i for i in range(n)}
    assert [(t["id"], t["content"], t["special"]) for t in tokens["added_tokens"]] == \
        [(sp.unk_id(), "<unk>", True), (sp.bos_id(), "<s>", True), (sp.eos_id(), "</s>", True), (n, "<EOT>", True)]
    normal = {sp.id_to_piece(i) for i in range(n)
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    merges = [tuple(m) for m in tokens["model"]["merges"]]
    assert len(set(merges)) == len(merges)
    assert all(left in normal and right in normal and left + right in normal for left, right in merges)
    scores = [sp.get_score(sp.piece_to_id(left + right)) for left, right in merges]
    assert scores == sorted(scores, reverse=True)
    assert {left + right for left, right in merges} == {p for p in normal if len(p) > 1}


def replay_bpe(tokens: dict, text: str) -> list[int]:
    """tokenizer.json applied by hand, as the tokenizers library applies it, special tokens read as
    text: sentencepiece's normalization ("▁" before the text, every space a "▁"), the characters
    merged pair by pair (the pair first in the merges; the leftmost of those), BOS before, and a
    piece not in the vocabulary (a character it lacks) as the byte pieces of its UTF-8."""
    vocab = tokens["model"]["vocab"]
    rank = {tuple(pair): r for r, pair in enumerate(tokens["model"]["merges"])}
    symbols = list("▁" + text.replace(" ", "▁")) if text else []
    while len(symbols) > 1:
        best, i = min((rank.get(pair, math.inf), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if best == math.inf:
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [vocab["<s>"]] + [i for s in symbols
                             for i in ([vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode()])]


def test_tokenizer_json_gives_sentencepiece_ids_without_hf_libraries(llama_tokenizer):
    """Needs neither tokenizers nor transformers: the merges, replayed, give sentencepiece's ids."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama_tokenizer))
    tokens = convert.hf_tokenizer(llama_tokenizer, sp.get_piece_size() + 1, 2048)[0]["tokenizer.json"]
    for text in DRIFT_CASES + SPACE_RUNS + varied_texts(100, seed=1):
        assert replay_bpe(tokens, text) == [sp.bos_id()] + sp.encode(text), repr(text)


def hf_codec(hf: Path, library: str):
    """(encode, decode) through tokenizers' Tokenizer.from_file or transformers' AutoTokenizer.

    tokenizers reads the special tokens' names in a text as the special tokens unless
    encode_special_tokens is set, which tokenizer.json cannot hold: tokenizer_config.json's
    split_special_tokens sets it for transformers, and here it is set by hand."""
    if library == "tokenizers":
        tokenizers = pytest.importorskip("tokenizers")
        tok = tokenizers.Tokenizer.from_file(str(hf / "tokenizer.json"))
        tok.encode_special_tokens = True
        return (lambda text: tok.encode(text).ids), (lambda ids: tok.decode(ids, skip_special_tokens=True))
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    return (lambda text: tok(text)["input_ids"]), (lambda ids: tok.decode(ids, skip_special_tokens=True))


@pytest.mark.parametrize("library", ["tokenizers", "transformers"])
def test_hf_tokenizer_gives_sentencepiece_ids(exported, llama_tokenizer, library):
    """sentencepiece's ids (and BOS) for the texts where HF's Llama tokenizers drift and for a few
    hundred others; decoding (skip_special_tokens) gives sentencepiece's text, so the text back."""
    encode, decode = hf_codec(exported, library)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama_tokenizer))
    for text in DRIFT_CASES + SPACE_RUNS + varied_texts():
        ids = [sp.bos_id()] + sp.encode(text)
        assert encode(text) == ids, repr(text)
        assert decode(ids) == sp.decode(ids), repr(text)
    for text in DRIFT_CASES + SPACE_RUNS:
        assert decode(encode(text)) == text, repr(text)


def test_to_hf_refuses_a_tokenizer_it_cannot_reproduce(tmp_path, tokenizer, capsys):
    """The 64-piece test tokenizer normalizes (nmt_nfkc, sentencepiece's default) and has no byte
    fallback; a unigram model is not BPE: one line each, naming the file, and nothing written."""
    args = make_args(vocab_size=N_PIECES)
    src = write_converted(random_weights(args), args, tmp_path / "lima", tokenizer)
    err = fails(["--to_hf", src, tmp_path / "hf"], capsys)
    assert f"{src / 'tokenizer.model'}: normalization rules (nmt_nfkc), remove_extra_whitespaces, " \
           f"no byte fallback: tokenizer.json would not give sentencepiece's ids" in err
    unigram = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter((ROOT / "data" / "demo" / "train.jsonl").read_text().splitlines()),
        model_writer=unigram, model_type="unigram", vocab_size=400, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    (src / "tokenizer.model").write_bytes(unigram.getvalue())
    args = make_args(vocab_size=400)
    write_converted(random_weights(args), args, tmp_path / "unigram", src / "tokenizer.model")
    err = fails(["--to_hf", tmp_path / "unigram", tmp_path / "hf"], capsys)
    assert "tokenizer.model: a unigram model: tokenizer.json would not give" in err
    assert not (tmp_path / "hf").exists()


def test_to_hf_refuses_a_vocabulary_that_does_not_fit_the_tokenizer(tmp_path, tokenizer, capsys):
    args = make_args(vocab_size=N_PIECES + 8)
    src = write_converted(random_weights(args), args, tmp_path / "lima", tokenizer)
    err = fails(["--to_hf", src, tmp_path / "hf"], capsys)
    assert "64 pieces, but the model has 72 embedding rows" in err and not (tmp_path / "hf").exists()


def test_to_hf_with_transformers(tmp_path):
    """If transformers is installed: it loads the export and computes our logits; it knows EOT;
    it reads tokenizer.json as written (no conversion of tokenizer.model)."""
    transformers = pytest.importorskip("transformers")
    args = make_args(vocab_size=DEMO_PIECES + 1)
    weights = random_weights(args, dtype=torch.float32)
    src = write_converted(weights, args, tmp_path / "lima", DEMO_TOKENIZER)
    convert.to_hf(src, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _ = checkpoint.load_model(src)
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, ours(tokens), atol=1e-4, rtol=1e-4)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    loaded = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    for part in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "model"):
        assert loaded[part] == written[part], part
    assert hf_tokenizer.convert_tokens_to_ids("<EOT>") == DEMO_PIECES == hf_tokenizer.eos_token_id
    # "<EOT>" in a text is text, as for sentencepiece; read as the special token on request, it is
    # one token, and LIMA's turns written out encode as data.py's Tokenizer encodes them.
    assert DEMO_PIECES not in hf_tokenizer("hot tea<EOT>")["input_ids"]
    assert hf_tokenizer("hot tea<EOT>", split_special_tokens=False)["input_ids"][-1] == DEMO_PIECES
    turns = ["How do I brew green tea?", " Water at 80 C,\n  two minutes.", "And black tea?"]
    assert hf_tokenizer("<EOT>".join(turns) + "<EOT>", split_special_tokens=False)["input_ids"] == \
        data.Tokenizer(DEMO_TOKENIZER).encode_dialog(turns)


# ---- errors: one line, exit status 2, nothing written ----

@pytest.fixture
def meta4(tmp_path, tokenizer) -> Path:
    args = make_args()
    return write_meta(random_weights(args), args, 4, tmp_path / "llama", tokenizer)


def test_missing_shard_in_the_numbering(meta4, tmp_path, capsys):
    (meta4 / "consolidated.01.pth").unlink()
    assert "consolidated.01.pth missing" in fails([meta4, tmp_path / "out"], capsys)
    assert not (tmp_path / "out").exists()


def test_missing_last_shard(meta4, tmp_path, capsys):
    (meta4 / "consolidated.03.pth").unlink()  # the numbering 00-02 is whole: the heads tell
    assert "3 shard(s), but each holds 16 of wq's 64 rows: expected 4" in fails([meta4, tmp_path / "out"], capsys)


def test_shards_that_disagree(meta4, tmp_path, capsys):
    shard = torch.load(meta4 / "consolidated.02.pth")
    shard["layers.1.feed_forward.w2.weight"] = shard["layers.1.feed_forward.w2.weight"][:, :-1].clone()
    torch.save(shard, meta4 / "consolidated.02.pth")
    err = fails([meta4, tmp_path / "out"], capsys)
    assert "consolidated.02.pth: the shards disagree: layers.1.feed_forward.w2.weight" in err


def test_shards_from_different_models(meta4, tmp_path, capsys):
    shard = torch.load(meta4 / "consolidated.03.pth")
    shard["norm.weight"] += 1
    torch.save(shard, meta4 / "consolidated.03.pth")
    assert "different models" in fails([meta4, tmp_path / "out"], capsys)


def test_params_json_that_does_not_match_the_tensors(meta4, tmp_path, capsys):
    params = json.loads((meta4 / "params.json").read_text())
    (meta4 / "params.json").write_text(json.dumps({**params, "n_kv_heads": 2}))
    err = fails([meta4, tmp_path / "out"], capsys)
    assert "layers.0.attention.wk.weight has shape (32, 64) but params.json implies (16, 64)" in err


def test_unknown_layout(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.ckpt").write_bytes(b"?")
    assert "unknown layout" in fails([tmp_path / "src", tmp_path / "out"], capsys)


def test_truncated_shard(meta4, tmp_path, capsys):
    data = (meta4 / "consolidated.01.pth").read_bytes()
    (meta4 / "consolidated.01.pth").write_bytes(data[:len(data) // 2])
    assert "consolidated.01.pth: unreadable, truncated" in fails([meta4, tmp_path / "out"], capsys)


def test_truncated_safetensors(tmp_path, tokenizer, capsys):
    args = make_args()
    src = write_hf(random_weights(args), args, tmp_path / "hf", tokenizer, "safetensors")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:len(data) - 100])
    assert "model.safetensors: unreadable, truncated" in fails([src, tmp_path / "out"], capsys)


class RunsCode:
    """Unpickling this calls os.mkdir(path): a stand-in for any code a pickle can run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_pickle_with_code_is_refused(tmp_path, tokenizer, capsys):
    args = make_args()
    src = write_hf(random_weights(args), args, tmp_path / "hf", tokenizer, "bin")
    weights = torch.load(src / "pytorch_model.bin")
    torch.save({**weights, "payload": RunsCode(tmp_path / "pwned")}, src / "pytorch_model.bin")
    assert "pytorch_model.bin: refused" in fails([src, tmp_path / "out"], capsys)
    assert not (tmp_path / "pwned").exists()


def test_missing_tokenizer(tmp_path, tokenizer, capsys):
    args = make_args()
    src = write_hf(random_weights(args), args, tmp_path / "hf", tokenizer, "safetensors")
    (src / "tokenizer.model").unlink()
    assert "no tokenizer.model" in fails([src, tmp_path / "out"], capsys)


def test_hf_index_naming_a_missing_file(tmp_path, tokenizer, capsys):
    args = make_args()
    src = write_hf(random_weights(args), args, tmp_path / "hf", tokenizer, "safetensors-sharded")
    (src / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors, which is missing" in fails([src, tmp_path / "out"], capsys)


def test_missing_safetensors_package(tmp_path, tokenizer, capsys, monkeypatch):
    args = make_args()
    src = write_hf(random_weights(args), args, tmp_path / "hf", tokenizer, "safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    assert "pip install safetensors" in fails([src, tmp_path / "out"], capsys)


def test_dst_that_is_not_empty(meta4, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert "not empty" in fails([meta4, tmp_path / "out"], capsys)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_a_conversion_that_fails_half_way_leaves_nothing(meta4, tmp_path, monkeypatch):
    calls = []
    real = convert.load_tensors

    def failing(path):
        calls.append(path)
        if len(calls) > 4 + 2 * 4:  # the checks' reads, then two layers' worth
            raise OSError("disk on fire")
        return real(path)

    monkeypatch.setattr(convert, "load_tensors", failing)
    with pytest.raises(OSError):
        convert.convert(meta4, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".tmp-out").exists()


def test_command_line_error_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, ROOT / "convert.py", tmp_path / "nowhere", tmp_path / "out"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'nowhere'}: no such directory\n"
