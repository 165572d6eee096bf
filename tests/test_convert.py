"""convert.py: Meta's shards and HF directories in, this project's format out, and back to HF.

The checkpoints are built here from a random state dict, by the rules of the issue written out
independently of convert.py: Meta's model-parallel split and HF's names and q/k row permutation.
"""

import io
import json
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

@pytest.mark.parametrize("eot", [True, False], ids=["fine-tuned", "base"])
def test_to_hf_then_back_is_the_identity(tmp_path, tokenizer, eot):
    args = make_args(vocab_size=N_PIECES + eot)
    weights = random_weights(args)
    src = write_converted(weights, args, tmp_path / "lima", tokenizer)
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
    if eot:  # EOT is an added special token with id = the number of pieces, and generation stops at it
        assert tok_config["added_tokens_decoder"][str(N_PIECES)]["content"] == "<EOT>"
        assert tok_config["added_tokens_decoder"][str(N_PIECES)]["special"]
        assert tok_config["eos_token"] == "<EOT>" and config["eos_token_id"] == N_PIECES
        assert generation["eos_token_id"] == [N_PIECES, 2]
    else:
        assert str(N_PIECES) not in tok_config["added_tokens_decoder"]
        assert tok_config["eos_token"] == "</s>" and generation["eos_token_id"] == 2


def test_to_hf_refuses_a_vocabulary_that_does_not_fit_the_tokenizer(tmp_path, tokenizer, capsys):
    args = make_args(vocab_size=N_PIECES + 8)
    src = write_converted(random_weights(args), args, tmp_path / "lima", tokenizer)
    err = fails(["--to_hf", src, tmp_path / "hf"], capsys)
    assert "64 pieces, but the model has 72 embedding rows" in err and not (tmp_path / "hf").exists()


def test_to_hf_with_transformers(tmp_path, tokenizer):
    """If transformers is installed: it loads the export and computes our logits; it knows EOT."""
    transformers = pytest.importorskip("transformers")
    args = make_args(vocab_size=N_PIECES + 1)
    weights = random_weights(args, dtype=torch.float32)
    src = write_converted(weights, args, tmp_path / "lima", tokenizer)
    convert.to_hf(src, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _ = checkpoint.load_model(src)
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, ours(tokens), atol=1e-4, rtol=1e-4)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer.convert_tokens_to_ids("<EOT>") == N_PIECES == hf_tokenizer.eos_token_id
    assert hf_tokenizer("hot tea<EOT>")["input_ids"][-1] == N_PIECES  # one token, never split


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
