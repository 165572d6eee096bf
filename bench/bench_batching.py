"""
Waste of data.py's batching plan (packed rows, balanced over ranks) against random padded micro-batches.

LIMA's training set with Meta's tokenizer (both read in place, never copied into the project):
    python bench/bench_batching.py --data lima/train.jsonl --tokenizer ckpt/llama-65b/tokenizer.model
The project's demo data (the default, so it runs anywhere; too small to say much):
    python bench/bench_batching.py

Both arms see the same shuffled global batches (data.Batches, LIMA's 15 epochs). Ranks run in
lockstep, so a micro-step costs every rank as much as the busiest: waste = 1 - real tokens /
(ranks x the busiest rank's tokens, summed over micro-steps). Packed rows have no padding, so
their waste is all imbalance. The baseline deals each batch out round-robin, as a distributed
sampler does, and pads each micro-batch of b examples to its longest. The floor is what no
plan of the same batches can beat: some rank runs the longest example, and the ranks between
them run every token.
"""

import argparse
import math
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import Batches, DataError, Tokenizer, least_paid, load_dataset, packing_cost  # noqa: E402


def padded_cost(lengths: list[int], world_size: int, micro_batch: int) -> tuple[int, int]:
    """(real tokens, tokens paid for) of the baseline: round-robin ranks, padded micro-batches."""
    shares = [lengths[rank::world_size] for rank in range(world_size)]
    n_steps = math.ceil(max(len(s) for s in shares) / micro_batch)
    paid = 0
    for step in range(n_steps):
        rows = [s[step * micro_batch:(step + 1) * micro_batch] for s in shares]
        paid += world_size * max(len(r) * max(r, default=0) for r in rows)  # (b, longest) per rank
    return sum(lengths), paid


def bench(lengths: list[int], world_size: int, args) -> dict:
    """Waste of every arm over args.epochs epochs of one world size, in percent."""
    batches = Batches(lengths, args.global_batch, world_size, args.max_tokens, args.seed)
    totals = {}  # arm -> [real, paid]
    micro_steps, plan_s, n_batches, longest_dominates = 0, 0.0, 0, 0

    def add(arm, real, paid):
        totals.setdefault(arm, [0, 0])
        totals[arm][0] += real
        totals[arm][1] += paid

    for epoch in range(args.epochs):
        for step in range(batches.steps_per_epoch):
            sizes = [lengths[i] for i in batches.global_batch_indices(epoch, step)]
            t0 = time.perf_counter()
            packing = batches.rows(epoch, step)
            plan_s += time.perf_counter() - t0
            real, paid = packing_cost(packing, lengths)
            add("packed", real, paid)
            add("floor", real, least_paid(sizes, world_size))
            if len(sizes) == args.global_batch:
                add("packed, full batches", real, paid)
            for b in args.micro_batches:
                add(f"padded b={b}", *padded_cost(sizes, world_size, b))
            micro_steps += len(packing[0])
            n_batches += 1
            longest_dominates += max(sizes) > sum(sizes) / world_size
    row = {"ranks": world_size}
    row.update({arm: 100 * (1 - real / paid) for arm, (real, paid) in totals.items()})
    row.update({"micro-steps": micro_steps / n_batches, "plan ms": 1000 * plan_s / n_batches,
                "longest > mean share": 100 * longest_dominates / n_batches})
    return row


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data", default="data/demo/train.jsonl")
    parser.add_argument("--tokenizer", default="data/tokenizer.model")
    parser.add_argument("--ranks", default="1,8,16", help="comma-separated world sizes")
    parser.add_argument("--global_batch", type=int, default=32)  # LIMA's, for 65B
    parser.add_argument("--max_len", type=int, default=2048)  # LIMA trims here
    parser.add_argument("--max_tokens", type=int, default=4096)  # one packed row, train.py's default
    parser.add_argument("--micro_batches", default="1,2,4", help="the baseline's micro-batch sizes")
    parser.add_argument("--epochs", type=int, default=15)  # LIMA's
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="bench/results.md", help='appended to; "" to skip')
    args = parser.parse_args(argv)
    args.micro_batches = [int(b) for b in args.micro_batches.split(",")]
    try:
        ds = load_dataset(args.data, Tokenizer(args.tokenizer), args.max_len, verbose=False)
    except DataError as e:
        sys.exit(f"error: {e}")
    lengths = [len(e["tokens"]) for e in ds.examples]
    rows = [bench(lengths, int(w), args) for w in args.ranks.split(",")]

    header = list(rows[0])
    units = {"ranks": "{:d}", "micro-steps": "{:.2f}", "plan ms": "{:.1f}"}
    lines = ["| " + " | ".join(h if h in units else f"{h} %" for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(units.get(h, "{:.1f}").format(r[h]) for h in header) + " |" for r in rows]
    n = len(lengths)
    notes = [
        f"{n} conversations, {sum(lengths):,} training tokens after trimming at {args.max_len} "
        f"(mean {sum(lengths) / n:.0f}); global batch {args.global_batch}, rows of at most {args.max_tokens} "
        f"tokens, {args.epochs} epochs of {math.ceil(n / args.global_batch)} batches (the last of "
        f"{n % args.global_batch or args.global_batch} examples kept).",
        "packed: data.py's plan (waste = lockstep imbalance only); floor: the least any plan of the "
        "same batches can waste; padded b: round-robin ranks, micro-batches of b padded to their "
        "longest; micro-steps: per rank per batch; longest > mean share: batches whose longest "
        "example is more than a rank's mean share, where even the floor is above zero.",
    ]
    for r in rows:
        if r["floor"] >= 3:
            share = args.global_batch * sum(lengths) / n / r["ranks"]
            notes.append(
                f"{r['ranks']} ranks: a batch of {args.global_batch} gives each rank {share:,.0f} tokens on "
                f"average, and in {r['longest > mean share']:.0f}% of batches one conversation is longer "
                f"than the batch's share per rank; the rank holding it sets the pace, so no arrangement of "
                f"these batches wastes "
                f"less than {r['floor']:.1f}% (data.py's plan: {r['packed']:.1f}%). Going under 3% would "
                f"take splitting a conversation over ranks (context parallelism) or larger batches, "
                f"which changes LIMA's recipe.")
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    title = f"## {datetime.now():%Y-%m-%d %H:%M} batching: {machine}, {args.data} with {args.tokenizer}"
    command = f"    python bench/bench_batching.py {' '.join(argv)}".rstrip()
    table = "\n".join([title, "", command, "", *lines, "", *notes])
    print(table)
    if args.results:
        with open(ROOT / args.results, "a") as f:  # others append to this file too: never overwrite
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
