"""
Peak resident memory of `checkpoint.py export` on a training checkpoint of a few GB, against loading
the whole model and torch.save-ing it (the export before it streamed), and what that says for 65B.

    python bench/bench_export.py                          # a random 1.26B model, float32 DCP (5.0 GB), under /tmp
    python bench/bench_export.py --workdir /scratch --dim 4096 --n_layers 16
    python bench/bench_export.py --help

The checkpoint is what train.py's ranks write (params.json with EOT in the vocabulary,
tokenizer.model, state.json, model/ by torch.distributed.checkpoint), with random float32 weights,
under --workdir (on a disk, not tmpfs; deleted afterwards). Each arm runs in a fresh process:
    floor    import checkpoint.py and read the DCP metadata: the interpreter, torch, nothing else
    stream   checkpoint.export (bf16): one tensor at a time from the shards into the file's memory map
    whole    checkpoint.load_model (bf16) then torch.save(model.state_dict()): the model in memory
peak RSS is the kernel's VmHWM (anonymous and mapped file pages); anon and file are the peaks of
RssAnon and RssFile polled every 10 ms (bench_memory.py's RssPoller). File pages are page cache the
kernel can drop; the anonymous part is what the process holds. Both files are then compared byte
for byte, and the streamed one is checked as a zip (every record's CRC-32).

65B: the streamed peak above the floor is compared with the largest tensor read (a float32 tensor
of the shards, cast once); 65B's largest is its embedding (32,001 x 8,192 float32, 1.05 GB), so its
export should need about the floor plus that ratio times 1.05 GB, where loading it whole would hold
the 130.6 GB bf16 model (and more while it is read).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import checkpoint  # noqa: E402
from bench_memory import RssPoller, random_model  # noqa: E402
from cli import parse_config  # noqa: E402
from common import OthersCPU, machine, markdown, record, wait_quiet  # noqa: E402


@dataclass
class BenchConfig:
    dim: int = 2048  # the checkpoint's shape: 1.26B parameters at these values, 5.0 GB in float32
    n_layers: int = 22
    n_heads: int = 16
    workdir: str = "/tmp"  # where the checkpoint and the exports are written (and removed)
    results: str = "bench/results.md"  # relative to the repository; the table is appended; "" to skip
    worker: str = ""  # internal: floor, stream or whole
    src: str = ""  # internal
    dst: str = ""  # internal


GB = 1e9
LARGEST_65B = 32001 * 8192 * 4  # bytes of 65B's float32 embedding (or output), its largest tensor


def make_checkpoint(cfg: BenchConfig, path: Path) -> tuple[int, int]:
    """A random training checkpoint; returns (parameters, bytes of its largest tensor)."""
    args, state, tokenizer = random_model(cfg.dim, cfg.n_layers, cfg.n_heads, with_eot=True)  # fine-tuned
    path.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process, on purpose
        torch.distributed.checkpoint.save(state, checkpoint_id=path / "model", no_dist=True)
    (path / "params.json").write_text(json.dumps(asdict(args)))
    shutil.copyfile(tokenizer, path / "tokenizer.model")
    (path / "state.json").write_text(json.dumps(dict(step=1, epoch=1, world_size=1, config={})))
    return sum(v.numel() for v in state.values()), max(v.numel() * 4 for v in state.values())


def worker(cfg: BenchConfig):
    poller = RssPoller()
    t0 = time.perf_counter()
    if cfg.worker == "floor":
        checkpoint.read_metadata(Path(cfg.src) / "model")
    elif cfg.worker == "stream":
        checkpoint.export(cfg.src, cfg.dst)
    else:
        model, _ = checkpoint.load_model(cfg.src, dtype=torch.bfloat16)
        Path(cfg.dst).mkdir()
        torch.save(model.state_dict(), Path(cfg.dst) / "model.pth")
    seconds = time.perf_counter() - t0
    print(json.dumps(dict(seconds=seconds, **poller.stop())))


def spawn(cfg: BenchConfig, kind: str, src: Path, dst: Path) -> tuple[dict, float]:
    cmd = [sys.executable, str(ROOT / "bench/bench_export.py"), "--worker", kind, "--src", str(src),
           "--dst", str(dst)]
    with OthersCPU() as others:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        raise RuntimeError(f"{kind} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.splitlines()[-1]), others.share


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def main(argv):
    cfg = parse_config(BenchConfig, argv)[0]
    if cfg.worker:
        return worker(cfg)
    work = Path(cfg.workdir) / f"lima-bench-export-{os.getpid()}"
    try:
        n_params, largest = make_checkpoint(cfg, work / "epoch-01")
        dcp_bytes = sum(p.stat().st_size for p in (work / "epoch-01/model").iterdir())
        load_before = wait_quiet()
        results = {}
        for kind in ("floor", "stream", "whole"):
            results[kind] = spawn(cfg, kind, work / "epoch-01", work / kind)
        streamed, whole = work / "stream/model.pth", work / "whole/model.pth"
        same = sha256(streamed) == sha256(whole)
        with zipfile.ZipFile(streamed) as z:
            bad = z.testzip()  # reads every record, checks its CRC-32: the first bad one's name, or None
        out_bytes = streamed.stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor = results["floor"][0]["hwm"]
    rows = []
    for kind, (r, others) in results.items():
        rows.append([kind, f"{r['hwm'] / GB:.2f}", f"{(r['hwm'] - floor) / GB:.2f}", f"{r['anon'] / GB:.2f}",
                     f"{r['file'] / GB:.2f}", f"{r['seconds']:.1f}", f"{others:.0%}"])
    header = ["arm", "peak RSS GB", "above the floor GB", "peak anon GB", "peak file GB", "seconds", "others' CPU"]
    above = results["stream"][0]["hwm"] - floor
    title = (f"## {datetime.now():%Y-%m-%d %H:%M} export memory: {machine(load_before)}, a random "
             f"{n_params / 1e9:.2f}B model (dim {cfg.dim}, {cfg.n_layers} layers), DCP checkpoint "
             f"{dcp_bytes / GB:.2f} GB float32 -> model.pth {out_bytes / GB:.2f} GB bf16")
    command = f"    python bench/bench_export.py {' '.join(argv)}".rstrip()
    notes = [f"The streamed model.pth is byte for byte the whole-model torch.save's: {'yes' if same else 'NO'}; "
             f"its zip checks (every CRC-32): {'yes' if bad is None else 'NO, from ' + bad}.",
             f"Streamed: {above / GB:.2f} GB above the floor, {above / largest:.2f}x the largest tensor "
             f"({largest / GB:.2f} GB float32) and {above / dcp_bytes:.1%} of the checkpoint. For 65B "
             f"(largest tensor {LARGEST_65B / GB:.2f} GB) that ratio gives about "
             f"{(floor + above / largest * LARGEST_65B) / GB:.1f} GB peak RSS, file pages included, where "
             f"the whole model in bf16 is 130.6 GB."]
    text = "\n".join([title, "", command, "", *markdown(header, rows), "", *notes])
    record(text, cfg.results)


if __name__ == "__main__":
    main(sys.argv[1:])
