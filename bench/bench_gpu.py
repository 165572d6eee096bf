"""
Model FLOPs utilisation (MFU) of train.py's path on one GPU: a ~1B model, rows of 2048 tokens, bf16
compute, FSDP2 on a process group of one, activation checkpointing on and off, compile on and off.

On a GPU machine (H100, H200, A100: the peak is looked up from the device's name):
    pip install -r requirements.txt
    python bench/bench_gpu.py
    python bench/bench_gpu.py --ac full,none,selective --compile false,true --steps 20
Decode against the memory-bandwidth bound is bench_decode.py's (it reports the share of the bound):
    python bench/bench_decode.py --device cuda --dtype bf16 --compile
A check of this script's code path on the CPU (numbers meaningless):
    python bench/bench_gpu.py --device cpu --model tiny --dtype fp32 --tokens 256 --steps 1 --warmup 1 --results ""
Every option, with its default:
    python bench/bench_gpu.py --help

MFU = model FLOPs per second / the GPU's dense bf16 peak (train.PEAK_BF16_FLOPS: H100 SXM and H200
989e12, H100 PCIe 756e12, A100 312e12). Model FLOPs per step are train.step_flops: 6 x (matmul
parameters) x tokens + 6 x n_layers x dim x (sum over conversations of length^2), the second term
being causal attention (q k^T and the weighted sum of v, half of the square, forward and backward).
The embedding lookup and the RMSNorm gains do not count, nor does the recomputation of activation
checkpointing (MFU counts useful work: checkpointing costs MFU, as it should). Every row here is one
conversation of --tokens tokens, so the step is --micro_steps rows of --tokens.
"""

import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import train  # noqa: E402
from bench_decode import MODELS  # noqa: E402  (tiny, 100m, 1b: the same shapes as the decode benchmark)
from cli import parse_config  # noqa: E402
from common import machine, markdown, record  # noqa: E402
from data import IGNORE  # noqa: E402


@dataclass
class BenchConfig:
    model: str = "1b"  # a name from bench_decode.py MODELS: 1b is 953M parameters at vocab 32001
    tokens: int = 2048  # tokens in a row (one conversation, every target trained)
    micro_steps: int = 8  # rows per optimizer step (gradient accumulation)
    ac: str = "full,none"  # comma-separated activation checkpointing modes to measure
    compile: str = "false,true"  # comma-separated: torch.compile each block or not
    dtype: str = "bf16"  # compute dtype (weights and AdamW state stay float32)
    steps: int = 10  # timed optimizer steps (the median is reported)
    warmup: int = 3  # untimed steps first (compilation happens here)
    device: str = "cuda"  # cuda; cpu only to check this script's code path
    results: str = "bench/results.md"  # relative to the repository; the table is appended; "" to skip


def peak_flops(device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in train.PEAK_BF16_FLOPS.items() if k in name), 0.0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(cfg: BenchConfig, ac: str, compiled: bool, device) -> list:
    args = replace(MODELS[cfg.model], max_seq_len=cfg.tokens)
    tcfg = train.TrainConfig(init="", ac=ac, compile=compiled, dtype=cfg.dtype, max_tokens=cfg.tokens, resid_dropout=0.0)
    model = train.build_model(tcfg, args, device)
    optimizer = train.build_optimizer(model, tcfg)
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(cfg.micro_steps):
        tokens = torch.randint(3, args.vocab_size, (cfg.tokens + 1,), generator=g).tolist()
        examples.append(dict(tokens=tokens[:-1], targets=tokens[1:], n_trained=cfg.tokens))
    rows = [[i] for i in range(cfg.micro_steps)]
    n_global = cfg.micro_steps * cfg.tokens
    flops = train.step_flops(args, [cfg.tokens] * cfg.micro_steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    times = []
    for step in range(cfg.warmup + cfg.steps):
        sync(device)
        t0 = time.perf_counter()
        train.run_micro_steps(model, examples, rows, n_global, device, 1)
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    peak = peak_flops(device)
    mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    row = [cfg.model, f"{model.num_params() / 1e6:.0f}M", ac, str(compiled).lower(), f"{n_global / dt:,.0f}",
           f"{flops / dt / 1e12:.1f}", f"{flops / dt / peak:.1%}" if peak else "-", f"{mem:.1f}"]
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv):
    cfg = parse_config(BenchConfig, argv)[0]
    if cfg.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no GPU here (this benchmark is for a GPU machine; --device cpu only checks the code path)")
    assert IGNORE not in (0, 1)  # every target of the synthetic rows is trained
    if cfg.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # train.setup_distributed picks gloo and the CPU
    _, _, device = train.setup_distributed()
    load_before = os.getloadavg()[0]
    rows = [bench(cfg, ac, compiled == "true", device)
            for compiled in cfg.compile.split(",") for ac in cfg.ac.split(",")]
    header = ["model", "params", "ac", "compile", "tokens/s", "model TFLOP/s", "MFU", "peak GB allocated"]
    where = f"{torch.cuda.get_device_name(device)} (bf16 peak {peak_flops(device) / 1e12:.0f} TFLOP/s)" \
        if device.type == "cuda" else "CPU (code-path check only)"
    title = (f"## {datetime.now():%Y-%m-%d %H:%M} GPU train MFU: {machine(load_before)}, {where}, {cfg.dtype} "
             f"compute, fp32 weights and AdamW, FSDP2 on 1 rank, {cfg.micro_steps} rows of {cfg.tokens} tokens "
             f"per step, median of {cfg.steps} steps after {cfg.warmup}")
    command = f"    python bench/bench_gpu.py {' '.join(argv)}".rstrip()
    text = "\n".join([title, "", command, "", *markdown(header, rows)])
    record(text, cfg.results)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
