"""
The three --weights modes, each with and without --step_in_backward, on the same fine-tune: what
bf16 storage costs in loss and buys in memory, and whether LIMA's last updates (lr 1e-6) survive.

    python bench/bench_precision.py                       # about 15 minutes on 2 cores
    python bench/bench_precision.py --epochs 2 --tail_steps 20 --memory_steps 2 --results ""   # a quick look
    python bench/bench_precision.py --help

Every run is train.py itself in a fresh process, on the project's demo data (144 conversations,
the project's tokenizer), seed 0. Three parts:
  A. the demo fine-tune (data/base, TOY's learning rate: train.py's defaults) for --epochs: per-step
     loss against fp32's ordinary step (mean and largest absolute difference), final dev loss,
     peak RSS of the process, median step time. Every mode packs rows of up to 16,384 tokens
     (--step_in_backward's row for the demo's batch of 8), so every step is one row in every mode
     and the differences are the precision's alone;
  B. a 100m-shaped model (bench_decode.MODELS["100m"] at the demo's vocabulary of 1,025, random
     weights, --init) for --memory_steps steps: the memory plan's sharded state (parameters,
     gradients, optimizer state), which is what the modes change, beside the peak RSS of the
     process, which adds Python, torch, the allocator's cached memory and the CPU's float32
     compute copies (CPU runs compute in float32 whatever the weights), and step time;
  C. LIMA's tail: from the fp32 run's last epoch of part A (exported to bf16, so that every mode
     starts from the same values), --tail_steps steps at a constant lr of 1e-6 without dropout,
     ordinary step (stepping in backward trains bitwise the same weights: tests/test_step_in_backward.py):
     the share of weights whose stored value moved, and the distance to fp32's end point
     relative to the distance fp32 travelled, for the matrices and for the RMSNorm gains; the
     floor is fp32's own end point rounded to bf16, the nearest any bf16 storage can be.
The real LIMA set is not used: one of its epochs at batch 64 takes minutes a step here.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import checkpoint  # noqa: E402
import memory  # noqa: E402
from bench_decode import MODELS  # noqa: E402
from cli import parse_config  # noqa: E402
from common import machine, markdown, wait_quiet  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

MODES = [(w, s) for w in memory.WEIGHTS for s in ("false", "true")]
ROW = 16384  # tokens in a row, every mode: --step_in_backward's for the demo's global batch of 8


@dataclass
class BenchConfig:
    epochs: int = 5  # part A: epochs of the demo fine-tune (5 steps each)
    memory_steps: int = 3  # part B: steps of the 100m model per mode
    tail_steps: int = 100  # part C: steps at lr 1e-6 (a multiple of the demo's 5 steps an epoch)
    workdir: str = "/tmp/lima-bench-precision"  # deleted and rewritten
    results: str = "bench/results.md"  # relative to the repository; the tables are appended; "" to skip


def train(out: Path, *args) -> dict:
    """Run train.py in a fresh process: its per-step losses, dev losses, step time and peak RSS."""
    cmd = [sys.executable, "train.py", "--out", str(out), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return dict(losses=[r["loss"] for r in steps], dev=[r["dev_loss"] for r in records if "dev_loss" in r],
                step_s=statistics.median(r["tokens"] / r["tokens_per_s"] for r in steps[1:] or steps),
                rss_gb=usage.ru_maxrss * 1024 / 1e9)  # Linux reports kB


def part_a(cfg: BenchConfig, work: Path) -> tuple[list[str], Path]:
    runs = {}
    for weights, in_backward in MODES:
        runs[weights, in_backward] = train(work / f"a-{weights}-{in_backward}", "--epochs", cfg.epochs,
                                           "--weights", weights, "--step_in_backward", in_backward,
                                           "--max_tokens", ROW)
    ref = runs["fp32", "false"]["losses"]
    rows = []
    for (weights, in_backward), r in runs.items():
        diffs = [abs(a - b) for a, b in zip(r["losses"], ref)]
        rows.append([weights, in_backward, f"{statistics.mean(diffs):.2e}", f"{max(diffs):.2e}",
                     f"{r['dev'][-1]:.4f}", f"{r['rss_gb']:.2f}", f"{r['step_s']:.2f}"])
    table = markdown(["weights", "step_in_backward", "mean abs loss diff to fp32", "max abs loss diff",
                      "final dev loss", "peak RSS GB", "step s"], rows)
    last = checkpoint.list_checkpoints(work / "a-fp32-false")[-1]
    return [f"A. the demo fine-tune of data/base, {cfg.epochs} epochs ({len(ref)} steps), "
            f"loss differences against fp32's ordinary step:", "", *table], last


def part_b(cfg: BenchConfig, work: Path) -> list[str]:
    init = work / "b-init"
    init.mkdir()
    args = ModelArgs(**{**asdict(MODELS["100m"]), "vocab_size": 1024})  # the demo tokenizer's base
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    torch.save(model.state_dict(), init / "model.pth")
    (init / "params.json").write_text(json.dumps({k: v for k, v in asdict(args).items() if k != "resid_dropout"}))
    shutil.copyfile(ROOT / "data/tokenizer.model", init / "tokenizer.model")
    n_params = model.num_params()
    del model
    rows = []
    for weights, in_backward in MODES:
        r = train(work / f"b-{weights}-{in_backward}", "--init", init, "--stop_after", cfg.memory_steps,
                  "--global_batch", 8, "--dev", "", "--weights", weights, "--step_in_backward", in_backward,
                  "--max_tokens", ROW)
        p = memory.plan(ModelArgs(**{**asdict(args), "vocab_size": 1025}),
                        memory.Options(world_size=1, max_tokens=ROW, weights=weights, compute_bytes=4,
                                       step_in_backward=in_backward == "true"))["gpu"]
        state = p["params"] + p["grads"] + p["optim"]
        rows.append([weights, in_backward, f"{state / 1e9:.2f}", f"{r['rss_gb']:.2f}", f"{r['step_s']:.1f}"])
    table = markdown(["weights", "step_in_backward", "planned state GB", "peak RSS GB", "step s"], rows)
    return [f"B. {n_params / 1e6:.0f}M parameters (100m shape, vocab 1,025), random weights via --init, "
            f"{cfg.memory_steps} steps at global batch 8, one process:", "", *table]


def part_c(cfg: BenchConfig, work: Path, trained: Path) -> list[str]:
    init = work / "c-init"
    checkpoint.export(trained, init)  # bf16: every mode starts from the same bf16 values
    start = torch.load(init / "model.pth", weights_only=True)
    epochs = cfg.tail_steps // 5
    ends = {}
    for weights in memory.WEIGHTS:
        out = work / f"c-{weights}"
        train(out, "--init", init, "--epochs", epochs, "--lr", 1e-6, "--final_lr", 1e-6, "--resid_dropout", 0,
              "--global_batch", 8, "--dev", "", "--keep_optim", 0, "--weights", weights,
              "--step_in_backward", "false")
        model, _ = checkpoint.load_model(checkpoint.list_checkpoints(out)[-1])
        ends[weights] = {k: v.double() for k, v in model.state_dict().items()}
    ref = ends["fp32"]
    rows = []
    for kind, keep in (("matrices", lambda t: t.dim() == 2), ("norm gains", lambda t: t.dim() == 1)):
        names = [k for k, t in start.items() if keep(t)]
        w0 = torch.cat([start[k].double().flatten() for k in names])
        w_ref = torch.cat([ref[k].flatten() for k in names])
        travel = (w_ref - w0).norm()
        floor = (w_ref.bfloat16().double() - w_ref).norm() / travel
        for weights, end in ends.items():
            w = torch.cat([end[k].flatten() for k in names])
            moved = (w != w0).double().mean().item()
            # the distance gone in fp32's direction, weight by weight, over fp32's: 1 if unbiased
            progress = ((w - w0) * torch.sign(w_ref - w0)).sum() / (w_ref - w0).abs().sum()
            rows.append([kind, weights, f"{moved:.1%}", f"{progress.item():.3f}",
                         f"{((w - w_ref).norm() / travel).item():.3f}", f"{floor.item():.3f}"])
    table = markdown(["tensors", "weights", "stored value moved", "progress along fp32's path",
                      "distance to fp32 / fp32's travel", "floor (fp32 rounded to bf16)"], rows)
    return [f"C. LIMA's tail: {cfg.tail_steps} steps at lr 1e-6 from {trained.name} of part A's fp32 run "
            f"(exported to bf16), no dropout:", "", *table]


def main(argv):
    cfg = parse_config(BenchConfig, argv)[0]
    work = Path(cfg.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    load = wait_quiet()
    a, trained = part_a(cfg, work)
    b = part_b(cfg, work)
    c = part_c(cfg, work, trained)
    lines = [f"## {datetime.now():%Y-%m-%d %H:%M} precision: {machine(load)}", "",
             "    python bench/bench_precision.py " + " ".join(argv), "", *a, "", *b, "", *c, ""]
    print("\n".join(lines))
    if cfg.results:
        with open(ROOT / cfg.results, "a") as f:
            f.write("\n" + "\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
