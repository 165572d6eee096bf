"""
Evaluation the way LIMA did it: perplexity does not follow quality, so read the answers and compare.

Dev loss and perplexity of every epoch's checkpoint, in one table (-> OUT/eval/dev_loss.jsonl):
    python eval.py loss --run out/demo --dev data/demo/dev.jsonl
Answers to every dev prompt with the paper's decoding, for the epochs to pick from (-> OUT/eval/answers/):
    python eval.py answers --run out/demo --dev data/demo/dev.jsonl --epochs 5-10
One self-contained HTML page: loss curves, the dev loss table, prompts down the side and epochs across:
    python eval.py report --run out/demo [--pairwise ann-ana.jsonl ...] [--ratings rate-ana.jsonl ...]
Pairwise preference against a baseline's answers to the same prompts: blind, one at a time, resumable:
    python eval.py compare --ours out/demo/eval/answers/epoch-07.jsonl --baseline alpaca.jsonl --annotator ana --out ann-ana.jsonl
The same with a model as the judge, any OpenAI-compatible endpoint (key from $OPENAI_API_KEY if set):
    python eval.py judge --ours out/demo/eval/answers/epoch-07.jsonl --baseline alpaca.jsonl \\
        --url https://api.openai.com/v1 --model gpt-4 --out ann-gpt4.jsonl [--judge_prompt my_prompt.txt]
Win / tie / loss per baseline, the agreement of two annotation files, Fail / Pass / Excellent tallies:
    python eval.py tally ann-ana.jsonl [ann-gpt4.jsonl]
Fail / Pass / Excellent on a seeded sample of answers, by a person (or a judge: --url, --model):
    python eval.py rate --answers out/demo/eval/answers/epoch-07.jsonl --sample 50 --annotator ana --out rate-ana.jsonl
Training subsets for the paper's ablations (diversity, quality, quantity); then train.py --data sub.jsonl:
    python eval.py subset --data lima/train.jsonl --subset_source stackexchange --subset_n 500 --out sub.jsonl

Answer files are jsonl, one line per prompt: {"id", "prompt", "answer"}, and "history" (the earlier
turns) for a multi-turn prompt, as sample.py writes them. Annotation files are jsonl too, one line
per judgement: the prompt id, which side showed ours, the raw verdict, the result for ours, who, when.

Only loss and answers load a model: they are the part of this file after the command line, where
torch is imported. Judging, annotation and tallies are in judge.py, the report in report.py, and
neither needs torch: run as a script, this file reads its command line and runs those commands
before it imports torch, so they work on a laptop without it and --help answers at once.
"""

import argparse
import math
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path

import judge
from cli import Parser, at_least, device_name, fail, huge_pages_for_tensors
from judge import EvalError, Quit
from report import write_report

MODEL_COMMANDS = ("loss", "answers")  # the two that load checkpoints, and so need torch


# ---- subsets of the training data, for the ablations ----

def subset(data, out, source: str = "", n: int = 0, seed: int = 0) -> list[dict]:
    """Rows of a LIMA jsonl whose source is one of `source` (comma-separated), then n of them.

    LIMA's ablations (section 5) train on a few thousand examples drawn from one source at a
    time: filtered Stack Exchange against wikiHow (diversity), filtered against unfiltered Stack
    Exchange (quality), and growing samples of one source (quantity). Each is a subset here.
    """
    numbered = judge.numbered_jsonl(data)
    for line, r in numbered:
        judge.check_record(r, f"{data}:{line}", "a conversation {conversations, source}")
    rows = [r for _, r in numbered]
    if source:
        counts = Counter(str(r.get("source")) for r in rows)
        rows = [r for r in rows if r.get("source") in source.split(",")]
        if not rows:
            raise EvalError(f"{data}: no rows with source {source}; sources: "
                            + ", ".join(f"{s} ({c})" for s, c in sorted(counts.items())))
    if n:
        if n > len(rows):
            raise EvalError(f"--subset_n {n} but only {len(rows)} rows match")
        # A seeded sample, kept in file order: the same arguments always give the same file.
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]
    judge.write_jsonl(out, rows)
    return rows


# ---- the command line ----

def epochs_list(text: str) -> list[int]:
    """An argparse type: "5-10" or "5,7,9" -> a list of distinct epochs, counted from 1."""
    try:
        if "-" in text:
            first, last = map(int, text.split("-"))
            epochs = list(range(first, last + 1))
        else:
            epochs = [int(e) for e in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected a range like 5-10 or a list like 5,7,9") from None
    if not epochs or min(epochs) < 1 or len(set(epochs)) < len(epochs):
        raise argparse.ArgumentTypeError(f"{text}: expected a range like 5-10 (first <= last) or a list like "
                                         f"5,7,9 of distinct epochs, counted from 1")
    return epochs


def build_parser() -> Parser:
    p = Parser(description=__doc__.strip(), prog="eval.py")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, **required):
        """A subcommand; each keyword is a required option and its help."""
        c = sub.add_parser(name, help=help, description=help)
        for flag, meaning in required.items():
            c.add_argument(f"--{flag}", required=True, help=meaning)
        return c

    def model_options(c):
        c.add_argument("--device", type=device_name, default="auto",
                       help="where the model runs: auto (cuda if there is one, else cpu), cpu, cuda or cuda:N")
        c.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="the weights' dtype; auto: bf16 on a GPU, fp32 on the CPU")

    def judge_options(c):
        c.add_argument("--judge_prompt", help="a file to use instead of the prompt at the top of judge.py, "
                                              "with the same {placeholders}")
        c.add_argument("--retries", type=at_least(0), default=3, help="further tries for one prompt")
        c.add_argument("--timeout", type=at_least(0, float), default=120, help="seconds per request")
        c.add_argument("--max_requests", type=at_least(1), default=1000, help="requests in this run, at most")

    run = "the run's folder (train.py --out), holding its epoch-NN checkpoints"
    c = command("loss", "dev loss and perplexity of every epoch checkpoint (-> RUN/eval/dev_loss.jsonl)",
                run=run, dev="the dev conversations: LIMA's jsonl, each ending with an answer")
    c.add_argument("--max_len", type=at_least(1), default=2048,
                   help="longer conversations are trimmed, as train.py --max_len trims them")
    model_options(c)
    c = command("answers", "answers to the dev prompts for chosen epochs (-> RUN/eval/answers/)", run=run,
                dev="the dev prompts: LIMA's jsonl (a last answer is dropped) or a text file, one a line")
    c.add_argument("--epochs", type=epochs_list, default="5-10", help="a range like 5-10 or a list like 5,7,9")
    c.add_argument("--batch_size", type=at_least(1), default=8, help="rows decoded together (continuous batching)")
    c.add_argument("--max_len", type=at_least(1), default=2048, help="tokens of prompt + answer, in all (LIMA: 2048)")
    c.add_argument("--seed", type=int, default=0, help="with each prompt's id, it keys the answer's draws")
    c.add_argument("--temperature", type=at_least(0, float, inclusive=True), default=0.7,
                   help="LIMA's 0.7 with top-p 0.9; 0: greedy, one answer per checkpoint to read (the demo's)")
    model_options(c)
    c = command("report", "one self-contained HTML page of the run's results", run=run)
    c.add_argument("--pairwise", nargs="*", default=[], help="annotation files (compare, judge) to chart")
    c.add_argument("--ratings", nargs="*", default=[], help="rating files (rate) to chart")
    c.add_argument("--out", help="the page to write (default: RUN/eval/report.html)")
    c.add_argument("--dev", help="the dev prompts' file: its reference answers are shown beside the prompts")
    pair = dict(ours="our answers (a file of eval.py answers or sample.py --prompts)",
                baseline="the baseline's answers to the same prompts, in the same format")
    c = command("compare", "pairwise preference by a person, blind, resumable", **pair,
                annotator="your name in the records (running again continues your judgements)",
                out="the annotation file to append to (jsonl)")
    c.add_argument("--baseline_name", help="the baseline's name in the records (default: its file's name)")
    c.add_argument("--seed", type=int, default=0, help="for the A/B order")
    c = command("judge", "pairwise preference by a model behind an OpenAI-compatible endpoint", **pair,
                url="the endpoint, e.g. https://api.openai.com/v1 (key from $OPENAI_API_KEY)",
                model="the judge model's name at that endpoint, e.g. gpt-4",
                out="the annotation file to append to (jsonl)")
    c.add_argument("--annotator", help="the judge's name in the records (default: --model)")
    c.add_argument("--baseline_name", help="the baseline's name in the records (default: its file's name)")
    c.add_argument("--seed", type=int, default=0, help="for the A/B order")
    judge_options(c)
    c = command("tally", "win / tie / loss, ratings, and the agreement of two files")
    c.add_argument("files", nargs="+", metavar="FILE.jsonl", help="one annotation file, or two to compare")
    c = command("rate", "Fail / Pass / Excellent per answer, by a person or (--url, --model) a judge",
                answers="the answers to rate (a file of eval.py answers or sample.py --prompts)",
                out="the rating file to append to (jsonl)")
    c.add_argument("--annotator", help="your name in the records; required for a person (default for a judge: --model)")
    c.add_argument("--sample", type=at_least(0), default=0, help="rate a seeded sample of this many (0: all)")
    c.add_argument("--seed", type=int, default=0, help="for the sample")
    c.add_argument("--url", help="a judge's OpenAI-compatible endpoint, instead of a person")
    c.add_argument("--model", help="the judge model's name at that endpoint")
    judge_options(c)
    c = command("subset", "a training file for the ablations: by source and/or a seeded sample",
                data="the training conversations (LIMA's jsonl)", out="the subset to write (jsonl)")
    c.add_argument("--subset_source", default="", help="keep these sources (comma-separated; default: all)")
    c.add_argument("--subset_n", type=at_least(0), default=0, help="then keep this many, sampled (0: all)")
    c.add_argument("--seed", type=int, default=0, help="for the sample")
    return p


def make_judge(a) -> judge.Judge:
    if not re.match(r"https?://[^/\s]", a.url):
        raise EvalError(f"--url {a.url}: expected an http:// or https:// address (an OpenAI-compatible endpoint)")
    return judge.Judge(a.url, a.model, os.environ.get("OPENAI_API_KEY"), a.timeout, a.retries, a.max_requests)


def run_without_model(a):
    """Every command but loss and answers: judging, annotation, tallies, the report, subsets."""
    if a.command == "report":
        print(f"wrote {write_report(a.run, a.pairwise, a.ratings, a.out, a.dev)}")
    elif a.command in ("compare", "judge"):
        if a.command == "compare":
            who, label = a.annotator, judge.human(judge.VERDICTS)
        else:
            template = judge.read_template(a.judge_prompt, judge.JUDGE_PROMPT, ("prompt", "answer_a", "answer_b"))
            who, label = a.annotator or a.model, judge.judged(make_judge(a), template, judge.parse_verdict)
        skipped = judge.compare(a.ours, a.baseline, a.out, who, label, a.seed, a.baseline_name)
        print(f"done{f'; {skipped} left without a verdict: run again to retry them' if skipped else ''}")
        print(judge.tally_text(a.out))
    elif a.command == "tally":
        if len(a.files) > 2:
            raise EvalError("tally takes one annotation file, or two to measure their agreement")
        print("\n".join(judge.tally_text(f) for f in a.files))
        if len(a.files) == 2:
            score, n = judge.agreement(judge.read_annotations(a.files[0]), judge.read_annotations(a.files[1]))
            print(f"agreement (tie-discounted) on {n} shared judgements: "
                  + (f"{100 * score:.1f}%" if n else "none shared"))
    elif a.command == "rate":
        if a.url or a.model:
            if not (a.url and a.model):
                raise EvalError("a judge needs both --url and --model")
            template = judge.read_template(a.judge_prompt, judge.RATE_PROMPT, ("prompt", "answer"))
            who, label = a.annotator or a.model, judge.judged(make_judge(a), template, judge.parse_rating)
        elif not a.annotator:
            raise EvalError("rate needs --annotator NAME (a person) or --url and --model (a judge)")
        else:
            who, label = a.annotator, judge.human(judge.RATING_KEYS)
        skipped = judge.rate(a.answers, a.out, who, label, a.sample, a.seed)
        print(f"done{f'; {skipped} left without a rating: run again to retry them' if skipped else ''}")
        print(judge.tally_text(a.out))
    elif a.command == "subset":
        rows = subset(a.data, a.out, a.subset_source, a.subset_n, a.seed)
        print(f"wrote {len(rows)} conversations to {a.out}")


def main(argv: list[str]):
    a = build_parser().parse_args(argv)
    try:
        if a.command in MODEL_COMMANDS:
            run_with_model(a)  # below, where torch is imported
        else:
            run_without_model(a)
    except Quit as e:  # a chosen stop: everything recorded so far is in the file
        print(e, file=sys.stderr)
    except KeyboardInterrupt:  # judgements, ratings and answers are appended as each is made
        saved = f": everything finished so far is in {a.out}, and the same command goes on" if getattr(a, "out", None) else ""
        print(f"\nstopped by Ctrl-C{saved}", file=sys.stderr)
        sys.exit(130)
    except (EvalError, OSError, ValueError) as e:
        fail(str(e))


# Run as a script, every command that loads no model runs here and exits: torch, imported below,
# is never imported for it. --help and a mistyped option answer here too, at once.
if __name__ == "__main__" and build_parser().parse_args(sys.argv[1:]).command not in MODEL_COMMANDS:
    main(sys.argv[1:])
    sys.exit()
if __name__ == "__main__":
    huge_pages_for_tensors()  # both commands load a model and answers decodes (see cli.py): before torch


# ---- checkpoints: dev loss and answers, the two commands that load a model ----
# Imported here, after the command line, on purpose: see the block above.

import checkpoint
import sample
import train
from data import DataError, load_conversations, load_dataset
from model import resolve_device, resolve_dtype


def run_with_model(a):
    """loss and answers."""
    try:
        if a.command == "loss":
            loss_table(a.run, a.dev, a.max_len, a.device, a.dtype)
        else:
            for path in write_answers(a.run, a.dev, a.epochs, a.batch_size, a.max_len, a.seed, a.device, a.dtype,
                                      a.temperature):
                print(f"wrote {path}")
    except DataError as e:  # a dev file that is not LIMA's format: one line, as every bad input
        raise EvalError(str(e)) from None


def epoch_checkpoints(run) -> dict[int, Path]:
    """{epoch: directory} of the run's complete epoch checkpoints (epoch-05, ...)."""
    found = {int(p.name.split("-")[1]): p for p in checkpoint.list_checkpoints(run) if p.name.startswith("epoch-")}
    if not found:
        raise EvalError(f"{run}: no complete epoch checkpoints (epoch-NN with a state.json)")
    return found


def loss_table(run, dev, max_len=2048, device="auto", dtype="auto") -> list[dict]:
    """Dev loss and perplexity of every epoch checkpoint, printed and written to RUN/eval/dev_loss.jsonl."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    load_conversations(dev, require_answer=True)  # checked before any checkpoint is loaded
    rows, examples = [], None
    print(f"{'checkpoint':<12} {'epoch':>5} {'step':>7} {'dev loss':>9} {'perplexity':>11}")
    for epoch, path in sorted(epoch_checkpoints(run).items()):
        model, tok = checkpoint.load_model(path, device, dtype)
        if examples is None:  # tokenized once, with the run's tokenizer, as train.py tokenizes it
            examples = load_dataset(dev, tok, max_len, verbose=False).examples
        # train.py's own dev loss: rows of 4,096 tokens (its default), or one conversation's max_len
        loss, n = train.dev_loss(model, examples, max(4096, max_len), device)
        step = checkpoint.read_state(path)["step"]
        rows.append(dict(checkpoint=path.name, epoch=epoch, step=step, dev_loss=loss,
                         perplexity=math.exp(loss), tokens=n))
        print(f"{path.name:<12} {epoch:>5} {step:>7} {loss:>9.4f} {math.exp(loss):>11.2f}")
        del model  # before the next one loads: never two models in memory at once
    judge.write_jsonl(Path(run) / "eval" / "dev_loss.jsonl", rows)
    return rows


def write_answers(run, dev, epochs: list[int], batch_size=8, max_len=2048, seed=0, device="auto",
                  dtype="auto", temperature=0.7) -> list[Path]:
    """RUN/eval/answers/epoch-NN.jsonl for each epoch: every dev prompt, with LIMA's decoding.

    The decoding is sample.py's defaults (the paper's: temperature 0.7, top-p 0.9, repetition
    penalty 1.2, stop at EOT), through its resumable file mode: an interrupted run goes on.
    """
    sample.read_prompts(dev)  # checked (not empty, ids unique) before any checkpoint is loaded
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    found = epoch_checkpoints(run)
    missing = [e for e in epochs if e not in found]
    if missing:
        raise EvalError(f"{run}: no checkpoint for epoch(s) {', '.join(map(str, missing))}; "
                        f"there are {', '.join(map(str, sorted(found)))}")
    written = []
    for epoch in epochs:
        out = Path(run) / "eval" / "answers" / f"{found[epoch].name}.jsonl"
        cfg = sample.Config(prompts=str(dev), out=str(out), batch_size=batch_size, max_len=max_len, seed=seed,
                            temperature=temperature)
        model, tok = checkpoint.load_model(found[epoch], device, dtype)
        sample.answer_file(model, tok, cfg, cfg, rank=0)  # a Config is also the decoding Settings
        written.append(out)
        del model  # before the next one loads: never two models in memory at once
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
