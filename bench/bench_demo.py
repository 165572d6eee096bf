"""
The CPU demo, measured: does a fine-tune on 144 conversations answer questions about facts
that only pretraining taught? LIMA's superficial alignment hypothesis, at toy size.

    python bench/bench_demo.py                  # the demo as `python train.py` runs it, then the controls
    python bench/bench_demo.py --epochs_read 1-15 --results ""   # every epoch's answers, nothing recorded

Three models answer data/demo/dev.jsonl greedily (sample.py --temperature 0, the paper's repetition
penalty): 48 questions about people whom no fine-tuning conversation mentions, one fact each.
    fine-tuned    `python train.py` as it is: data/base fine-tuned on data/demo/train.jsonl
    base          data/base alone, asked the same questions in the same format (BOS question EOT)
    from scratch  `python train.py --init ""`: the same fine-tune of the same shape from random weights
An answer is in the format when it ends its turn (EOT) and is the taught sentence for its question
(data/make_demo.py ANSWERS) with some value; it is right when that value is the person's. "Knows
the fact" asks the model without asking it to write: fed the question and the reference answer up
to the value, is its greedy next token(s) the value? That separates knowing from the format.
Chance, for a model that knows the format but not the people: 1/12 per town, job or pet, 1/80 per
year (6.6% over this dev set).
The wall time of `python train.py` is measured as a user runs it (a fresh process, checkpoints and
all); sample.py's runs are not counted in it.
"""

import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "data"))

import torch  # noqa: E402

from checkpoint import load_model  # noqa: E402
from cli import parse_config  # noqa: E402
from common import OthersCPU, machine, markdown, wait_quiet  # noqa: E402
from make_demo import ANSWERS, FACT_SENTENCES  # noqa: E402

DEV = ROOT / "data" / "demo" / "dev.jsonl"


@dataclass
class Config:
    epochs_read: str = "15"  # the fine-tune's epochs whose answers are graded, e.g. 5-15
    max_len: int = 128  # prompt + answer; the taught answers are under 20 tokens
    results: str = "bench/results.md"  # "" to print only


def answer_pattern(record: dict) -> re.Pattern:
    """The taught answer to this dev question (data/make_demo.py ANSWERS), its value left open."""
    person = dict(name=record["name"], town="\0", a_job="\0", a_pet="\0", year="\0")
    return re.compile(re.escape(ANSWERS[record["fact"]].format(**person)).replace("\0", "(.+)") + "$")


def grade(records: list[dict], answers: dict[str, dict]) -> tuple[float, float]:
    """Shares of answers in the format, and right (in the format, with the person's value)."""
    in_format = right = 0
    for record in records:
        got = answers[record["id"]]
        in_format += got["stop"] == "eot" and answer_pattern(record).match(got["answer"]) is not None
        right += got["stop"] == "eot" and got["answer"] == record["conversations"][1]
    return in_format / len(records), right / len(records)


@torch.no_grad()
def knows(checkpoint: Path, records: list[dict]) -> float:
    """The share of records whose value the model predicts, teacher-forced: BOS question EOT, then
    the reference answer up to the value; the value's tokens must each be the greedy choice."""
    model, tok = load_model(checkpoint)
    right = 0
    for r in records:
        question, reference = r["conversations"]
        head = reference[:reference.rindex(r["value"])].rstrip()
        prefix = tok.encode_dialog([question]) + tok.encode(head)
        value = tok.encode(r["value"])  # with sentencepiece's leading space, as after head
        ids = prefix + value
        logits = model(torch.tensor([ids[:-1]]))[0]  # (T, V)
        right += logits[len(prefix) - 1:].argmax(-1).tolist() == value
    return right / len(records)


def run(argv: list[str], log: Path) -> float:
    """A project script in a fresh process, as a user runs it; its wall time. Output to log."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(argv)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - t0


def answer(checkpoint: Path, out: Path, cfg: Config, log: Path) -> dict[str, dict]:
    run(["sample.py", "--checkpoint", str(checkpoint), "--prompts", str(DEV), "--out", str(out),
         "--temperature", "0", "--max_len", str(cfg.max_len)], log)
    return {str(r["id"]): r for r in map(json.loads, out.read_text().splitlines())}


def parse_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main(argv=None):
    cfg, _ = parse_config(Config, argv)
    records = [json.loads(line) for line in DEV.read_text().splitlines()]
    assert {r["fact"] for r in records} <= set(FACT_SENTENCES)
    load = wait_quiet()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp, log = Path(tmp), Path(tmp) / "log.txt"
        with OthersCPU() as others:
            demo_s = run(["train.py", "--out", str(tmp / "demo")], log)
        scratch_s = run(["train.py", "--init", "", "--out", str(tmp / "scratch")], log)
        models = [(f"fine-tuned, epoch {e}", tmp / "demo" / f"epoch-{e:02d}") for e in parse_range(cfg.epochs_read)]
        models += [("base (data/base), no fine-tune", ROOT / "data" / "base"),
                   ("from scratch (--init \"\"), epoch 15", tmp / "scratch" / "epoch-15")]
        for n, (name, checkpoint) in enumerate(models):
            got = answer(checkpoint, tmp / f"answers-{n}.jsonl", cfg, log)
            rows.append([name, *grade(records, got), knows(checkpoint, records)])
    header = ["model", "in the format", "right (format and fact)", "knows the fact"]
    table = markdown(header, [[name, *(f"{v:.0%}" for v in values)] for name, *values in rows])
    lines = [f"`python train.py` (the demo): {demo_s:.0f} s wall, other processes took {others.share:.0%} "
             f"of the CPUs; `python train.py --init \"\"`: {scratch_s:.0f} s", "", *table]
    print("\n".join(lines))
    if cfg.results:
        with open(ROOT / cfg.results, "a") as f:
            f.write(f"\n## The CPU demo: held-out facts (bench/bench_demo.py), {datetime.now():%Y-%m-%d}\n\n"
                    f"{machine(load)}; {len(records)} questions of {DEV.relative_to(ROOT)}, greedy.\n\n"
                    + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
