"""
Decode speed of sample.generate: tokens per second at batch 1 and 8, random weights.

On the CPU, the tiny preset and a ~100M model (appends the table to bench/results.md):
    python bench/bench_decode.py
On a GPU, a ~1B model in bf16 with the compiled decode step, against the memory-bandwidth bound:
    python bench/bench_decode.py --device cuda --dtype bf16 --compile
Every option, with its default:
    python bench/bench_decode.py --help

Decoding one token reads every weight once (whatever the batch), so at small batches a step
takes at least (weight bytes) / (memory bandwidth): that is the bound. Decode speed here is
(tokens after the first) / (generate time - the time to prefill and draw the first token).
"""

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import huge_pages_for_tensors  # noqa: E402

huge_pages_for_tensors()  # as sample.py and eval.py decode (both arms of a comparison): before torch

import torch  # noqa: E402

from model import DTYPES, ModelArgs, Transformer  # noqa: E402
from sample import Settings, generate, parse_config  # noqa: E402


@dataclass
class BenchConfig:
    models: str = "auto"  # comma-separated names from MODELS; auto: tiny,100m on CPU, 1b on GPU
    batches: str = "1,8"  # comma-separated batch sizes
    prompt_len: int = 32  # tokens of every prompt
    new_tokens: int = 64  # tokens decoded after it
    repeats: int = 3  # the median of this many timings
    device: str = "cpu"  # cpu or cuda
    dtype: str = "fp32"  # fp32, bf16 or fp16
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPU)
    bandwidth_gbs: float = 0.0  # GPU memory bandwidth in GB/s; 0: looked up from the GPU's name
    results: str = "bench/results.md"  # relative to the repository; the table is appended; "" to skip


MODELS = {
    "tiny": ModelArgs.from_name("tiny", vocab_size=32001),  # 19M, most of it embeddings
    "100m": ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32001, multiple_of=256),  # 134M
    "1b": ModelArgs(dim=2048, n_layers=16, n_heads=16, vocab_size=32001, multiple_of=256),  # 953M
}
# Peak memory bandwidth in GB/s by GPU name, most specific first (vendor data sheets).
BANDWIDTH_GBS = [("H100 PCIe", 2000), ("H100", 3350), ("H200", 4800), ("A100-SXM4-80GB", 2039),
                 ("A100", 1555), ("L40S", 864), ("A10G", 600), ("L4", 300), ("4090", 1008)]


def gpu_bandwidth(cfg: BenchConfig) -> float:
    if cfg.bandwidth_gbs:
        return cfg.bandwidth_gbs
    name = torch.cuda.get_device_name()
    return next((gbs for key, gbs in BANDWIDTH_GBS if key in name), 0.0)


def timed_generate(model, prompts, s: Settings, device) -> float:
    """Seconds for one generate() call; no token is -1, so every row runs to the length limit."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, prompts, s, eot_id=-1)  # returns lists on the host: the device is done
    return time.perf_counter() - t0


def bench(name: str, batch: int, cfg: BenchConfig, device, dtype) -> dict:
    args = replace(MODELS[name], max_seq_len=cfg.prompt_len + cfg.new_tokens)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args)
        model.init_weights()
    model = model.to_device(dtype=dtype).eval()
    prompts = torch.randint(3, args.vocab_size, (batch, cfg.prompt_len)).tolist()
    full = Settings(max_len=cfg.prompt_len + cfg.new_tokens, compile=cfg.compile)
    first = replace(full, max_len=cfg.prompt_len + 1)  # prefill and the first token only
    timed_generate(model, prompts, full, device)  # warm-up: allocation, and compilation if any
    t_full = statistics.median(timed_generate(model, prompts, full, device) for _ in range(cfg.repeats))
    t_first = statistics.median(timed_generate(model, prompts, first, device) for _ in range(cfg.repeats))
    step_s = (t_full - t_first) / (cfg.new_tokens - 1)
    # Every weight but the embedding table (only B rows of it are read) is read once per step.
    step_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if n != "tok_embeddings.weight")
    row = dict(model=name, params=f"{model.num_params() / 1e6:.0f}M", batch=batch,
               tok_s=f"{batch / step_s:,.0f}", ms_step=f"{step_s * 1e3:.2f}",
               gb_s=f"{step_bytes / step_s / 1e9:.1f}", bound="-")
    if device.type == "cuda" and gpu_bandwidth(cfg):
        bound_s = step_bytes / (gpu_bandwidth(cfg) * 1e9)
        row["bound"] = f"{batch / bound_s:,.0f} tok/s ({100 * bound_s / step_s:.0f}% of it)"
    return row


def main(argv):
    cfg = parse_config(BenchConfig, argv)[0]
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    names = cfg.models.split(",") if cfg.models != "auto" else ["1b"] if device.type == "cuda" else ["tiny", "100m"]
    load_before = os.getloadavg()[0]
    rows = [bench(name, int(b), cfg, device, dtype) for name in names for b in cfg.batches.split(",")]
    header = ["model", "params", "batch", "decode tok/s", "ms/step", "weights GB/s", "bandwidth bound"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    # The load average shows whether something else shared the CPUs while this ran.
    machine = (f"{platform.platform()}, {torch.get_num_threads()} threads of {os.cpu_count()} CPUs, "
               f"load {load_before:.1f} before and {os.getloadavg()[0]:.1f} after")
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name()} ({gpu_bandwidth(cfg):.0f} GB/s)"
    title = (f"## {datetime.now():%Y-%m-%d %H:%M} decode: {machine}, torch {torch.__version__}, "
             f"{cfg.dtype}{', compiled' if cfg.compile else ''}, prompt {cfg.prompt_len} + {cfg.new_tokens} new tokens")
    table = "\n".join([title, "", f"    python bench/bench_decode.py {' '.join(argv)}".rstrip(), "", *lines])
    print(table)
    if cfg.results:
        with open(ROOT / cfg.results, "a") as f:  # others append to this file too: never overwrite
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
