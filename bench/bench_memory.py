"""
Peak resident memory per rank while train.py loads a converted checkpoint of a few GB, 1 and 2 ranks.

    python bench/bench_memory.py                          # a random 1.26B model, float32 (5.0 GB), under /tmp
    python bench/bench_memory.py --workdir /scratch --ranks 1,2,4
    python bench/bench_memory.py --help

The checkpoint is convert.py's format (params.json, model.pth, tokenizer.model: Meta's tokenizer when
shared/tokenizers has it, else the project's), written with random weights under --workdir, which
must be on a disk, not tmpfs, and deleted afterwards. Each rank runs train.py's own load path,
train.build_model with --init: the model is built on the meta device, wrapped for activation
checkpointing and sharded by FSDP2, materialised (each rank allocates only its shard), then
load_pretrained_ copies each rank's rows out of the memory-mapped model.pth, adding the EOT row.

The kernel's VmHWM is the peak of resident memory, which counts the mapped file pages a rank has
touched as well as its own (anonymous) memory; a thread polls /proc/self/status every 10 ms for the
split. File pages are the page cache, shared between ranks and dropped by the kernel under memory
pressure; the anonymous part is what a rank really holds. The floor is the same process (torch,
train.py, a process group) loading nothing.

The peak memory of a training step, ours against HF's, is in bench_train.py's table (peak RSS per
rank, every arm in a fresh process): python bench/bench_train.py --models 100m ...
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import train  # noqa: E402
from cli import parse_config  # noqa: E402
from common import LLAMA_TOKENIZER, OthersCPU, machine, markdown, record, wait_quiet  # noqa: E402
from data import Tokenizer  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402


@dataclass
class BenchConfig:
    dim: int = 2048  # the checkpoint's shape: 1.26B parameters at these values, 5.0 GB in float32
    n_layers: int = 22
    n_heads: int = 16
    ranks: str = "1,2"  # comma-separated process counts (torchrun, gloo)
    workdir: str = "/tmp"  # where the checkpoint is written (and removed)
    results: str = "bench/results.md"  # relative to the repository; the table is appended; "" to skip
    worker: str = ""  # internal: floor or load
    init: str = ""  # internal
    out: str = ""  # internal


GB = 1e9


def random_model(dim: int, n_layers: int, n_heads: int, with_eot: bool) -> tuple[ModelArgs, dict, Path]:
    """A seeded random model's float32 weights (norm gains 1, matrices N(0, 0.02)), its args and the
    tokenizer it fits (Meta's when shared/ has it, else the project's); with_eot: its vocabulary
    includes LIMA's EOT, as a fine-tuned model's does, else it is a base model's."""
    tokenizer = LLAMA_TOKENIZER if LLAMA_TOKENIZER.is_file() else ROOT / "data/tokenizer.model"
    tok = Tokenizer(tokenizer)
    vocab_size = tok.vocab_size if with_eot else tok.n_base
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab_size)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    torch.manual_seed(0)
    state = {k: torch.ones(s) if len(s) == 1 else torch.randn(s) * 0.02 for k, s in shapes.items()}
    return args, state, tokenizer


def make_checkpoint(cfg: BenchConfig, path: Path) -> tuple[int, int]:
    """A random base model in convert.py's format; returns (parameters, bytes of model.pth)."""
    args, state, tokenizer = random_model(cfg.dim, cfg.n_layers, cfg.n_heads, with_eot=False)
    path.mkdir(parents=True)
    params = {k: v for k, v in asdict(args).items() if k not in ("resid_dropout", "vocab_size")}
    (path / "params.json").write_text(json.dumps(params))
    torch.save(state, path / "model.pth")
    shutil.copyfile(tokenizer, path / "tokenizer.model")
    return sum(v.numel() for v in state.values()), (path / "model.pth").stat().st_size


class RssPoller:
    """Peaks of anonymous and file-backed resident memory, from /proc/self/status every 10 ms."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.running = True
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        while self.running:
            for line in Path("/proc/self/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)
            time.sleep(0.01)

    def stop(self) -> dict:
        self.running = False
        self.thread.join()
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return dict(hwm=int(status["VmHWM"].split()[0]) * 1024, anon=self.peak["RssAnon"], file=self.peak["RssFile"])


def worker(cfg: BenchConfig):
    poller = RssPoller()
    rank, world_size, device = train.setup_distributed()
    t0 = time.perf_counter()
    shard_bytes = 0
    if cfg.worker == "load":
        tcfg = train.TrainConfig(init=cfg.init)  # ac full, fp32 weights: train.py's defaults
        args = train.model_args(tcfg, Tokenizer(Path(cfg.init) / "tokenizer.model"))
        tcfg = train.resolve_size_defaults(tcfg, args)
        args.resid_dropout = tcfg.resid_dropout
        model = train.build_model(tcfg, args, device)
        shard_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    seconds = time.perf_counter() - t0
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    result = dict(rank=rank, seconds=seconds, shard=shard_bytes, **poller.stop())
    Path(f"{cfg.out}.{rank}").write_text(json.dumps(result))


def spawn(cfg: BenchConfig, kind: str, ranks: int, init: Path) -> tuple[list[dict], float]:
    out = init.parent / f"result-{kind}-{ranks}"
    script = [str(ROOT / "bench/bench_memory.py"), "--worker", kind, "--init", str(init), "--out", str(out)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *script]
           if ranks > 1 else [sys.executable, *script])
    with OthersCPU() as others:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{kind} on {ranks} rank(s) failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(ranks)]
    return results, others.share


def main(argv):
    cfg = parse_config(BenchConfig, argv)[0]
    if cfg.worker:
        return worker(cfg)
    work = Path(cfg.workdir) / f"lima-bench-memory-{os.getpid()}"
    try:
        n_params, file_bytes = make_checkpoint(cfg, work / "ckpt")
        load_before = wait_quiet()
        rows = []
        for ranks in [int(r) for r in cfg.ranks.split(",")]:
            for kind in ("floor", "load"):
                results, others = spawn(cfg, kind, ranks, work / "ckpt")
                for r in results:
                    rows.append([kind, ranks, r["rank"], f"{r['shard'] / GB:.2f}", f"{r['hwm'] / GB:.2f}",
                                 f"{r['anon'] / GB:.2f}", f"{r['file'] / GB:.2f}", f"{r['seconds']:.1f}",
                                 f"{others:.0%}"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = ["what", "ranks", "rank", "shard GB (fp32)", "peak RSS GB", "peak anon GB", "peak file GB",
              "seconds", "others' CPU"]
    title = (f"## {datetime.now():%Y-%m-%d %H:%M} load memory: {machine(load_before)}, a random "
             f"{n_params / 1e9:.2f}B model (dim {cfg.dim}, {cfg.n_layers} layers), model.pth "
             f"{file_bytes / GB:.2f} GB float32")
    command = f"    python bench/bench_memory.py {' '.join(argv)}".rstrip()
    notes = ["train.build_model with --init (ac full): meta device, FSDP2, to_empty, load_pretrained_ from "
             "the mmapped model.pth. peak RSS = VmHWM; anon and file: peaks of RssAnon and RssFile polled "
             "every 10 ms (not necessarily at the same moment). floor: the same process loading nothing. "
             "seconds: build and load."]
    text = "\n".join([title, "", command, "", *markdown(header, rows), "", *notes])
    record(text, cfg.results)


if __name__ == "__main__":
    main(sys.argv[1:])
