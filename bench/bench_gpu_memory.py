"""
GPU memory of train.py's six weight configurations against the memory plan, with their speed: a ~1B
model, rows of 2048 tokens, bf16 compute, FSDP2 on a process group of one, activation checkpointing
full; --weights fp32, bf16_kahan, bf16_sr, each with --step_in_backward false and true.

On a GPU machine (H100, H200, A100: the MFU peak is looked up from the device's name):
    pip install -r requirements.txt
    python bench/bench_gpu_memory.py
    python bench/bench_gpu_memory.py --tokens 4096 --micro_steps 4 --steps 20
Only some configurations (comma-separated), e.g. to rerun two:
    python bench/bench_gpu_memory.py --weights bf16_sr --step_in_backward false,true
A check of this script's code path on the CPU (no GPU memory to read: "n/a"; timings meaningless):
    python bench/bench_gpu_memory.py --device cpu --model tiny --dtype fp32 --tokens 128 --steps 1 --warmup 1 --results ""
Every option, with its default:
    python bench/bench_gpu_memory.py --help

Each configuration is built as train.py builds it (train.resolve_size_defaults, build_model,
build_optimizer, StepInBackward) and stepped as train.train steps it: with --step_in_backward true,
one row's forward (train.row_loss), the loss all-reduced, backward (which steps every parameter and
frees its gradient) and the stepper's grad norm; with false, --micro_steps rows through
train.run_micro_steps, clip_grad_norm_, optimizer.step and zero_grad. Every row is one conversation
of --tokens tokens with every target trained; --micro_steps is 1 by default so that both modes step
on the same row (step_in_backward takes exactly one row per step whatever --micro_steps says).

plan GB: memory.plan's gpu_total for those options (world size 1, the compute dtype's bytes,
max_tokens = the row), the number train.py's --memory_check compares with the GPU. peak allocated:
torch.cuda.max_memory_allocated from before the model is built until after the last step, so it
holds the weights, the optimizer state (allocated at the first step) and the worst moment of any
step. Neither counts the CUDA context, NCCL's buffers or blocks the caching allocator holds free
(train.CUDA_RESERVE_GB covers those). MFU = train.step_flops / median step time / the bf16 peak
(train.PEAK_BF16_FLOPS), as in bench_gpu.py.
"""

import gc
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import memory  # noqa: E402
import train  # noqa: E402
from bench_decode import MODELS  # noqa: E402  (tiny, 100m, 1b: the same shapes as the decode benchmark)
from bench_gpu import peak_flops, sync  # noqa: E402
from cli import parse_config  # noqa: E402
from common import machine, markdown, record  # noqa: E402


@dataclass
class BenchConfig:
    model: str = "1b"  # a name from bench_decode.py MODELS: 1b is 953M parameters at vocab 32001
    tokens: int = 2048  # tokens in a row (one conversation, every target trained)
    micro_steps: int = 1  # rows per optimizer step with --step_in_backward false (true takes one)
    weights: str = "fp32,bf16_kahan,bf16_sr"  # comma-separated --weights modes to measure
    step_in_backward: str = "false,true"  # comma-separated --step_in_backward values to measure
    ac: str = "full"  # activation checkpointing: full, selective or none
    dtype: str = "bf16"  # compute dtype
    steps: int = 10  # timed optimizer steps (the median is reported)
    warmup: int = 3  # untimed steps first
    device: str = "cuda"  # cuda; cpu only to check this script's code path
    results: str = "bench/results.md"  # relative to the repository; the table is appended; "" to skip


def release(device):
    """Return the previous configuration's memory and restart the peak count.

    FSDP's modules and hooks, and StepInBackward's hooks on the parameters, hold each other in
    cycles: without gc.collect the last configuration's weights and state would still be
    allocated, and counted in the next one's peak.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench(cfg: BenchConfig, weights: str, in_backward: bool, device) -> tuple[list, int]:
    """One configuration's table row, and the bytes still allocated when it started."""
    release(device)
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    tcfg = train.TrainConfig(init="", weights=weights, step_in_backward=str(in_backward).lower(), ac=cfg.ac,
                             dtype=cfg.dtype, max_tokens=cfg.tokens)
    tcfg = train.resolve_size_defaults(tcfg, MODELS[cfg.model])  # the top layer's dropout, whose masks are memory too
    args = replace(MODELS[cfg.model], max_seq_len=cfg.tokens, resid_dropout=tcfg.resid_dropout)  # a copy
    compute_bytes = 4 if cfg.dtype == "fp32" else 2
    planned = memory.plan(args, memory.Options(world_size=1, gpus_per_node=1, max_tokens=cfg.tokens, ac=cfg.ac,
                                               weights=weights, step_in_backward=in_backward,
                                               compute_bytes=compute_bytes))["gpu_total"]
    model = train.build_model(tcfg, args, device)
    optimizer = train.build_optimizer(model, tcfg, rank=0)
    stepper = train.StepInBackward(model, optimizer, device) if in_backward else None
    n_rows = 1 if in_backward else cfg.micro_steps
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(n_rows):
        tokens = torch.randint(3, args.vocab_size, (cfg.tokens + 1,), generator=g).tolist()
        examples.append(dict(tokens=tokens[:-1], targets=tokens[1:], n_trained=cfg.tokens))
    rows = [[i] for i in range(n_rows)]
    n_global = n_rows * cfg.tokens
    flops = train.step_flops(args, [cfg.tokens] * n_rows)
    model.train()
    times = []
    for step in range(cfg.warmup + cfg.steps):
        sync(device)
        t0 = time.perf_counter()
        if stepper:  # train.train's step with --step_in_backward true
            loss_sum_row = train.row_loss(model, examples, rows[0], device)
            loss = loss_sum_row.detach().clone()
            dist.all_reduce(loss)
            loss = loss.item() / n_global
            (loss_sum_row / n_global).backward()  # world size 1
            stepper.grad_norm()
        else:  # and with false
            loss = train.run_micro_steps(model, examples, rows, n_global, device, 1)
            dist.all_reduce(loss)
            loss = loss.item() / n_global
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    peak = peak_flops(device)
    if device.type == "cuda":
        measured = torch.cuda.max_memory_allocated(device)
        mem, ratio = f"{measured / memory.GB:.2f}", f"{measured / planned:.2f}"
    else:
        mem = ratio = "n/a"
    row = [weights, str(in_backward).lower(), n_rows, f"{planned / memory.GB:.2f}", mem, ratio,
           f"{dt:.3f}", f"{n_global / dt:,.0f}", f"{flops / dt / peak:.1%}" if peak else "-", f"{loss:.4f}"]
    del model, optimizer, stepper
    return row, held


def main(argv):
    cfg = parse_config(BenchConfig, argv)[0]
    if cfg.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no GPU here (this benchmark is for a GPU machine; --device cpu only checks the code path)")
    if cfg.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # train.setup_distributed picks gloo and the CPU
    _, _, device = train.setup_distributed()
    load_before = os.getloadavg()[0]
    results = [bench(cfg, weights, in_backward == "true", device)
               for weights in cfg.weights.split(",") for in_backward in cfg.step_in_backward.split(",")]
    rows = [row for row, _ in results]
    held = max(h for _, h in results)
    release(device)
    header = ["weights", "step_in_backward", "rows/step", "plan GB", "peak allocated GB", "allocated / plan",
              "s/step (median)", "tokens/s", "MFU", "loss"]
    where = f"{torch.cuda.get_device_name(device)} (bf16 peak {peak_flops(device) / 1e12:.0f} TFLOP/s)" \
        if device.type == "cuda" else "CPU (code-path check only)"
    n_params = memory.param_counts(MODELS[cfg.model])[0]
    title = (f"## {datetime.now():%Y-%m-%d %H:%M} GPU train memory: {machine(load_before)}, {where}, "
             f"{cfg.model} ({n_params / 1e6:.0f}M parameters), {cfg.dtype} compute, ac {cfg.ac}, FSDP2 on 1 rank, "
             f"rows of {cfg.tokens} tokens, median of {cfg.steps} steps after {cfg.warmup}")
    command = f"    python bench/bench_gpu_memory.py {shlex.join(argv)}".rstrip()  # quoted: --results "" stays
    leftover = (f"; at most {held / memory.GB:.2f} GB was still allocated when a configuration started"
                if device.type == "cuda" else "")
    notes = [f"plan GB: memory.plan gpu_total (world size 1, max_tokens {cfg.tokens}). peak allocated: "
             f"torch.cuda.max_memory_allocated from before the model is built to after the last step "
             f"(without the CUDA context, NCCL buffers and cached free blocks){leftover}. loss: the last step's."]
    text = "\n".join([title, "", command, "", *markdown(header, rows), "", *notes])
    record(text, cfg.results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
