"""
Answering a file of prompts whose answers vary in length as LIMA's do: sample.decode's continuous
batching against Hugging Face transformers' generate in static batches (its usual way), same
weights, same prompts, same sampling, on the CPU.

    pip install -r bench/requirements.txt      # transformers: for this comparison only
    python bench/bench_answering.py            # 64 prompts, tiny shape, 8 rows, fp32
    python bench/bench_answering.py --prompts 16 --max_answer 256 --results ""   # a quick look
    python bench/bench_answering.py --help

Every prompt has --prompt_len random tokens and a forced answer length: a draw from the lengths of
LIMA's responses (shared/data/lima/train.jsonl with Meta's tokenizer, when present; else the demo
set's, data/demo/train.jsonl with the project's tokenizer), capped at --max_answer. A random
model never writes EOT with these ids, so both sides stop only at the forced lengths:
    ours        sample.decode(slots=--rows, limits=the lengths): a finished row takes the next
                prompt at once, and a step reads only the filled part of the cache
    hf-static   model.generate on batches of --rows prompts in file order, each run to its
                longest answer (what EOS does in a static batch: finished rows keep computing),
                HF's default cache
Answered tokens per second counts the forced lengths only (what a user gets). Both arms are run
alternately, --repeats times, in one process.
"""

import json
import random
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

from bench_decode_hf import LIMA, hf_generate  # noqa: E402
from common import LIMA_DATA, LLAMA_TOKENIZER, MODELS, OthersCPU, hf_llama, machine, markdown, record, wait_quiet  # noqa: E402
from data import Tokenizer  # noqa: E402
from model import Transformer  # noqa: E402
from sample import generate  # noqa: E402


@dataclass
class BenchConfig:
    model: str = "tiny"  # a name from bench/common.py MODELS
    prompts: int = 64  # prompts in the file
    rows: int = 8  # ours: cache rows (--batch_size); HF: prompts per static batch
    prompt_len: int = 32  # tokens of every prompt
    max_answer: int = 960  # answer lengths are capped here (the tiny shape's max_seq_len is 1,024)
    repeats: int = 2  # alternating runs of each arm; the median is reported
    seed: int = 0
    results: str = "bench/results.md"  # relative to the repository; the table is appended; "" to skip


def response_lengths() -> tuple[list[int], str]:
    """Token counts of every assistant turn of LIMA's training set (or of the demo set)."""
    data, tokenizer = (LIMA_DATA, LLAMA_TOKENIZER) if LIMA_DATA.is_file() and LLAMA_TOKENIZER.is_file() \
        else (ROOT / "data/demo/train.jsonl", ROOT / "data/tokenizer.model")
    tok = Tokenizer(tokenizer)
    lengths = []
    for line in open(data):
        turns = json.loads(line)["conversations"]
        lengths += [len(tok.encode(t)) + 1 for t in turns[1::2]]  # + EOT
    return lengths, f"{data} ({tokenizer.name})"


def run_ours(model, prompts, limits, cfg) -> None:
    s = replace(LIMA, max_len=cfg.prompt_len + cfg.max_answer)
    generate(model, prompts, s, eot_id=-1, slots=cfg.rows, limits=limits)


def run_hf(hf, prompts, limits, cfg) -> None:
    for i in range(0, len(prompts), cfg.rows):
        batch = torch.tensor(prompts[i:i + cfg.rows])
        hf_generate(hf, batch, LIMA, max(limits[i:i + cfg.rows]), static=False)


def main(argv):
    cfg = parse_config(BenchConfig, argv)[0]
    load_before = wait_quiet()
    lengths, source = response_lengths()
    rng = random.Random(cfg.seed)
    limits = [min(rng.choice(lengths), cfg.max_answer) for _ in range(cfg.prompts)]
    args = replace(MODELS[cfg.model], max_seq_len=cfg.prompt_len + cfg.max_answer)
    torch.manual_seed(cfg.seed)
    ours = Transformer(args)
    ours.init_weights()
    ours.eval()
    hf = hf_llama(args, ours.state_dict()).eval()
    prompts = torch.randint(3, args.vocab_size - 1, (cfg.prompts, cfg.prompt_len)).tolist()
    arms = {"ours": lambda: run_ours(ours, prompts, limits, cfg), "hf-static": lambda: run_hf(hf, prompts, limits, cfg)}
    times = {arm: [] for arm in arms}
    with OthersCPU() as others:
        for _ in range(cfg.repeats):
            for arm, run in arms.items():
                t0 = time.perf_counter()
                run()
                times[arm].append(time.perf_counter() - t0)
    answered = sum(limits)
    paid_hf = sum(max(limits[i:i + cfg.rows]) * len(limits[i:i + cfg.rows]) for i in range(0, len(limits), cfg.rows))
    rows = []
    for arm, ts in times.items():
        t = statistics.median(ts)
        rows.append([arm, f"{t:.1f}", f"{answered / t:,.0f}",
                     f"{statistics.median(times['hf-static']) / t:.2f}"])
    import transformers
    title = (f"## {datetime.now():%Y-%m-%d %H:%M} answering: {machine(load_before)}, transformers "
             f"{transformers.__version__}, {cfg.model} ({ours.num_params() / 1e6:.0f}M), fp32, {cfg.prompts} "
             f"prompts of {cfg.prompt_len} tokens, {cfg.rows} rows, T 0.7, top-p 0.9, repetition penalty 1.2")
    command = f"    python bench/bench_answering.py {' '.join(argv)}".rstrip()
    notes = [f"Answer lengths drawn from {source}, capped at {cfg.max_answer}: mean {answered / len(limits):.0f}, "
             f"longest {max(limits)}, shortest {min(limits)}; {answered:,} answered tokens. HF's static batches "
             f"compute {paid_hf:,} answer positions for them ({1 - answered / paid_hf:.0%} spent on finished "
             f"rows). Median of {cfg.repeats} alternating runs; others' CPU {others.share:.0%}."]
    text = "\n".join([title, "", command, "", *markdown(["arm", "seconds", "answered tok/s", "x HF static"], rows),
                      "", *notes])
    record(text, cfg.results)


if __name__ == "__main__":
    main(sys.argv[1:])
