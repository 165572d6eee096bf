"""
Peak memory of convert.py on fake Meta checkpoints with LLaMA-65B's own tensor shapes, scaled to 65B.

    python bench/bench_convert.py                       # depths 1, 2, 3 of 65B's layers, MP 8, bf16
    python bench/bench_convert.py --depths 1,2 --mp 4 --workdir /scratch
    python bench/bench_convert.py --help

How it scales. convert.py fills model.pth one layer at a time and unmaps everything a layer touched
before the next, so its peak should follow the size of one layer, not the size of the model. Every
checkpoint here has 65B's exact tensors (dim 8192, feed-forward 22016, vocab 32000, split over 8
shards) but only a few layers: one layer is 1.62 GB, the whole 65B 130.6 GB. A straight line through
the measured peaks against the checkpoint's total size, evaluated at 130.6 GB, is the extrapolation;
its slope says how much (if anything) the peak grows with the model. The deepest checkpoint is also
loaded by checkpoint.load_converted (memory-mapped: nothing should be read), exported to HF
(--to_hf, files of at most 5 GB, so its peak follows the file size) and imported back.

Each command runs as a child process: its peak resident memory comes from the kernel (wait4's
ru_maxrss, which counts the file pages mapped at the time too), and the split into anonymous memory
and file-backed pages from polling /proc/PID/status. Checkpoints are written under --workdir, which
must be on a disk, not tmpfs (files there are memory), and removed afterwards. The tokenizer is only
copied, except by --to_hf, which needs one with 32,000 pieces: Meta's, from shared/tokenizers.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert import shard_dim  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

GB = 1e9
LLAMA_65B = ModelArgs.from_name("llama-65b", vocab_size=32000)
TOKENIZERS = [ROOT / "shared/tokenizers/llama/tokenizer.model", ROOT.parent / "shared/tokenizers/llama/tokenizer.model"]


def nbytes(args: ModelArgs, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        return Transformer(args).num_params() * dtype.itemsize


def fake_meta(src: Path, args: ModelArgs, mp: int, dtype: torch.dtype, tokenizer: Path):
    """Meta's layout with random weights: one shard in memory at a time."""
    src.mkdir(parents=True)
    with torch.device("meta"):
        shapes = {k: list(t.shape) for k, t in Transformer(args).state_dict().items()}
    for i in range(mp):
        shard = {}
        for k, shape in shapes.items():
            if shard_dim(k) is None:  # a norm: the same copy in every shard
                shard[k] = torch.ones(shape, dtype=dtype)
                continue
            shape = [n // mp if d == shard_dim(k) else n for d, n in enumerate(shape)]
            shard[k] = torch.randn(shape, dtype=dtype)
        torch.save(shard, src / f"consolidated.{i:02d}.pth")
        del shard
    params = dict(dim=args.dim, multiple_of=args.multiple_of, n_heads=args.n_heads, n_layers=args.n_layers,
                  norm_eps=args.norm_eps, vocab_size=-1)
    (src / "params.json").write_text(json.dumps(params))
    shutil.copyfile(tokenizer, src / "tokenizer.model")


# The kernel's peak for a child (wait4's ru_maxrss) starts from the pages it shared with its parent
# at fork and survives exec, and this process holds torch and a shard's worth of pages. So each
# command is started by a bare interpreter of a few MB, which reports its own child's peak.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
print(pid, flush=True)
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, flush=True)  # ru_maxrss: KiB on Linux
"""


def measure(*argv: str) -> dict:
    """Run `python argv` in the repository; return its peak memory (GB) and time."""
    start = time.perf_counter()
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, *argv], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pid = int(launcher.stdout.readline())
    peaks, done = {"RssAnon": 0, "RssFile": 0}, threading.Event()

    def poll():  # the anonymous / file-backed split has no kernel high-water mark: sample it
        while not done.wait(0.02):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                return
            for line in status.splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)

    poller = threading.Thread(target=poll)
    poller.start()
    out, err = launcher.communicate()
    done.set()
    poller.join()
    code, maxrss_kib = (int(v) for v in out.split())
    if code:
        sys.exit(f"python {' '.join(argv)} failed: {err}")
    return dict(peak=maxrss_kib * 1024 / GB, anon=peaks["RssAnon"] / GB, file=peaks["RssFile"] / GB,
                seconds=time.perf_counter() - start)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="1,2,3", help="numbers of 65B-shaped layers, one checkpoint each")
    p.add_argument("--mp", type=int, default=8, help="Meta shards (65B's release has 8)")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where the checkpoints go (a disk)")
    p.add_argument("--tokenizer", default=next((t for t in TOKENIZERS if t.is_file()), None),
                   help="Meta's tokenizer.model (32,000 pieces)")
    p.add_argument("--results", default="bench/results.md", help="append the table here ('' to skip)")
    cfg = p.parse_args(argv)
    if cfg.tokenizer is None:
        sys.exit("no tokenizer: pass --tokenizer PATH to Meta's tokenizer.model (32,000 pieces)")
    dtype, depths = torch.bfloat16, [int(d) for d in cfg.depths.split(",")]
    layer_gb = (nbytes(replace(LLAMA_65B, n_layers=1), dtype) - nbytes(replace(LLAMA_65B, n_layers=0), dtype)) / GB
    rows = []

    def step(what: str, total_gb: float, *argv: str):
        print(f"{what} ...", file=sys.stderr, flush=True)
        rows.append(dict(what=what, total=total_gb, **measure(*argv)))

    step("floor: python, import torch and convert", 0.0, "-c", "import convert")
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=cfg.workdir))
    try:
        for depth in depths:
            args = replace(LLAMA_65B, n_layers=depth)
            src, dst, size = work / f"meta-{depth}" / "model", work / f"out-{depth}", nbytes(args, dtype) / GB
            fake_meta(src, args, cfg.mp, dtype, Path(cfg.tokenizer))
            step(f"Meta MP {cfg.mp} -> model.pth, {depth} layer(s)", size, "convert.py", str(src), str(dst))
            shutil.rmtree(src.parent)
            if depth == max(depths):  # on the largest: loading it, and the way out to HF and back
                step(f"checkpoint.load_converted (CPU, mmap), {depth} layer(s)", size, "-c",
                     f"from pathlib import Path; import checkpoint; checkpoint.load_converted(Path({str(dst)!r}))")
                step(f"--to_hf, {depth} layer(s)", size, "convert.py", "--to_hf", str(dst), str(work / "hf"))
                step(f"HF safetensors -> model.pth, {depth} layer(s)", size,
                     "convert.py", str(work / "hf"), str(work / "back"))
                shutil.rmtree(work / "hf")
                shutil.rmtree(work / "back")
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # Peak against total size, over the Meta conversions: least squares, then evaluated at 65B.
    meta = [r for r in rows if r["what"].startswith("Meta")]
    xs, ys = [r["total"] for r in meta], [r["peak"] for r in meta]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / max(sum((x - x_mean) ** 2 for x in xs), 1e-9)
    total_65b = nbytes(LLAMA_65B, dtype) / GB
    peak_65b = y_mean + slope * (total_65b - x_mean)

    header = ["command", "checkpoint GB", "peak RSS GB", "peak anon GB", "peak file-backed GB", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [f"| {r['what']} | {r['total']:.2f} | {r['peak']:.2f} | {r['anon']:.2f} | {r['file']:.2f} | "
              f"{r['seconds']:.1f} |" for r in rows]
    ram = int(Path("/proc/meminfo").read_text().split()[1]) * 1024 / GB
    title = (f"## {datetime.now():%Y-%m-%d %H:%M} convert: {platform.platform()}, {os.cpu_count()} CPUs, "
             f"{ram:.0f} GB RAM, torch {torch.__version__}, bf16, LLaMA-65B tensor shapes (one layer "
             f"{layer_gb:.2f} GB)")
    floor = rows[0]["peak"]  # the interpreter with torch and convert.py imported: under every row
    summary = (f"Peak RSS against checkpoint size, fitted over the Meta rows: {slope * 1000:+.1f} MB per GB of "
               f"checkpoint; at LLaMA-65B's {total_65b:.1f} GB that gives a peak of {peak_65b:.2f} GB "
               f"({peak_65b / total_65b:.1%} of the checkpoint). The model behind it: about the floor plus two "
               f"layers (the one read, the one written), {floor:.2f} + 2 x {layer_gb:.2f} = "
               f"{floor + 2 * layer_gb:.2f} GB. Of the peak, all but the anonymous part is file pages, "
               f"which the kernel can drop or write back under memory pressure.")
    table = "\n".join([title, "", f"    python bench/bench_convert.py {' '.join(argv)}".rstrip(), "", *lines,
                       "", summary])
    print(table)
    if cfg.results:
        with open(ROOT / cfg.results, "a") as f:  # others append to this file too: never overwrite
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
