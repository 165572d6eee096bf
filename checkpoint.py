"""
Training checkpoints: sharded, atomic, every epoch kept, and readable without the GPUs they came from.

    python checkpoint.py list out/demo                         # complete checkpoints, oldest first
    python checkpoint.py export out/demo/epoch-05 out/lima-e5  # -> params.json, tokenizer.model, model.pth

load_model here is the one loader of a model to answer with (sample.py, eval.py): a training
checkpoint or a converted directory, checked against its tokenizer.

A checkpoint is a directory (epoch-05, or step-000120 for an interval or a preemption save):
    params.json       the model's shape (ModelArgs), vocabulary including EOT
    tokenizer.model   the sentencepiece model the run used
    state.json        step, epoch, data position, the TrainConfig, world size
    model/            torch.distributed.checkpoint: each rank writes its own shards, nobody gathers
    optim/            the same for AdamW's state (only in the newest checkpoints; see --keep_optim)
    rng-{rank}.pt     each rank's RNG states, so dropout continues exactly
It is written under a hidden name (.tmp-epoch-05) and renamed when every rank has finished: a
directory without the dot is complete, and a kill at any moment leaves at most a .tmp- folder
that nothing reads.

Nothing in a checkpoint can run code when it is read, even one someone else wrote. DCP's own
reader unpickles .metadata with plain pickle and its non-tensor entries (an optimizer's step
counts and hyperparameters) with torch.load(weights_only=False): either would run whatever a
planted pickle asks. Here .metadata goes through an unpickler that builds only DCP's metadata
classes (MetadataUnpickler) and the non-tensor entries through torch.load(weights_only=True),
which allows plain numbers, strings and containers; anything else is refused in one line,
naming the file. (DCP's safetensors format would avoid pickle too, but it writes only tensors:
the optimizer's hyperparameters and the torch.optim state layout would need a second format.)
"""

import sys

from cli import Parser


def build_parser() -> Parser:
    p = Parser(prog="checkpoint.py", description=__doc__.strip(), status=1)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("list", status=1, help="the run's complete checkpoints, oldest first",
                       description="the run's complete checkpoints, oldest first, and the damaged ones skipped")
    c.add_argument("run", help="the run's folder (train.py --out)")
    c = sub.add_parser("export", status=1, help="a training checkpoint -> the converted format",
                       description="a training checkpoint -> params.json, tokenizer.model and one model.pth, "
                                   "for sample.py, eval.py and convert.py --to_hf")
    c.add_argument("checkpoint", help="a training checkpoint (out/RUN/epoch-NN)")
    c.add_argument("dst", help="a new directory")
    c.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the exported weights' dtype")
    return p


# The command line is read before torch is imported (a second or two), so that --help and a
# mistyped command answer at once: all of the above needs only the standard library.
if __name__ == "__main__":
    build_parser().parse_args(sys.argv[1:])

import io
import json
import os
import pickle
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

import convert
from data import Tokenizer
from model import DTYPES, ModelArgs, Transformer, check_state_dict, load_weights_file, vocab_rows


def read_state(path: Path) -> dict:
    """A checkpoint's state.json, checked for what resuming needs; ValueError naming what is wrong."""
    file = Path(path) / "state.json"
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no state.json: not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: cut off or not JSON ({e})") from None
    for key, kind in (("step", int), ("epoch", int), ("world_size", int), ("config", dict)):
        if not isinstance(state, dict) or not isinstance(state.get(key), kind):
            raise ValueError(f"{file}: no {kind.__name__} {key!r}: an incomplete or edited state")
    return state


def problem(path: Path) -> str | None:
    """Why a directory is not a complete checkpoint, or None if it is one."""
    try:
        read_state(path)
    except ValueError as e:
        return str(e)
    for name in ("params.json", "tokenizer.model", "model/.metadata"):
        if not (path / name).is_file():
            return f"{path}: no {name}: not a complete checkpoint"
    return None


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and problem(path) is None


def list_checkpoints(out_dir) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first (by training step)."""
    out_dir = Path(out_dir)
    found = [p for p in out_dir.iterdir() if is_checkpoint(p)] if out_dir.is_dir() else []
    return sorted(found, key=lambda p: read_state(p)["step"])


def not_one_checkpoint(path: Path, resume: str = "") -> str | None:
    """If path is a training run's folder (holding checkpoints), not one checkpoint: the one-line
    error naming the one to give instead; None for anything else. To read answers (sample.py,
    eval.py) that is its newest epoch; to resume, its newest of any kind, which `resume` (the
    --resume auto that continues this folder) would pick."""
    if not (found := list_checkpoints(path)):
        return None
    head = f"{path} is a training run's folder, not one checkpoint"
    if resume:
        return f"{head}: {resume} continues from its newest, {found[-1]}, or name it: --resume {found[-1]}"
    epochs = [p for p in found if p.name.startswith("epoch-")]
    return (f"{head}: give one of its checkpoints, such as its newest {'epoch' if epochs else 'one'}, "
            f"{(epochs or found)[-1]}")


def damaged(out_dir) -> list[str]:
    """What is wrong with each folder of out_dir that is named like a checkpoint but is not one."""
    out_dir = Path(out_dir)
    named = sorted(p for p in out_dir.glob("*") if p.is_dir() and p.name.startswith(("epoch-", "step-")))
    return [why for p in named if (why := problem(p))] if out_dir.is_dir() else []


def fsync(path: Path):
    """Flush a file's (or a directory's entries') data to the disk, so that a power loss after the
    rename that commits a checkpoint cannot leave it with empty or missing files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path, model, optimizer, state: dict, args: ModelArgs, tokenizer_path):
    """Write a checkpoint from every rank at once; it appears under `path` only when complete."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that was killed earlier
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(get_model_state_dict(model), checkpoint_id=tmp / "model")
    if optimizer is not None:
        dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=tmp / "optim")
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    fsync(tmp / f"rng-{rank}.pt")  # DCP fsyncs its own files (FileSystemWriter's sync_files)
    dist.barrier()
    if rank == 0:
        (tmp / "params.json").write_text(json.dumps(asdict(args), indent=2))
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        (tmp / "state.json").write_text(json.dumps({**state, "world_size": dist.get_world_size()}, indent=2))
        for name in ("params.json", "tokenizer.model", "state.json", "model", "optim", "."):
            if (tmp / name).exists():
                fsync(tmp / name)
        old = path.parent / f".old-{path.name}"
        if path.exists():  # saving the same step again (after a resume): set the old one aside,
            shutil.rmtree(old, ignore_errors=True)  # by a rename, so that no kill can leave it
            path.rename(old)  # half deleted under a name that --resume would pick
        tmp.rename(path)  # the commit point: atomic on a POSIX file system
        fsync(path.parent)  # and the rename itself on the disk
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def drop_old_optimizer_states(out_dir, keep: int):
    """Keep AdamW's state (2x the fp32 weights) only in the newest `keep` checkpoints."""
    if dist.get_rank() == 0:
        for path in list_checkpoints(out_dir)[:-keep] if keep > 0 else list_checkpoints(out_dir):
            shutil.rmtree(path / "optim", ignore_errors=True)
    dist.barrier()


# What a DCP .metadata pickle may build: DCP's own records, sizes, dtypes, paths. Nothing that runs.
METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "ChunkStorageMetadata",
                                              "TensorProperties", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # torch.strided from its name
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in METADATA_CLASSES.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which is not DCP metadata")


def read_metadata(path: Path):
    """A DCP directory's .metadata, unpickled with only DCP's metadata classes allowed."""
    file = Path(path) / ".metadata"
    if not file.is_file():
        raise ValueError(f"{path}: no .metadata: not a complete DCP checkpoint")
    try:
        return MetadataUnpickler(io.BytesIO(file.read_bytes())).load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{file}: refused: {e}, and loading it could run code") from None
    except Exception as e:  # truncated or foreign bytes
        raise ValueError(f"{file}: unreadable, truncated or not DCP metadata ({e})") from None


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with read_metadata through MetadataUnpickler."""

    def read_metadata(self, *args, **kwargs):
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with the non-tensor entries read by torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            detail = str(e).partition("\n")[0]
            raise ValueError(f"entry {read_item.dest_index.fqn} refused: it pickles more than plain values, "
                             f"and loading it could run code ({detail})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_dcp_load(state_dict: dict, path: Path, **kwargs):
    """dcp.load that runs nothing from the files; a refusal or a bad shard is one ValueError."""
    read_metadata(path)  # the same refusal on every rank, before any collective
    try:
        dcp.load(state_dict, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), **kwargs)
    except CheckpointException as e:  # DCP gathers each rank's failure: report the first
        error = next(iter(e.failures.values()))
        error = error[0] if isinstance(error, tuple) else error  # (exception, its stack)
        detail = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ValueError(f"{path}: unreadable or truncated ({detail})") from None


def load(path, model, optimizer) -> dict:
    """Load a checkpoint into an FSDP model and its optimizer; return state.json."""
    path = Path(path)
    if (why := problem(path)) is not None:
        raise ValueError(why)
    check_same_shape(path, model.args)
    if optimizer is not None and not (path / "optim").is_dir():
        raise FileNotFoundError(f"{path}: has weights only (its optimizer state was dropped, see "
                                f"--keep_optim); resume from a newer checkpoint or export this one")
    model_sd = get_model_state_dict(model)
    safe_dcp_load(model_sd, path / "model")
    set_model_state_dict(model, model_sd)
    if optimizer is not None:
        optim_sd = get_optimizer_state_dict(model, optimizer)
        safe_dcp_load(optim_sd, path / "optim")
        set_optimizer_state_dict(model, optimizer, optim_sd)
    state = read_state(path)
    rng_file = path / f"rng-{dist.get_rank()}.pt"
    if state["world_size"] == dist.get_world_size() and rng_file.is_file():
        try:
            set_rng_state(torch.load(rng_file, weights_only=True))
        except pickle.UnpicklingError:
            raise ValueError(f"{rng_file}: refused: it pickles more than RNG states, and loading it "
                             f"could run code") from None
    return state


def check_same_shape(path: Path, args: ModelArgs):
    """Refuse a checkpoint of another model's shape before DCP meets a size mismatch."""
    saved = ModelArgs.from_params(path / "params.json")
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim"):
        if getattr(saved, name) != getattr(args, name):
            raise ValueError(f"{path} holds a model with {name} {getattr(saved, name)}, and this run's model "
                             f"has {name} {getattr(args, name)}: resume with the same model (--init or --preset)")


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def has_sharded_weights(path) -> bool:
    """Weights as DCP shards (a training checkpoint), not one model.pth (a converted directory)."""
    return (Path(path) / "model" / ".metadata").is_file()


# ---- loading a model to answer with: a training checkpoint or a converted directory ----

def load_model(path, device="cpu", dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer]:
    """A training checkpoint (out/RUN/epoch-NN) or a converted directory (params.json, model.pth,
    tokenizer.model) -> (model in eval mode, tokenizer): the one loader of sample.py and eval.py.

    The weights are checked against the tokenizer, then moved to device and cast to dtype; with the
    defaults a converted model stays memory-mapped on the CPU (nothing is read yet), which is what
    tensor parallelism wants before sharding: sample.py moves each rank's part afterwards.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not (path / "tokenizer.model").is_file():
        if why := not_one_checkpoint(path):
            raise ValueError(why)
        raise FileNotFoundError(f"{path}: no tokenizer.model; expected a directory written by "
                                f"convert.py, train.py or checkpoint.py export")
    tok = Tokenizer(path / "tokenizer.model")
    sharded = has_sharded_weights(path)
    model = load_sharded(path) if sharded else load_converted(path)
    rows = model.args.vocab_size
    if rows == tok.n_base:
        # A base model, never fine-tuned: worth sampling as a baseline, so add the EOT row rather
        # than refuse. The row is the vocabulary's mean (model.extend_vocab), never trained.
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"note: {path} has no EOT row (a base model?): added one; its answers will rarely "
                  f"stop before the length limit", file=sys.stderr)
        model.grow_vocab(1)
    elif rows != tok.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tok.n_base} pieces + EOT = {tok.vocab_size} "
                         f"tokens but {'model/' if sharded else 'model.pth'} has {rows} embedding rows: "
                         f"they do not belong together")
    return model.to_device(device, dtype).eval(), tok


def load_converted(path: Path) -> Transformer:
    """params.json + model.pth (convert.py's format) -> a model on the CPU in the file's dtype.

    Built on the meta device, then the memory-mapped tensors are assigned as the parameters: a 65B
    load copies nothing and reads pages only when they are used (gpt-fast's way).
    """
    for name in ("params.json", "model.pth"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: no {name}; expected a directory written by convert.py")
    state_dict = load_weights_file(path / "model.pth")
    vocab_size = vocab_rows(state_dict, source=str(path / "model.pth"))
    args = ModelArgs.from_params(path / "params.json", vocab_size=vocab_size)
    with torch.device("meta"):
        model = Transformer(args)
    check_state_dict(model, state_dict, source=str(path / "model.pth"))
    model.load_state_dict(state_dict, assign=True)
    model.init_buffers()  # the RoPE table, the one tensor the file does not hold: still on meta
    return model


def load_sharded(path: Path) -> Transformer:
    """A training checkpoint's DCP shards -> a float32 model on the CPU, in one process: no GPUs or
    process group needed. Fine for the demo and for reading a few epochs; for 65B, export it once
    (checkpoint.py export) and load the result, which is memory-mapped."""
    args = ModelArgs.from_params(path / "params.json")
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    state_dict = model.state_dict()
    with warnings.catch_warnings():  # one process is what we mean: no need to say so
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        safe_dcp_load(state_dict, path / "model", no_dist=True)
    return model


def export(src, dst, dtype=torch.bfloat16):
    """A training checkpoint -> the converted format that sample.py, eval.py and convert.py read.

    Streamed, one tensor at a time: model.pth is written as a skeleton (convert.write_model), then
    each tensor is read from the DCP shards on its own (a one-key state dict), cast, and copied
    into the file's memory map. The peak is about the largest tensor, not the model: a 65B epoch
    exports on any machine with a few GB free. The file is byte for byte what
    torch.save(model.state_dict()) writes (tests/test_checkpoint.py compares them).
    """
    src, dst = Path(src), Path(dst)
    if (why := problem(src)) is not None:
        raise ValueError(why)
    args = ModelArgs.from_params(src / "params.json")
    saved = read_metadata(src / "model").state_dict_metadata
    with torch.device("meta"):
        state_dict = Transformer(args).state_dict()
    layout = type(state_dict)((k, t.to(dtype)) for k, t in state_dict.items())  # meta: shapes only
    layout._metadata = state_dict._metadata  # as torch.save(model.state_dict()) writes it
    missing = sorted(set(layout) - set(saved))
    if missing:
        raise ValueError(f"{src / 'model'}: no {', '.join(missing[:3])}: not this model's weights")

    def fill(out: dict[str, torch.Tensor]):
        for name, target in out.items():
            one = {name: torch.empty(saved[name].size, dtype=saved[name].properties.dtype)}
            with warnings.catch_warnings():  # one process is what we mean: no need to say so
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                safe_dcp_load(one, src / "model", no_dist=True)
            target.copy_(one[name])  # the cast to dtype, into the mapped file

    with convert.staging(dst) as tmp:
        params = asdict(args)
        params.pop("resid_dropout")  # a training setting, not part of the model's shape
        (tmp / "params.json").write_text(json.dumps(params, indent=2))
        shutil.copyfile(src / "tokenizer.model", tmp / "tokenizer.model")
        convert.write_model(tmp / "model.pth", layout, fill)


def main(argv):
    a = build_parser().parse_args(argv)
    try:
        if a.command == "list":
            if not Path(a.run).is_dir():
                raise FileNotFoundError(f"{a.run}: no such run folder")
            for path in list_checkpoints(a.run):
                state = read_state(path)
                optim = "weights+optimizer" if (path / "optim").is_dir() else "weights only"
                print(f"{path.name:>14}  step {state['step']:>6}  epoch {state['epoch']:>3}  {optim}")
            for why in damaged(a.run):
                print(f"skipped: {why}", file=sys.stderr)
        else:
            export(a.checkpoint, a.dst, DTYPES[a.dtype])
            print(f"exported {a.checkpoint} -> {a.dst}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
