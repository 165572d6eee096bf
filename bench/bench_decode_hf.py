"""
Decode speed of sample.generate against Hugging Face transformers' generate: same weights, same
prompts, same sampling settings, KV cache on both sides, batch 1 and 8, on the CPU.

    pip install -r bench/requirements.txt      # transformers: for this comparison only
    python bench/bench_decode_hf.py            # tiny and 100m shapes (bench/common.py), fp32
    python bench/bench_decode_hf.py --help

First the greedy answers are compared token for token (temperature 0, repetition penalty 1.2):
if any differs, nothing is timed. Then LIMA's sampling (temperature 0.7, top-p 0.9, repetition
penalty 1.2) is timed on both sides. HF's repetition penalty counts the prompt's tokens as seen,
so ours runs with penalize_prompt=True here (the same work; ours leaves it off by default).
Every row runs to the length limit (ours: no EOT id can occur; HF: min_new_tokens), and the
prompts share one length, so nothing is padded. Arms:
    ours        sample.generate: a static KV cache preallocated once, read up to its filled part, eager
    ours-compiled  the same with --compile: inductor's step (on the CPU, batch 1's matrix-vector
                products as its own loops: sample.py cpu_matvec_as_loops); compiled in the warm-up
    hf          model.generate with its default DynamicCache, which grows by concatenation
    hf-static   model.generate(cache_implementation="static"), eager
Random weights give flat next-token distributions (tiny: top-p 0.9 keeps 25,000 of 32,001 tokens),
where a trained model's are peaked (a nucleus of a few to a few hundred); the output layer is
multiplied by --logit_scale (default 10: nuclei of 34 to 193 tokens for tiny), on both sides.
Decode speed, as in bench_decode.py: (tokens after the first) / (time of the whole generate -
time of a generate that stops after the first token), medians of --repeats timings.
"Of the bound": a step reads every weight once (float32 here) but the embedding table, of which
it reads one row per token, so it takes at least (those bytes) / (read bandwidth), the bandwidth
measured just before and just after each model and batch's timings (bench/common.py
read_bandwidth_gbs; the higher of the two: a VM's bandwidth varies with its neighbours); the
column is that bound over the measured step time. A model whose weights fit in the CPU's caches
can beat it; one far below it is paying for something else (per-op overhead, sampling).
"""

import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cli import huge_pages_for_tensors, parse_config  # noqa: E402

huge_pages_for_tensors()  # as sample.py and eval.py decode (both arms of a comparison): before torch

import torch  # noqa: E402

from common import MODELS, OthersCPU, hf_llama, machine, markdown, read_bandwidth_gbs, record, wait_quiet  # noqa: E402
from model import Transformer  # noqa: E402
from sample import Settings, generate  # noqa: E402


@dataclass
class BenchConfig:
    models: str = "tiny,100m"  # comma-separated names from bench/common.py MODELS
    batches: str = "1,8"  # comma-separated batch sizes
    arms: str = "ours,ours-compiled,hf,hf-static"  # see above
    prompt_len: int = 32  # tokens of every prompt
    new_tokens: int = 64  # tokens decoded after it
    check_tokens: int = 32  # greedy tokens compared before timing
    repeats: int = 3  # the median of this many timings
    logit_scale: float = 10.0  # the output layer is multiplied by this: see above; 1 for the random weights' own
    results: str = "bench/results.md"  # relative to the repository; the table is appended; "" to skip


LIMA = Settings(temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.2, penalize_prompt=True)


def hf_generate(hf, prompts: torch.Tensor, s: Settings, new: int, static: bool) -> torch.Tensor:
    """HF's generate with the same settings as s, exactly `new` tokens per row.

    Every sampling setting is passed, top_k too: left unset, transformers fills it with its
    global default of 50, a filter ours does not apply (top_k 0 is off on both sides).
    """
    from transformers import GenerationConfig
    gc = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=s.temperature > 0,
                          temperature=s.temperature or None, top_p=s.top_p if s.temperature else None,
                          top_k=s.top_k, repetition_penalty=s.repetition_penalty, eos_token_id=2,
                          pad_token_id=0, use_cache=True, cache_implementation="static" if static else None)
    torch.manual_seed(s.seed)
    return hf.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=gc)[:, prompts.size(1):]


def run(arm: str, ours, hf, prompts: torch.Tensor, s: Settings, new: int) -> list[list[int]]:
    if arm in ("ours", "ours-compiled"):
        s = replace(s, max_len=prompts.size(1) + new, compile=arm == "ours-compiled")
        return generate(ours, prompts.tolist(), s, eot_id=-1)
    return hf_generate(hf, prompts, s, new, static=arm == "hf-static").tolist()


def timed(arm, ours, hf, prompts, s, new) -> float:
    t0 = time.perf_counter()
    run(arm, ours, hf, prompts, s, new)
    return time.perf_counter() - t0


def check_greedy(arm, ours, hf, prompts, n: int) -> str:
    """'' if the greedy answers agree token for token with ours, else where they first differ."""
    greedy = replace(LIMA, temperature=0)
    a, b = run("ours", ours, hf, prompts, greedy, n), run(arm, ours, hf, prompts, greedy, n)
    for row, (x, y) in enumerate(zip(a, b)):
        if x != y:
            t = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            return f"{arm}: row {row} differs at token {t}: ours {x[t:t + 1]}, HF {y[t:t + 1]}"
    return ""


def bench(name: str, cfg: BenchConfig) -> tuple[list[dict], list[str]]:
    args = replace(MODELS[name], max_seq_len=cfg.prompt_len + max(cfg.new_tokens, cfg.check_tokens))
    torch.manual_seed(0)
    ours = Transformer(args)
    ours.init_weights()
    ours.eval()
    with torch.no_grad():
        ours.output.weight *= cfg.logit_scale
    hf = hf_llama(args, ours.state_dict()).eval()
    rows, notes = [], []
    for batch in [int(b) for b in cfg.batches.split(",")]:
        prompts = torch.randint(3, args.vocab_size - 1, (batch, cfg.prompt_len))
        arms = cfg.arms.split(",")
        for arm in arms:
            if arm != "ours" and (bad := check_greedy(arm, ours, hf, prompts, cfg.check_tokens)):
                raise SystemExit(f"{name}, batch {batch}: greedy answers disagree, not timing: {bad}")
        notes.append(f"{name}, batch {batch}: greedy answers of {cfg.check_tokens} tokens agree token for "
                     f"token, ours and {', '.join(a for a in arms if a != 'ours')}")
        for arm in arms:
            timed(arm, ours, hf, prompts, LIMA, cfg.new_tokens)  # warm-up: allocation
        # The arms alternate, repetition by repetition, so that a slow minute of the machine
        # falls on all of them rather than on whichever ran then.
        full, first = {arm: [] for arm in arms}, {arm: [] for arm in arms}
        bandwidth_gbs = read_bandwidth_gbs()
        with OthersCPU() as others:
            for _ in range(cfg.repeats):
                for arm in arms:
                    full[arm].append(timed(arm, ours, hf, prompts, LIMA, cfg.new_tokens))
                    first[arm].append(timed(arm, ours, hf, prompts, LIMA, 1))
        after = read_bandwidth_gbs()
        notes.append(f"{name}, batch {batch}: read bandwidth {bandwidth_gbs:.1f} GB/s before the timings and "
                     f"{after:.1f} after; the bound takes the higher")
        bandwidth_gbs = max(bandwidth_gbs, after)  # a neighbour's slow minute must not flatter the ratio
        timings = {arm: ((statistics.median(full[arm]) - statistics.median(first[arm])) / (cfg.new_tokens - 1),
                         statistics.median(first[arm]), others.share) for arm in arms}
        read = (ours.num_params() - ours.tok_embeddings.weight.numel()) * 4  # float32, once a step
        bound_s = read / (bandwidth_gbs * 1e9)
        for arm, (step_s, first, others) in timings.items():
            vs_hf = f"{timings['hf'][0] / step_s:.2f}" if "hf" in timings else "-"
            rows.append([name, f"{ours.num_params() / 1e6:.0f}M", batch, arm, f"{batch / step_s:,.0f}",
                         f"{step_s * 1e3:.2f}", f"{first * 1e3:.0f}", vs_hf, f"{bound_s / step_s:.0%}",
                         f"{others:.0%}"])
    return rows, notes


def main(argv):
    cfg = parse_config(BenchConfig, argv)[0]
    load_before = wait_quiet()
    rows, notes = [], []
    for name in cfg.models.split(","):
        r, n = bench(name, cfg)
        rows += r
        notes += n
    import transformers
    header = ["model", "params", "batch", "arm", "decode tok/s", "ms/step", "prefill + 1st token ms",
              "x HF generate", "of the bound", "others' CPU"]
    title = (f"## {datetime.now():%Y-%m-%d %H:%M} decode vs HF: {machine(load_before)}, transformers "
             f"{transformers.__version__}, fp32, output layer x{cfg.logit_scale:g}, prompt {cfg.prompt_len} + {cfg.new_tokens} new tokens, "
             f"T 0.7, top-p 0.9, repetition penalty 1.2")
    command = f"    python bench/bench_decode_hf.py {' '.join(argv)}".rstrip()
    text = "\n".join([title, "", command, "", *markdown(header, rows), "", *notes])
    record(text, cfg.results)


if __name__ == "__main__":
    main(sys.argv[1:])
