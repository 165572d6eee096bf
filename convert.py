"""
Weights in and out: Meta's LLaMA release or a Hugging Face copy -> this project's format -> HF.

    python convert.py /path/to/llama/65B ckpt/llama-65b             # Meta: consolidated.*.pth, params.json
    python convert.py /path/to/llama-65b-hf ckpt/llama-65b          # HF: config.json, *.safetensors or *.bin
    python convert.py /path/to/llama/7B ckpt/llama-7b --dtype fp32  # cast on the way (default: keep the dtype)
    python convert.py --to_hf lima-65b hf/lima-65b                  # back to HF, to serve a fine-tuned model

The converted format, read by checkpoint.load_model (sample.py, eval.py) and train.py --init:
    params.json      Meta's keys plus max_seq_len; vocab_size is the real number of embedding rows
    tokenizer.model  the sentencepiece model, copied
    model.pth        one torch.save'd dict of tensors under Meta's names, in the source's dtype;
                     torch.load(path, mmap=True, weights_only=True) reads it without copying

Streaming: 65B is 130 GB of bf16, so nothing here holds the model. model.pth is first written as an
empty skeleton (the pickle and the zip index, with holes where the bytes go), then filled one layer
at a time through a shared memory map of it, reading the sources memory-mapped too. Both maps are
reopened for every layer, so the pages a layer touched leave this process with it: the peak is the
interpreter plus two layers, whatever the depth, about 3.6 GB resident for 65B, nearly all of it
file pages the kernel can reclaim (bench/bench_convert.py measures it). --to_hf writes HF's files of
at most 5 GB one at a time, so it peaks near 6 GB. The output is built in a hidden folder beside DST
and renamed when complete. Errors are one line, `error: ...`, exit status 2.
"""

import sys

from cli import Parser, fail


def build_parser() -> Parser:
    p = Parser(prog="convert.py", description=__doc__.strip())
    p.add_argument("src", help="Meta's model folder, an HF folder, or (with --to_hf) a converted one")
    p.add_argument("dst", help="a new directory")
    p.add_argument("--to_hf", action="store_true", help="export a converted directory to HF's format")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="cast the weights (default: keep the source's dtype)")
    return p


# The command line is read before torch is imported (a second or two), so that --help and a
# mistyped option answer at once: all of the above needs only the standard library.
if __name__ == "__main__":
    build_parser().parse_args(sys.argv[1:])

import itertools
import json
import math
import mmap
import os
import shutil
import struct
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import sentencepiece
import torch
from tqdm import tqdm

from model import DTYPES, ModelArgs, Transformer, check_state_dict, load_weights_file, vocab_rows

EOT = "<EOT>"  # LIMA's end-of-turn token, as data.py's Tokenizer names it: id = sentencepiece's size


# ---- reading weights files ----

def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except ValueError as e:  # UnicodeDecodeError too
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, not {type(value).__name__} {str(value)[:40]}")
    return value


def import_safetensors():
    """The optional safetensors package (HF's weights format), with a clear error if it is missing."""
    try:
        import safetensors.torch
    except ImportError:
        raise ValueError("Hugging Face weights need the safetensors package: pip install safetensors") from None
    return safetensors


def sentencepiece_model(path: Path) -> sentencepiece.SentencePieceProcessor:
    """A tokenizer.model, or one line saying it is none (a text file, a truncated copy)."""
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a sentencepiece model ({(str(e).splitlines() or [type(e).__name__])[0]})") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one weights file, memory-mapped: nothing is read until a tensor is used."""
    if path.suffix != ".safetensors":
        return load_weights_file(path)
    safetensors = import_safetensors()
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a truncated file loses its header first
        detail = str(e).partition("\n")[0]
        raise ValueError(f"{path}: unreadable, truncated or not a checkpoint ({detail})") from None


def layer_of(key: str) -> str:
    """'layers.7.attention.wq.weight' -> '7'; the embedding, final norm and output -> ''."""
    return key.split(".")[1] if key.startswith("layers.") else ""


# ---- Meta's model-parallel shards ----

# How Meta's fairscale layers split each weight over the shards, by the weight's role:
# ParallelEmbedding splits the embedding width (dim 1), ColumnParallelLinear the output rows (dim 0),
# RowParallelLinear the input columns (dim 1). RMSNorm weights are copied whole into every shard.
SHARD_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
             "wo": 1, "w2": 1}
META_SHARDS = "consolidated.[0-9]*.pth"


def shard_dim(key: str) -> int | None:
    """The dim along which Meta's shards split this weight; None: every shard holds all of it."""
    return SHARD_DIM.get(key.split(".")[-2])


def meta_shard_paths(src: Path) -> list[Path]:
    """consolidated.00.pth ... consolidated.{N-1}.pth, with none missing from the numbering."""
    found = {}
    for p in src.glob(META_SHARDS):
        number = p.name.split(".")[1]
        if not number.isdigit():
            raise ValueError(f"{p}: not a shard name (consolidated.NN.pth)")
        found[int(number)] = p
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(found) + 1) if i not in found]
    if missing:
        raise ValueError(f"{src}: {', '.join(missing)} missing (found {len(found)} shards)")
    return [found[i] for i in range(len(found))]


def read_meta(src: Path):
    """Meta's release -> (args, the full tensors' shapes as meta tensors, fill: writes them)."""
    paths = meta_shard_paths(src)
    if not (src / "params.json").is_file():
        raise ValueError(f"{src}: no params.json beside the shards")
    args = ModelArgs.from_params(src / "params.json")  # checked before any shard is read
    shards = [load_tensors(p) for p in paths]
    first = shards[0]
    for path, shard in zip(paths[1:], shards[1:]):
        if shard.keys() != first.keys():
            odd = sorted(shard.keys() ^ first.keys())[:3]
            raise ValueError(f"{path}: the shards disagree: {odd} in one of it and {paths[0].name} only")
        for k, t in shard.items():
            if (t.shape, t.dtype) != (first[k].shape, first[k].dtype):
                raise ValueError(f"{path}: the shards disagree: {k} is {tuple(t.shape)} {t.dtype} here, "
                                 f"{tuple(first[k].shape)} {first[k].dtype} in {paths[0].name}")
            if shard_dim(k) is None and not torch.equal(t, first[k]):  # norms: tiny to compare
                raise ValueError(f"{path}: {k} differs from {paths[0].name}'s, but every shard of one "
                                 f"model holds the same copy: the shards come from different models")
    # Meta writes vocab_size -1 (the tokenizer decides) and no max_seq_len: LLaMA-1 was trained at
    # 2048 tokens, the default (LLaMA-2 at 4096: edit params.json to use more).
    vocab_size = vocab_rows(first, source=str(paths[0]))  # ParallelEmbedding splits dim 1, not the rows
    if args.vocab_size <= 0:
        args.vocab_size = vocab_size
    # A missing last shard leaves the numbering whole, but each shard holds 1/N of the heads.
    wq = first.get("layers.0.attention.wq.weight")
    if wq is not None and wq.size(0) * len(paths) != args.dim:
        raise ValueError(f"{src}: {len(paths)} shard(s), but each holds {wq.size(0)} of wq's {args.dim} "
                         f"rows: expected {args.dim // wq.size(0)} (consolidated.00.pth ...)")

    def full(k: str) -> torch.Tensor:
        shape = list(first[k].shape)
        if shard_dim(k) is not None:
            shape[shard_dim(k)] *= len(paths)
        return torch.empty(shape, dtype=first[k].dtype, device="meta")

    # rope.freqs is Meta's RoPE table: model.py computes its own.
    layout = {k: full(k) for k in first if k != "rope.freqs"}

    def fill(out: dict[str, torch.Tensor]):
        shards = [load_tensors(p) for p in paths]  # reopened for each layer (see write_model)
        for key, dst in out.items():
            if shard_dim(key) is None:
                dst.copy_(shards[0][key])
                continue
            # Shard i holds the i-th of N equal slices along the split dim: (..., D/N) or (rows/N, ...).
            for part, shard in zip(dst.chunk(len(shards), dim=shard_dim(key)), shards):
                part.copy_(shard[key])

    return args, layout, fill


# ---- Hugging Face (LlamaForCausalLM) ----

HF_NAMES = {  # Meta's module names -> HF's; inside a layer both add the prefix layers.{i}
    "tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head",
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(key: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    module = key.removesuffix(".weight")
    if module.startswith("layers."):
        _, i, rest = module.split(".", 2)
        return f"model.layers.{i}.{HF_NAMES[rest]}.weight"
    return f"{HF_NAMES[module]}.weight"


# RoPE: Meta rotates adjacent pairs (x[2i], x[2i+1]) of each head, HF rotates the halves (x[i],
# x[i + hd/2]). HF's conversion reorders the rows of wq and wk inside each head so that its
# rotation computes the same scores: Meta's row (pair i, member j) becomes HF's row (half j, i).
# q and k are reordered alike, so q.k, and so attention, is unchanged. wv and wo are not touched.
def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's rows of wq or wk (H*hd, D) -> HF's."""
    rows, dim = w.shape
    w = w.view(n_heads, rows // n_heads // 2, 2, dim)  # (H, hd/2, 2, D): pair i, member j
    return w.transpose(1, 2).reshape(rows, dim)  # (H, 2, hd/2, D) -> (H*hd, D): all first members, then seconds


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rows of q_proj or k_proj (H*hd, D) -> Meta's: the inverse of permute_to_hf."""
    rows, dim = w.shape
    w = w.view(n_heads, 2, rows // n_heads // 2, dim)  # (H, 2, hd/2, D): half j, row i
    return w.transpose(1, 2).reshape(rows, dim)  # (H, hd/2, 2, D) -> (H*hd, D): pairs adjacent again


def rotated_heads(key: str, args: ModelArgs) -> int | None:
    """The head count whose rows RoPE rotates in this weight: wq's H, wk's Hkv; None for the rest."""
    return {"wq": args.n_heads, "wk": args.n_kv_heads}.get(key.split(".")[-2])


def hf_weight_files(src: Path) -> list[Path]:
    """An HF directory's weights: one file, or the shards that its index names."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (src / index).is_file():
            weight_map = read_json(src / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or \
                    not all(isinstance(f, str) and f for f in weight_map.values()):
                raise ValueError(f"{src / index}: weight_map must be an object naming each tensor's file, "
                                 f"not {json.dumps(weight_map)[:40]}")
            files = sorted({src / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ValueError(f"{src}: {index} names {', '.join(missing)}, which is missing")
            return files
        if (src / single).is_file():
            return [src / single]
    raise ValueError(f"{src}: config.json, but no model.safetensors, pytorch_model.bin or an index of shards")


def check_hf_config(config: dict, path: Path):
    """Refuse an HF config.json that is not a LLaMA's, or whose sizes are not positive numbers
    of the right kind, naming the key: model.py knows Meta's names, not HF's."""
    if config.get("model_type") != "llama":
        raise ValueError(f"{path}: model_type {config.get('model_type')!r}; only LLaMA ('llama') converts")
    if config.get("rope_scaling"):
        raise ValueError(f"{path}: rope_scaling is set, and model.py has plain RoPE only")
    for key, kind in HF_CONFIG_TYPES.items():  # before ModelArgs meets a string or a fraction
        value = config.get(key)
        if value is None and key in ("num_key_value_heads", "rope_theta"):
            continue  # optional: as many kv heads as query heads; RoPE's 10000
        if key not in config:
            raise ValueError(f"{path}: no {key!r}")
        wrong = isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int)
        if wrong or not value > 0 or (kind is float and not math.isfinite(value)):
            raise ValueError(f"{path}: {key} must be a positive {'number' if kind is float else 'integer'}, "
                             f"not {json.dumps(value)}")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if config["hidden_size"] % heads:
        raise ValueError(f"{path}: num_attention_heads {heads} does not divide hidden_size {config['hidden_size']}")
    if heads % kv_heads:
        raise ValueError(f"{path}: num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}")


def args_from_hf(config: dict, vocab_size: int, path: Path) -> ModelArgs:
    """HF's config.json -> ModelArgs."""
    check_hf_config(config, path)
    try:
        args = ModelArgs(dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
                         n_heads=config["num_attention_heads"], n_kv_heads=config.get("num_key_value_heads"),
                         vocab_size=vocab_size, norm_eps=config["rms_norm_eps"],
                         rope_theta=config.get("rope_theta") or 10000.0, max_seq_len=config["max_position_embeddings"])
    except ValueError as e:  # what only the Meta names can say (an odd head dim, for RoPE)
        raise ValueError(f"{path}: {e}") from None
    hidden = config["intermediate_size"]
    # HF stores the feed-forward width; Meta derives it from multiple_of (256 for LLaMA-1 and most
    # of LLaMA-2) and ffn_dim_multiplier. When 256 does not give it, the width itself as
    # multiple_of, with a multiplier that brings Meta's unrounded width up to it, always does.
    if args.hidden_dim != hidden:
        unrounded = replace(args, multiple_of=1).hidden_dim
        args = replace(args, multiple_of=hidden, ffn_dim_multiplier=hidden / unrounded)
    return args


HF_CONFIG_TYPES = dict(hidden_size=int, num_hidden_layers=int, num_attention_heads=int, num_key_value_heads=int,
                       intermediate_size=int, max_position_embeddings=int, rms_norm_eps=float, rope_theta=float)


def read_hf(src: Path):
    """An HF LLaMA directory -> (args, shapes under Meta's names as meta tensors, fill)."""
    config = read_json(src / "config.json")
    check_hf_config(config, src / "config.json")  # before any weights file is read
    found = {}  # HF name -> (its file, a meta tensor: shape and dtype only)
    for path in hf_weight_files(src):
        found.update({name: (path, t.to("meta")) for name, t in load_tensors(path).items()})
    if "model.embed_tokens.weight" not in found:
        raise ValueError(f"{src}: no model.embed_tokens.weight in the weights files")
    args = args_from_hf(config, found["model.embed_tokens.weight"][1].size(0), src / "config.json")
    with torch.device("meta"):
        names = {k: hf_name(k) for k in Transformer(args).state_dict()}
    # Older conversions also saved HF's RoPE table (rotary_emb.inv_freq): model.py computes its own.
    unexpected = sorted(n for n in found.keys() - set(names.values()) if not n.endswith("inv_freq"))
    missing = [n for n in names.values() if n not in found]
    if missing or unexpected:
        raise ValueError(f"{src}: {len(missing)} missing tensor(s) {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}: not a LLaMA of this config.json?")
    layout = {k: found[n][1] for k, n in names.items()}

    def fill(out: dict[str, torch.Tensor]):
        files = {p: load_tensors(p) for p in {found[names[k]][0] for k in out}}  # reopened per layer
        for key, dst in out.items():
            w = files[found[names[key]][0]][names[key]]
            heads = rotated_heads(key, args)
            dst.copy_(w if heads is None else permute_from_hf(w, heads))

    return args, layout, fill


# ---- writing ----

@contextmanager
def staging(dst: Path):
    """Build the output in a hidden folder beside dst and rename it to dst once complete."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst}: exists and is not empty; choose a new directory")
    tmp = dst.parent / f".tmp-{dst.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run that was killed
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        dst.rmdir()  # empty, checked above
    tmp.rename(dst)


def write_model(path: Path, layout: dict[str, torch.Tensor], fill):
    """torch.save a dict shaped like layout (meta tensors), filled one layer at a time by fill(out).

    The file is byte for byte what torch.save of the filled dict writes, but the dict never exists
    whole: torch.save first writes the pickle and the zip's index with holes where the tensors'
    bytes go (skip_data), fill writes each layer's bytes into the file's memory map, each
    tensor's CRC-32 is taken while its pages are still in memory, and seal_zip writes the
    checksums last (so the file is not read a second time: 130 GB at 65B).
    """
    # The skeleton's tensors are each a shared map of one sparse file: they have a shape, a dtype
    # and a CPU storage of their own (so the pickle is torch.save's), but no memory, no disk and
    # no commit charge (a host with strict overcommit would refuse 130 GB of torch.empty), and
    # skip_data reads none of their bytes. (FakeTensorMode's tensors would do too, but their
    # pickle spells the device anew each time, where torch.save's memoises it: another file.)
    blank = path.with_name(f".blank-{path.name}")
    with open(blank, "wb") as f:
        f.truncate(max(t.numel() * t.element_size() for t in layout.values()))
    skeleton = type(layout)((k, torch.from_file(str(blank), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape))
                            for k, t in layout.items())
    if hasattr(layout, "_metadata"):  # a module's state_dict (an OrderedDict with its versions)
        skeleton._metadata = layout._metadata
    with torch.serialization.skip_data():
        torch.save(skeleton, path)
    del skeleton
    blank.unlink()
    if hasattr(os, "posix_fallocate"):  # claim the disk now: a full disk is an error here, not a crash later
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    # torch.save names each tensor's record by the order the pickle meets its storage: the
    # skeleton's i-th tensor (one storage each) is record data/i.
    record = {k: str(i) for i, k in enumerate(layout)}
    crcs = {}
    layers = [list(keys) for _, keys in itertools.groupby(layout, key=layer_of)]
    for keys in tqdm(layers, desc=path.name, unit="layer", disable=None):
        with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):  # writes reach the file
            out = torch.load(path, mmap=True, weights_only=True)
        fill({k: out[k] for k in keys})
        for k in keys:
            crcs[record[k]] = zlib.crc32(out[k].reshape(-1).view(torch.uint8).numpy())
        del out  # unmapped: the written pages leave this process (the kernel writes them back)
    seal_zip(path, crcs)


def hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine (boost's), on 64 bits: how torch folds the records' CRC-32s into one."""
    return (seed ^ (value + 0x9E3779B9 + (seed << 6) + (seed >> 2))) & (2**64 - 1)


def storage_key(name: str) -> str | None:
    """A zip record's storage key: archive/data/KEY -> KEY; None for the pickle and the rest."""
    parent, _, key = name.rpartition("/")
    return key if parent.rpartition("/")[2] == "data" else None


def seal_zip(path: Path, storage_crcs: dict[str, int]):
    """Write the CRC-32 of every record into a zip that torch.save wrote with skip_data (it leaves
    them 0, and `unzip -t` would call the file corrupt), and the serialization id that torch.save
    derives from them (20 digits hashing the records' names, then 20 folding their CRC-32s in
    order). The tensors' CRC-32s come from the caller, by storage key (storage_key); the other
    records (the pickle, the version strings: kilobytes) are read."""
    with zipfile.ZipFile(path) as z:
        records = sorted(z.infolist(), key=lambda r: r.header_offset)
        directory = z.start_dir
    if not records[-1].filename.endswith("/.data/serialization_id") or records[-1].file_size != 40:
        raise ValueError(f"{path}: torch.save wrote a zip of a layout this code does not know")
    keys = {storage_key(r.filename) for r in records} - {None}
    if keys != set(storage_crcs):
        raise ValueError(f"{path}: checksums for {len(storage_crcs)} tensors, but {len(keys)} tensor "
                         f"records: not the file they were taken for")
    crcs = {}
    with open(path, "r+b") as f:
        def data_at(r: zipfile.ZipInfo) -> int:
            f.seek(r.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))  # the local header's lengths
            return r.header_offset + 30 + name_len + extra_len

        def write_crc(r: zipfile.ZipInfo, start: int, crc: int):
            f.seek(start + r.file_size)  # the data descriptor after the bytes: signature, CRC-32, sizes
            if f.read(4) != b"PK\x07\x08":
                raise ValueError(f"{path}: no data descriptor after {r.filename}: not torch.save's layout")
            f.write(struct.pack("<I", crc))
            crcs[r.filename] = crc

        combined = 0
        for r in records[:-1]:
            start, crc = data_at(r), storage_crcs.get(storage_key(r.filename))
            if crc is None:
                f.seek(start)
                crc = zlib.crc32(f.read(r.file_size))
            write_crc(r, start, crc)
            combined = hash_combine(combined, crc)
        start = data_at(records[-1])
        f.seek(start)
        serialization_id = f.read(20) + f"{combined:020d}".encode()  # the names' part is right already
        f.seek(start)
        f.write(serialization_id)
        write_crc(records[-1], start, zlib.crc32(serialization_id))
        f.seek(directory)
        for _ in records:  # the central directory's entries: CRC-32 at offset 16, lengths at 28
            entry = f.tell()
            head = f.read(46)
            name_len, extra_len, comment_len = struct.unpack("<HHH", head[28:34])
            name = f.read(name_len).decode()
            f.seek(entry + 16)
            f.write(struct.pack("<I", crcs[name]))
            f.seek(entry + 46 + name_len + extra_len + comment_len)


def convert(src, dst, dtype: torch.dtype | None = None):
    """Meta's shards or an HF directory -> dst: params.json, tokenizer.model, model.pth."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ValueError(f"{src}: no such directory")
    if (src / "config.json").is_file():
        (args, layout, fill), config, tokenizers = read_hf(src), "config.json", [src]
    elif any(src.glob(META_SHARDS)):
        # Meta's download puts tokenizer.model beside the model folders (7B/, 65B/, ...).
        (args, layout, fill), config, tokenizers = read_meta(src), "params.json", [src, src.parent]
    else:
        raise ValueError(f"{src}: unknown layout: expected Meta's consolidated.*.pth and params.json, "
                         f"or Hugging Face's config.json with *.safetensors or pytorch_model*.bin")
    tokenizer = next((d / "tokenizer.model" for d in tokenizers if (d / "tokenizer.model").is_file()), None)
    if tokenizer is None:
        raise ValueError(f"{src}: no tokenizer.model (sentencepiece), which this project's tokenizer reads; "
                         f"copy it from Meta's release")
    n = sentencepiece_model(tokenizer).get_piece_size()
    if args.vocab_size not in (n, n + 1):  # train.py and sample.py would refuse the pair: say so now
        raise ValueError(f"{tokenizer}: {n} pieces, but the weights have {args.vocab_size} embedding rows; "
                         f"expected {n} (a base model) or {n + 1} (fine-tuned, with {EOT}): not this model's tokenizer")
    with torch.device("meta"):
        model = Transformer(args)
    check_state_dict(model, layout, source=str(src), config=config)
    layout = {k: torch.empty_like(layout[k], dtype=dtype or layout[k].dtype) for k in model.state_dict()}
    with staging(dst) as tmp:
        params = asdict(args)
        params.pop("resid_dropout")  # a training setting, not part of the model's shape
        (tmp / "params.json").write_text(json.dumps(params, indent=2))
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        write_model(tmp / "model.pth", layout, fill)
    print(f"{src} -> {dst}: {model.num_params():,} parameters")


# ---- export to Hugging Face ----

# tokenizer.json (HF's tokenizers library) is written from the sentencepiece model itself, with the
# standard library: transformers, tokenizers and protobuf are not dependencies of this project. What
# decides sentencepiece's ids but SentencePieceProcessor does not tell (each piece's type, the model
# type, the text settings) is read from tokenizer.model, a protobuf ModelProto, by the few lines
# below. The field numbers are those of sentencepiece's src/sentencepiece_model.proto.
PIECES, TRAINER_SPEC, NORMALIZER_SPEC, DENORMALIZER_SPEC = 1, 2, 3, 5  # ModelProto
PIECE, SCORE, TYPE = 1, 2, 3  # ModelProto.SentencePiece
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
MODEL_TYPE, TREAT_WHITESPACE_AS_SUFFIX, BYTE_FALLBACK = 3, 24, 35  # TrainerSpec
MODEL_TYPES = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}  # TrainerSpec.ModelType
RULES_NAME, CHARSMAP, ADD_DUMMY_PREFIX, REMOVE_EXTRA_WHITESPACES, ESCAPE_WHITESPACES = 1, 2, 3, 4, 5  # NormalizerSpec


def read_varint(data: bytes, i: int) -> tuple[int, int]:
    """The varint at data[i] and the index after it: 7 bits a byte, lowest first, top bit set if more follow."""
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def proto_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """One protobuf message as (field number, value) in file order: a varint (wire type 0: ints, bools,
    enums) as an int; a length-delimited field (2: strings, bytes, messages) or a fixed-size one (1: 64
    bits, 5: 32 bits, a float) as its bytes. It reads files sentencepiece has loaded (hf_tokenizer):
    they are whole, so nothing here checks for a cut."""
    fields, i = [], 0
    while i < len(data):
        key, i = read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(data, i)
        else:
            size, i = read_varint(data, i) if wire == 2 else ({1: 8, 5: 4}[wire], i)
            value, i = data[i:i + size], i + size
        fields.append((number, value))
    return fields


def sentencepiece_proto(path: Path) -> tuple[list[tuple[str, float, int]], dict[int, dict]]:
    """tokenizer.model -> each piece's (text, score, type), and its specs (TRAINER_SPEC, ...), each a
    dict of fields by number; a field left out has proto2's default, which the reader gives to .get()."""
    model = proto_fields(path.read_bytes())
    pieces = []
    for number, value in model:
        if number == PIECES:
            piece = dict(proto_fields(value))
            score = struct.unpack("<f", piece.get(SCORE, bytes(4)))[0]  # a little-endian float32
            pieces.append((piece[PIECE].decode(), score, piece.get(TYPE, NORMAL)))
    return pieces, {number: dict(proto_fields(value)) for number, value in model if number != PIECES}


def check_exportable(path: Path, pieces: list[tuple[str, float, int]], specs: dict[int, dict]):
    """Refuse, in one line, a sentencepiece model whose ids tokenizer.json would not reproduce exactly.

    What exports is LLaMA's kind (Meta's tokenizer, data/tokenizer.model): BPE; the text kept as it is
    (no normalization or decoding rules, spaces neither collapsed nor moved to the end of a piece);
    byte fallback, so that no character is unknown; no user-defined pieces (sentencepiece matches them
    before merging) and no unused ones (it splits them again).
    """
    trainer, normalizer = specs.get(TRAINER_SPEC, {}), specs.get(NORMALIZER_SPEC, {})
    model_type = MODEL_TYPES.get(trainer.get(MODEL_TYPE, 1), "unknown")
    unsupported = {
        f"a {model_type} model": model_type != "BPE",
        f"normalization rules ({normalizer.get(RULES_NAME, b'').decode()})": bool(normalizer.get(CHARSMAP)),
        "decoding rules": bool(specs.get(DENORMALIZER_SPEC, {}).get(CHARSMAP)),
        "remove_extra_whitespaces": normalizer.get(REMOVE_EXTRA_WHITESPACES, True),
        "spaces not escaped as a '▁' prefix": not normalizer.get(ESCAPE_WHITESPACES, True)
                                              or trainer.get(TREAT_WHITESPACE_AS_SUFFIX, False),
        "no byte fallback": not trainer.get(BYTE_FALLBACK, False),
        "user-defined or unused pieces": any(kind in (USER_DEFINED, UNUSED) for _, _, kind in pieces),
    }
    found = [what for what, present in unsupported.items() if present]
    if found:
        raise ValueError(f"{path}: {', '.join(found)}: tokenizer.json would not give sentencepiece's ids; "
                         f"only LLaMA's kind exports (BPE, identity normalization, byte fallback)")


def bpe_merges(pieces: list[tuple[str, float, int]]) -> list[list[str]]:
    """sentencepiece's BPE as tokenizers' list of merges.

    sentencepiece encodes by merging, again and again, the adjacent pair whose concatenation is the
    normal piece of highest score; tokenizers merges the adjacent pair that comes first in its list.
    So the list holds every (left, right) of normal pieces that concatenate to a normal piece, by that
    piece's score, best first. No merge makes a control, unknown or byte piece, as none does in
    sentencepiece: a literal "<s>" in the text stays the pieces of "<", "s" and ">".
    Between equal scores sentencepiece takes the leftmost pair, which a list cannot say. Meta's only
    ties are its runs of spaces ("▁▁" to 16 of them, all -1e9), which come out as sentencepiece's in
    the order of their ids, as here, or the reverse (tests/test_convert.py checks 1 to 40 spaces).
    """
    normal = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == NORMAL}
    merges = sorted((-pieces[i][1], i, piece[:k], piece[k:]) for piece, i in normal.items()
                    for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
    return [[left, right] for _, _, left, right in merges]


def tokenizer_json(path: Path, bos_id: int, eot: bool) -> dict:
    """tokenizer.json for this sentencepiece model: its pieces under their ids, its merges, its text
    handling, and (eot: a fine-tuned model) LIMA's EOT as one more token after the pieces.

    sentencepiece's text handling in tokenizers' steps: a "▁" before the text (the dummy prefix) and
    every space as "▁" (the normalizer); BOS before the ids (the post-processor); when decoding, "▁"
    back to a space, byte pieces back to UTF-8, then the dummy prefix's space dropped (the decoder).
    The control pieces and EOT are added special tokens, which tokenizers finds in the text before
    anything else unless told not to (see hf_tokenizer); normalizing the text between them on its
    own gives each part its dummy prefix, so "u1<EOT>a1" encodes as data.py's conversations do.
    Decoding differs from sentencepiece's only on ids that no text encodes to: a run of byte pieces
    that is not UTF-8 (U+FFFD for each of its bytes, where sentencepiece writes it for the bad ones),
    a space's byte piece first (its space is dropped), <unk> (sentencepiece writes " ⁇ ").
    """
    pieces, specs = sentencepiece_proto(path)
    check_exportable(path, pieces, specs)
    dummy_prefix = specs.get(NORMALIZER_SPEC, {}).get(ADD_DUMMY_PREFIX, True)
    specials = [(i, piece) for i, (piece, _, kind) in enumerate(pieces) if kind in (UNKNOWN, CONTROL)]
    bos = pieces[bos_id][0]
    template = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [dict(id=i, content=piece, single_word=False, lstrip=False, rstrip=False, normalized=False,
                              special=True) for i, piece in specials + [(len(pieces), EOT)] * eot],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}] * dummy_prefix
                       + [{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,  # sentencepiece merges across the whole text: no splitting into words first
        "post_processor": {"type": "TemplateProcessing", "single": template,  # a pair: BOS A BOS B, as HF's LLaMA
                           "pair": template + [{"SpecialToken": {"id": bos, "type_id": 1}},
                                               {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]
            + [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] * dummy_prefix},
        # ignore_merges off: sentencepiece has no shortcut for a text that is one piece as a whole
        "model": {"type": "BPE", "dropout": None, "unk_token": next(p for p, _, kind in pieces if kind == UNKNOWN),
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": True, "ignore_merges": False,
                  "vocab": {piece: i for i, (piece, _, _) in enumerate(pieces)}, "merges": bpe_merges(pieces)},
    }


def hf_tokenizer(tokenizer: Path, vocab_size: int, max_seq_len: int) -> tuple[dict[str, dict], int, int]:
    """HF's tokenizer and generation files for this sentencepiece model; the bos and eos ids.

    A fine-tuned model has one row more than the tokenizer has pieces: LIMA's EOT (data.py), which
    becomes an added special token with that id. The model ends every answer with it and never learnt
    to write </s>, so EOT is its eos token, for the tools that stop at the tokenizer's or the config's.

    transformers 5 reads tokenizer.json as it is written only under its generic class,
    PreTrainedTokenizerFast: its LlamaTokenizer rebuilds the text handling, and loses a leading space.
    split_special_tokens keeps "<s>", "</s>", "<unk>" and "<EOT>" written in a text as text, as
    sentencepiece and data.py read them, so that the ids are sentencepiece's for every text; a call
    with split_special_tokens=False reads them as the special tokens, to write LIMA's turns as text.
    """
    sp = sentencepiece_model(tokenizer)
    n = sp.get_piece_size()
    if vocab_size not in (n, n + 1):
        raise ValueError(f"{tokenizer}: {n} pieces, but the model has {vocab_size} embedding rows; "
                         f"expected {n} (a base model) or {n + 1} (fine-tuned, with {EOT})")
    eot = vocab_size == n + 1
    tokens = tokenizer_json(tokenizer, sp.bos_id(), eot)
    eos_id = n if eot else sp.eos_id()
    piece = {t["id"]: t["content"] for t in tokens["added_tokens"]}
    specials = dict(unk_token=piece[sp.unk_id()], bos_token=piece[sp.bos_id()], eos_token=piece[eos_id])
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tokens["added_tokens"]}
    tokenizer_config = dict(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False,
                            **specials, added_tokens_decoder=added, split_special_tokens=True,
                            model_max_length=max_seq_len, clean_up_tokenization_spaces=False)
    # generate() stops at any id of a list: at EOT, and at </s> too should the model still write it.
    stop = sp.eos_id() if eos_id == sp.eos_id() else [eos_id, sp.eos_id()]
    files = {"tokenizer.json": tokens, "tokenizer_config.json": tokenizer_config, "special_tokens_map.json": specials,
             "generation_config.json": dict(bos_token_id=sp.bos_id(), eos_token_id=stop)}
    return files, sp.bos_id(), eos_id


def write_safetensors(model_pth: Path, dst: Path, args: ModelArgs, dtype: torch.dtype, max_file_bytes: int):
    """model.pth -> HF's weights: names, permuted q/k, files of at most max_file_bytes and their index."""
    safetensors = import_safetensors()
    with torch.device("meta"):
        shapes = Transformer(args).state_dict()
    files, size = [[]], 0  # HF's convention for big models: files of a few GB, in the model's order
    for k, t in shapes.items():
        if files[-1] and size + t.numel() * dtype.itemsize > max_file_bytes:
            files, size = files + [[]], 0
        files[-1].append(k)
        size += t.numel() * dtype.itemsize
    names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    weight_map = {}
    for name, keys in tqdm(list(zip(names, files)), desc="safetensors", unit="file", disable=None):
        state_dict = load_tensors(model_pth)  # reopened per file: its pages leave with it
        tensors = {}
        for k in keys:
            w, heads = state_dict[k].to(dtype), rotated_heads(k, args)
            tensors[hf_name(k)] = w if heads is None else permute_to_hf(w, heads)
        safetensors.torch.save_file(tensors, dst / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del state_dict, tensors
    if len(files) > 1:
        total = sum(t.numel() for t in shapes.values()) * dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def to_hf(src, dst, dtype: torch.dtype | None = None, max_file_bytes: int = 5 * 10**9):
    """A converted directory -> an HF LLaMA directory: config.json, *.safetensors, tokenizer files."""
    src, dst = Path(src), Path(dst)
    for name in ("params.json", "model.pth", "tokenizer.model"):
        if not (src / name).is_file():
            raise ValueError(f"{src}: no {name}; expected a directory written by convert.py")
    state_dict = load_tensors(src / "model.pth")
    args = ModelArgs.from_params(src / "params.json", vocab_size=vocab_rows(state_dict, str(src / "model.pth")))
    with torch.device("meta"):
        check_state_dict(Transformer(args), state_dict, source=str(src / "model.pth"))
    dtype = dtype or state_dict["tok_embeddings.weight"].dtype
    del state_dict
    tokenizer_files, bos_id, eos_id = hf_tokenizer(src / "tokenizer.model", args.vocab_size, args.max_seq_len)
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=args.dim,
        intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, vocab_size=args.vocab_size, max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, hidden_act="silu", tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, initializer_range=0.02, use_cache=True,
        bos_token_id=bos_id, eos_token_id=eos_id, torch_dtype=str(dtype).removeprefix("torch."))
    with staging(dst) as tmp:
        for name, content in [("config.json", config), *tokenizer_files.items()]:
            (tmp / name).write_text(json.dumps(content, indent=2))
        shutil.copyfile(src / "tokenizer.model", tmp / "tokenizer.model")
        write_safetensors(src / "model.pth", tmp, args, dtype, max_file_bytes)
    print(f"{src} -> {dst}: Hugging Face LLaMA, {config['torch_dtype']}")


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        (to_hf if a.to_hf else convert)(a.src, a.dst, DTYPES.get(a.dtype))
    except (ValueError, OSError) as e:
        fail(e)


if __name__ == "__main__":
    main()
