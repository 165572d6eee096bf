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
"""

import argparse
import html
import http.client
import json
import math
import os
import random
import re
import string
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

# The judge's instructions, in plain sight: edit them here, or pass --judge_prompt FILE with the
# same {placeholders}. The pairwise question follows the annotation interface in LIMA's appendix,
# which its crowd workers saw and GPT-4 was given in the same words; the last paragraph is ours,
# so that a program can read the verdict off the reply.
JUDGE_PROMPT = """\
Imagine that you have a super-intelligent AI assistant, and that you require help with the
following question. Which answer best satisfies your needs?

Question: {prompt}

Answer A: {answer_a}

Answer B: {answer_b}

Comparing these two answers, which answer is better?
- Answer A is significantly better.
- Answer B is significantly better.
- Neither is significantly better.

Explain briefly, then end with exactly one line: "Verdict: A", "Verdict: B" or "Verdict: neither".
"""

# The three labels of LIMA's analysis (section 4.3), with the paper's definitions.
RATE_PROMPT = """\
Rate the answer that an AI assistant gave to the request below.

Request: {prompt}

Answer: {answer}

Fail: the answer did not meet the requirements of the request.
Pass: the answer met the requirements of the request.
Excellent: the answer is an excellent response to the request.

Explain briefly, then end with exactly one line: "Rating: Fail", "Rating: Pass" or "Rating: Excellent".
"""

RATINGS = ("Excellent", "Pass", "Fail")
RESULTS = ("win", "tie", "loss")  # from our model's side: LIMA's "LIMA wins / tie / LIMA loses"


class EvalError(Exception):
    """Bad input or a refused request: main prints it as one line and exits with status 2."""


class Stop(Exception):
    """A clean stop (the annotator quit, the request limit): what is recorded stays recorded."""


# ---- files ----

def read_jsonl(path) -> list[dict]:
    return [row for _, row in numbered_jsonl(path)]


def numbered_jsonl(path) -> list[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of a jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows


def check_record(r, where: str, what: str, strings=(), numbers=(), choices=None) -> dict:
    """A record of one of our files, checked: an object, with these keys holding strings or
    numbers, and the keys of choices {key: allowed values} holding one of theirs."""
    if not isinstance(r, dict):
        raise EvalError(f"{where}: expected a JSON object ({what}), not {json.dumps(r)[:40]}")
    for key in (*strings, *numbers, *(choices or {})):
        if key not in r:
            raise EvalError(f'{where}: no "{key}"; expected {what}')
    for key in strings:
        if not isinstance(r[key], str):
            raise EvalError(f'{where}: "{key}" must be a string, not {json.dumps(r[key])[:40]}')
    for key in numbers:
        if not isinstance(r[key], (int, float)) or isinstance(r[key], bool) or not math.isfinite(r[key]):
            raise EvalError(f'{where}: "{key}" must be a number, not {json.dumps(r[key])[:40]}')
    for key, allowed in (choices or {}).items():
        if r[key] not in allowed:
            raise EvalError(f'{where}: "{key}" is {json.dumps(r[key])[:40]}; expected one of {", ".join(allowed)}')
    return r


def check_id(r: dict, where: str):
    if not isinstance(r["id"], (str, int)) or isinstance(r["id"], bool):
        raise EvalError(f'{where}: "id" must be a string or an integer, not {json.dumps(r["id"])[:40]}')


def read_annotations(path) -> list[dict]:
    """An annotation file's records, each checked: a pairwise judgement {id, ours, baseline,
    annotator, ours_is, verdict, result} or a rating {id, system, annotator, rating}, as compare,
    judge and rate write them; any other line is refused, naming it, rather than left uncounted."""
    records = []
    for n, r in numbered_jsonl(path):
        where = f"{path}:{n}"
        check_record(r, where, "a judgement or a rating")
        if "baseline" in r:
            check_record(r, where, "a judgement {id, ours, baseline, annotator, result}", strings=("baseline",),
                         choices={"result": RESULTS})
            optional = {"verdict": ("A", "B", "neither"), "ours_is": ("A", "B")}
        elif "system" in r:
            check_record(r, where, "a rating {id, system, annotator, rating}", strings=("system",),
                         choices={"rating": RATINGS})
            optional = {}
        else:
            raise EvalError(f'{where}: neither a judgement (with "baseline") nor a rating (with "system")')
        if "id" not in r:
            raise EvalError(f'{where}: no "id" (of the prompt judged)')
        check_id(r, where)
        for key in ("ours", "annotator"):
            if key in r and not isinstance(r[key], str):
                raise EvalError(f'{where}: "{key}" must be a string, not {json.dumps(r[key])[:40]}')
        check_record(r, where, "an annotation", choices={k: v for k, v in optional.items() if k in r})
        records.append(r)
    return records


def write_jsonl(path, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def load_answers(path) -> dict[str, dict]:
    """An answer file -> {id as a string: record}; ids are compared as text so 7 matches "7"."""
    answers = {}
    rows = numbered_jsonl(path)
    if not rows:
        raise EvalError(f"{path}: empty file, no answers; expected one {{id, prompt, answer}} a line")
    for n, r in rows:
        check_record(r, f"{path}:{n}", "an answer {id, prompt, answer}")
        missing = [k for k in ("id", "prompt", "answer") if k not in r]
        if missing:
            raise EvalError(f"{path}:{n}: no {', '.join(missing)}; expected {{id, prompt, answer}}")
        check_record(r, f"{path}:{n}", "an answer {id, prompt, answer}", strings=("prompt", "answer"))
        check_id(r, f"{path}:{n}")
        history = r.get("history") or []
        if not isinstance(history, list) or not all(isinstance(t, str) for t in history):
            raise EvalError(f'{path}:{n}: "history" must be a list of strings (the earlier turns), '
                            f'not {json.dumps(r["history"])[:40]}')
        if str(r["id"]) in answers:
            raise EvalError(f"{path}:{n}: id {r['id']} appears twice")
        answers[str(r["id"])] = r
    return answers


def prompt_text(record: dict) -> str:
    """The prompt as a reader or judge sees it: earlier turns of a multi-turn prompt first."""
    history = record.get("history") or []
    turns = [f"[{('User', 'Assistant')[i % 2]}] {t}" for i, t in enumerate(history)]
    return "\n\n".join(turns + ([f"[User] {record['prompt']}"] if history else [record["prompt"]]))


def pair_answers(ours_path, baseline_path) -> list[dict]:
    """Ours and the baseline's answers, matched by id; the two files must hold the same prompts."""
    ours, base = load_answers(ours_path), load_answers(baseline_path)
    if ours.keys() != base.keys():
        only = sorted(ours.keys() ^ base.keys())
        raise EvalError(f"{ours_path} and {baseline_path} answer different prompts "
                        f"({len(only)} id(s) in one only, e.g. {', '.join(only[:3])})")
    for i in ours:
        if prompt_text(ours[i]).strip() != prompt_text(base[i]).strip():
            raise EvalError(f"id {i}: the prompt differs between {ours_path} and {baseline_path}")
    return [dict(id=ours[i]["id"], prompt=prompt_text(ours[i]), ours=ours[i]["answer"],
                 baseline=base[i]["answer"]) for i in ours]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- the annotation loop, shared by people and judges ----

def annotate(items: list[dict], out, annotator: str, group: dict, decide) -> int:
    """Ask decide(item, progress) about every item not yet in `out`; return how many it skipped.

    `group` ({"ours": name, "baseline": name} or {"system": name}) and the annotator identify
    earlier records of the same job, so running the same command again continues where the last
    run stopped. Each record is written and flushed as soon as it exists: a quit, a crash or a
    dead endpoint loses nothing. decide returns the record's fields, or None to leave the item
    for the next run.
    """
    group = {**group, "annotator": annotator}
    earlier = read_annotations(out) if Path(out).is_file() else []
    done = {str(r.get("id")) for r in earlier if all(r.get(k) == v for k, v in group.items())}
    todo = [item for item in items if str(item["id"]) not in done]
    print(f"{out}: {len(items) - len(todo)} of {len(items)} already done by {annotator}", file=sys.stderr)
    skipped = 0
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for n, item in enumerate(todo, len(items) - len(todo) + 1):
            fields = decide(item, f"{n}/{len(items)}")
            if fields is None:
                skipped += 1
                continue
            record = {"id": item["id"], **group, **fields, "time": now()}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
    return skipped


def ours_is_for(item_id, seed: int) -> str:
    """Which side, "A" or "B", shows our answer: a coin per prompt, seeded, and always recorded."""
    return random.Random(f"{seed}:{item_id}").choice("AB")


def result_for_ours(verdict: str, ours_is: str) -> str:
    """Undo the blinding: a raw verdict (A, B, neither) -> win, tie or loss for our model."""
    return "tie" if verdict == "neither" else "win" if verdict == ours_is else "loss"


# ---- people, in the terminal ----

VERDICTS = {"a": "A", "b": "B", "n": "neither"}  # the key a person types -> the verdict
RATING_KEYS = {"e": "Excellent", "p": "Pass", "f": "Fail"}


def human(keys: dict, ask=input):
    """A labeller that is a person at the terminal: the prompt and the answer(s), then one key."""
    menu = ", ".join(f"{k} = {v}" for k, v in keys.items()) + ", q = stop > "

    def read(text: str) -> str:
        try:
            return ask(text).strip().lower()
        except EOFError:  # Ctrl-D, or the end of piped input: stop as q does
            return "q"

    def label(fields: dict, progress: str):
        rule = "-" * 72
        screen = f"\n{rule}\nprompt {progress}\n\n{fields['prompt']}\n"
        for name, title in (("answer_a", "A"), ("answer_b", "B"), ("answer", "answer")):
            if name in fields:  # the two answers are shown as A and B: nothing says which is ours
                screen += f"{rule}\n{title}:\n\n{fields[name]}\n"
        key = read(f"{screen}{rule}\n{menu}")
        while key not in keys:
            if key == "q":
                raise Stop("stopped; run the same command again to continue")
            key = read(f"type one of {', '.join(keys)} (or q to stop): ")
        return keys[key], {}
    return label


# ---- model judges, over HTTP with the standard library ----

class Judge:
    """An OpenAI-compatible chat endpoint, with a timeout, retries and a limit on requests."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120,
                 retries: int = 3, max_requests: int = 1000, backoff: float = 2.0):
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.max_requests, self.backoff = retries, max_requests, backoff
        self.requests = 0

    def chat(self, text: str) -> str:
        # No temperature: the endpoint's default, so a retry after an unreadable reply can differ.
        body = {"model": self.model, "messages": [{"role": "user", "content": text}]}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            content = json.loads(response.read())["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise ValueError("the reply has no message content")
        return content

    def ask(self, text: str, parse):
        """(parse(reply), reply) from the first readable reply, or None once the retries are spent.

        Timeouts, dropped connections, 5xx, 429 and replies without a verdict are retried with
        exponential backoff; any other 4xx (a bad key, an unknown model) will not get better
        by asking again, so it stops the run.
        """
        for attempt in range(self.retries + 1):
            if self.requests >= self.max_requests:
                raise Stop(f"request limit reached ({self.max_requests}); run again (or raise "
                           f"--max_requests) to continue")
            self.requests += 1
            try:
                reply = self.chat(text)
                value = parse(reply)
                if value is not None:
                    return value, reply
                problem = f"no verdict in the reply: {reply[-80:]!r}"
            except urllib.error.HTTPError as e:
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    raise EvalError(f"{self.endpoint}: HTTP {e.code} {e.reason}") from None
                problem = f"HTTP {e.code} {e.reason}"
            except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError) as e:
                # timeouts are OSErrors; a broken status line or a short body, HTTPExceptions
                problem = f"{type(e).__name__}: {e}"
            print(f"judge, attempt {attempt + 1}/{self.retries + 1}: {problem}", file=sys.stderr)
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        return None


def last_match(pattern: str, reply: str, values) -> str | None:
    """The last `pattern` match in the reply, mapped onto the canonical spelling in values."""
    found = re.findall(pattern, reply, flags=re.IGNORECASE)
    return next((v for v in values if found and v.lower() == found[-1].lower()), None)


def parse_verdict(reply: str) -> str | None:
    return last_match(r"verdict\W*(A|B|neither)\b", reply, ("A", "B", "neither"))


def parse_rating(reply: str) -> str | None:
    return last_match(r"rating\W*(fail|pass|excellent)\b", reply, RATINGS)


def fill(template: str, **values) -> str:
    """Put the values in place of {name} in the template, in one pass over the template only.

    Not str.format: answers are full of braces (code, JSON, LaTeX). And not one str.replace per
    name: a value already inserted that itself says {answer_b} would be substituted next.
    """
    pattern = "|".join(re.escape("{" + name + "}") for name in values)
    return re.sub(pattern, lambda m: values[m.group(0)[1:-1]], template)


def judged(judge: Judge, template: str, parse):
    """A labeller that is a model: the template filled with the fields, the reply parsed."""
    def label(fields: dict, progress: str):
        got = judge.ask(fill(template, **fields), parse)
        print(f"{progress}: {got[0] if got else 'no verdict; left for the next run'}", file=sys.stderr)
        return None if got is None else (got[0], {"reply": got[1]})
    return label


def read_template(path, default: str, needed: tuple) -> str:
    template = Path(path).read_text() if path else default
    missing = [p for p in needed if "{" + p + "}" not in template]
    if missing:
        raise EvalError(f"{path}: the judging prompt lacks {', '.join('{' + p + '}' for p in missing)}")
    return template


def compare(ours, baseline, out, annotator: str, label, seed=0, baseline_name=None) -> int:
    """Pairwise preference, ours against a baseline, by a person or a judge; returns items skipped."""
    def decide(item, progress):
        ours_is = ours_is_for(item["id"], seed)
        a, b = (item["ours"], item["baseline"]) if ours_is == "A" else (item["baseline"], item["ours"])
        got = label(dict(prompt=item["prompt"], answer_a=a, answer_b=b), progress)
        return None if got is None else dict(ours_is=ours_is, verdict=got[0],
                                             result=result_for_ours(got[0], ours_is), **got[1])
    group = dict(ours=Path(ours).stem, baseline=baseline_name or Path(baseline).stem)
    return annotate(pair_answers(ours, baseline), out, annotator, group, decide)


def rate(answers, out, annotator: str, label, sample=0, seed=0) -> int:
    """Fail / Pass / Excellent for every answer, or a seeded sample of them (LIMA rated 50)."""
    records = list(load_answers(answers).values())
    if sample:
        if sample > len(records):
            raise EvalError(f"--sample {sample} but {answers} holds {len(records)} answers")
        records = [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), sample))]
    items = [dict(id=r["id"], prompt=prompt_text(r), answer=r["answer"]) for r in records]

    def decide(item, progress):
        got = label(dict(prompt=item["prompt"], answer=item["answer"]), progress)
        return None if got is None else dict(rating=got[0], **got[1])
    return annotate(items, out, annotator, {"system": Path(answers).stem}, decide)


# ---- tallies: win / tie / loss, agreement, Fail / Pass / Excellent ----

def latest(records: list[dict], field: str) -> dict:
    """{(group, id, annotator): record}, the last record winning: a prompt judged again by the
    same annotator replaces the first judgement, and every annotator's judgement counts."""
    return {(r.get(field), str(r.get("id")), r.get("annotator")): r for r in records if field in r}


def percentages(records: list[dict], field: str, value: str, labels: tuple) -> dict[str, dict]:
    """Per `field` (baseline, or rated system): how many, and the percentage of each label."""
    groups = {}
    for (group, _, _), r in latest(records, field).items():
        groups.setdefault(group, []).append(r[value])
    return {g: dict(n=len(v), **{k: 100 * v.count(k) / len(v) for k in labels}) for g, v in groups.items()}


def win_tie_loss(records: list[dict]) -> dict[str, dict]:
    """Per baseline: the number of prompts and the percentage of each result, from our side."""
    ours = sorted({str(r.get("ours")) for r in records if "baseline" in r})
    if len(ours) > 1:
        raise EvalError(f"judgements of {len(ours)} of our systems ({', '.join(ours)}) in one file: "
                        f"keep one system's judgements per file")
    return percentages(records, "baseline", "result", RESULTS)


def rating_tally(records: list[dict]) -> dict[str, dict]:
    """Per system: the number of answers rated and the percentage with each rating (LIMA's fig. 3)."""
    return percentages(records, "system", "rating", RATINGS)


def agreement(records1: list[dict], records2: list[dict]) -> tuple[float, int]:
    """Tie-discounted agreement of two annotators over the (baseline, prompt) pairs both judged.

    LIMA (section 4.1): "one point if both annotators agreed, half a point if either annotator
    (but not both) labeled a tie, and zero point otherwise". We compare the results from our
    model's side (win / tie / loss), since each annotator saw the two answers in its own order.
    """
    for records in (records1, records2):
        names = sorted({str(r.get("annotator")) for r in records if "baseline" in r})
        if len(names) > 1:
            raise EvalError(f"agreement compares two annotators, one per file; one file holds {', '.join(names)}")
    one, two = ({k[:2]: r for k, r in latest(records, "baseline").items()} for records in (records1, records2))
    shared = sorted(one.keys() & two.keys(), key=str)
    if not shared:
        return float("nan"), 0
    def score(x, y):
        return 1.0 if x == y else 0.5 if "tie" in (x, y) else 0.0
    return sum(score(one[k]["result"], two[k]["result"]) for k in shared) / len(shared), len(shared)


def tally_text(path) -> str:
    records = read_annotations(path)
    annotators = ", ".join(sorted({str(r.get("annotator")) for r in records}))
    lines = [f"{path} ({annotators})"]
    pairwise, ratings = win_tie_loss(records), rating_tally(records)
    if pairwise:
        lines.append(f"  {'baseline':<20} {'n':>5} {'ours wins':>10} {'tie':>7} {'baseline wins':>14}")
        lines += [f"  {b:<20} {t['n']:>5} {t['win']:>9.1f}% {t['tie']:>6.1f}% {t['loss']:>13.1f}%"
                  for b, t in pairwise.items()]
    if ratings:
        lines.append(f"  {'system':<20} {'n':>5} " + " ".join(f"{k:>10}" for k in RATINGS))
        lines += [f"  {s:<20} {t['n']:>5} " + " ".join(f"{t[k]:>9.1f}%" for k in RATINGS)
                  for s, t in ratings.items()]
    if not (pairwise or ratings):
        raise EvalError(f"{path}: no pairwise (baseline) or rating (system) records")
    return "\n".join(lines)


# ---- subsets of the training data, for the ablations ----

def subset(data, out, source: str = "", n: int = 0, seed: int = 0) -> list[dict]:
    """Rows of a LIMA jsonl whose source is one of `source` (comma-separated), then n of them.

    LIMA's ablations (section 5) train on a few thousand examples drawn from one source at a
    time: filtered Stack Exchange against wikiHow (diversity), filtered against unfiltered Stack
    Exchange (quality), and growing samples of one source (quantity). Each is a subset here.
    """
    numbered = numbered_jsonl(data)
    for line, r in numbered:
        check_record(r, f"{data}:{line}", "a conversation {conversations, source}")
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
    write_jsonl(out, rows)
    return rows


# ---- checkpoints: dev loss and answers ----
# torch, data.py, checkpoint.py and sample.py are imported inside these two functions only: the
# annotation, judging, tallying and report commands then run on an annotator's laptop without torch.

def epoch_checkpoints(run) -> dict[int, Path]:
    """{epoch: directory} of the run's complete epoch checkpoints (epoch-05, ...)."""
    from checkpoint import list_checkpoints
    found = {int(p.name.split("-")[1]): p for p in list_checkpoints(run) if p.name.startswith("epoch-")}
    if not found:
        raise EvalError(f"{run}: no complete epoch checkpoints (epoch-NN with a state.json)")
    return found


def device_and_dtype(device: str, dtype: str):
    from model import resolve_device, resolve_dtype
    device = resolve_device(device)
    return device, resolve_dtype(dtype, device)


def dev_loss(model, tok, conversations: list[list[str]], max_len: int) -> tuple[float, int]:
    """(mean cross-entropy per trained token, number of trained tokens): answers only, as trained."""
    import torch
    import torch.nn.functional as F
    from data import IGNORE, tokenize_conversation
    device = model.tok_embeddings.weight.device
    total, count = 0.0, 0
    with torch.no_grad():
        for turns in conversations:  # one at a time: 50 dev prompts need no packing
            tokens, targets, _ = tokenize_conversation(tok, turns, max_len, train_on_prompt=False)
            tokens = torch.as_tensor(tokens, device=device)[None]  # (1, T)
            targets = torch.as_tensor(targets, device=device)  # (T,), already shifted by one
            logits = model(tokens)[0].float()  # (T, V); log-softmax in float32 for bf16 weights
            total += F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum").item()
            count += (targets != IGNORE).sum().item()
    return total / max(count, 1), count


def loss_table(run, dev, max_len=2048, device="auto", dtype="auto") -> list[dict]:
    """Dev loss and perplexity of every epoch checkpoint, printed and written to RUN/eval/dev_loss.jsonl."""
    from checkpoint import read_state
    from checkpoint import load_model
    from data import load_conversations
    device, dtype = device_and_dtype(device, dtype)
    conversations = [r["conversations"] for r in load_conversations(dev, require_answer=True)]
    rows = []
    print(f"{'checkpoint':<12} {'epoch':>5} {'step':>7} {'dev loss':>9} {'perplexity':>11}")
    for epoch, path in sorted(epoch_checkpoints(run).items()):
        model, tok = load_model(path, device, dtype)
        loss, n = dev_loss(model, tok, conversations, max_len)
        step = read_state(path)["step"]
        rows.append(dict(checkpoint=path.name, epoch=epoch, step=step, dev_loss=loss,
                         perplexity=math.exp(loss), tokens=n))
        print(f"{path.name:<12} {epoch:>5} {step:>7} {loss:>9.4f} {math.exp(loss):>11.2f}")
        del model  # before the next one loads: never two models in memory at once
    write_jsonl(Path(run) / "eval" / "dev_loss.jsonl", rows)
    return rows


def parse_epochs(text: str) -> list[int]:
    """"5-10" or "5,7,9" -> a list of epochs."""
    try:
        if "-" in text:
            first, last = map(int, text.split("-"))
            epochs = list(range(first, last + 1))
        else:
            epochs = [int(e) for e in text.split(",")]
    except ValueError:
        raise EvalError(f"--epochs {text}: expected a range like 5-10 or a list like 5,7,9") from None
    if not epochs or min(epochs) < 1 or len(set(epochs)) < len(epochs):
        raise EvalError(f"--epochs {text}: expected a range like 5-10 (first <= last) or a list like 5,7,9 "
                        f"of distinct epochs, counted from 1")
    return epochs


def write_answers(run, dev, epochs: list[int], batch_size=8, max_tokens=2048, seed=0, device="auto",
                  dtype="auto") -> list[Path]:
    """RUN/eval/answers/epoch-NN.jsonl for each epoch: every dev prompt, with LIMA's decoding.

    The decoding is sample.py's defaults (the paper's: temperature 0.7, top-p 0.9, repetition
    penalty 1.2, stop at EOT), through its resumable file mode: an interrupted run goes on.
    """
    import sample
    from checkpoint import load_model
    sample.read_prompts(dev)  # checked (not empty, ids unique) before any checkpoint is loaded
    device, dtype = device_and_dtype(device, dtype)
    found = epoch_checkpoints(run)
    missing = [e for e in epochs if e not in found]
    if missing:
        raise EvalError(f"{run}: no checkpoint for epoch(s) {', '.join(map(str, missing))}; "
                        f"there are {', '.join(map(str, sorted(found)))}")
    written = []
    for epoch in epochs:
        out = Path(run) / "eval" / "answers" / f"{found[epoch].name}.jsonl"
        cfg = sample.Config(prompts=str(dev), out=str(out), batch_size=batch_size, max_tokens=max_tokens, seed=seed)
        model, tok = load_model(found[epoch], device, dtype)
        sample.answer_file(model, tok, cfg, cfg, rank=0)  # a Config is also the decoding Settings
        written.append(out)
        del model  # before the next one loads: never two models in memory at once
    return written


# ---- the HTML report: one file, inline SVG charts, no scripts ----

PAGE = string.Template("""<!doctype html>
<html><head><meta charset="utf-8"><title>$title</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em; color: #222; }
h2 { margin-top: 2em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
.answers td, .answers th { min-width: 26em; max-width: 34em; }
.answers .prompt { position: sticky; left: 0; background: #f6f6f6; min-width: 20em; }
.text { white-space: pre-wrap; max-height: 30em; overflow-y: auto; }
svg text { font: 12px system-ui, sans-serif; }
</style></head><body>
<h1>$title</h1>
$body
</body></html>
""")

COLORS = {"win": "#3a8f5c", "tie": "#b8b8b8", "loss": "#c9543f",
          "Excellent": "#3a8f5c", "Pass": "#9cc7a8", "Fail": "#c9543f"}


def svg_lines(series: list[tuple], xlabel: str, ylabel: str, width=760, height=320) -> str:
    """A line chart of series [(name, color, [(x, y), ...])], with axes, ticks and a legend."""
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    left, right, top, bottom = 60, 20, 20, 40  # margins, in pixels

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           f'fill="none" stroke="#999"/>']
    for i in range(5):  # five ticks on each axis
        x, y = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
        tx, ty = px(x, y)
        out.append(f'<text x="{tx:.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:.3g}</text>')
        out.append(f'<text x="{left - 6}" y="{ty + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="14" y="{(top + height - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(top + height - bottom) / 2})">{ylabel}</text>')
    for i, (name, color, pts) in enumerate(series):
        coords = [px(x, y) for x, y in pts]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in coords) + '"/>')
        if len(pts) <= 40:  # few points (one per epoch): mark each one
            out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in coords]
        out.append(f'<text x="{width - right - 8}" y="{top + 16 + 16 * i}" text-anchor="end" '
                   f'fill="{color}">{html.escape(name)}</text>')
    return "\n".join(out + ["</svg>"])


def svg_stacked_bars(rows: list[tuple], keys: tuple, labels: tuple, width=760) -> str:
    """100% horizontal bars, one per row [(label, {key: percent})], as in LIMA's figure 1."""
    left, bar, gap = 180, 26, 10
    height = 30 + len(rows) * (bar + gap)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    for j, (key, label) in enumerate(zip(keys, labels)):  # the legend, across the top
        out.append(f'<rect x="{left + 150 * j}" y="4" width="12" height="12" fill="{COLORS[key]}"/>'
                   f'<text x="{left + 150 * j + 16}" y="15">{html.escape(label)}</text>')
    for i, (name, pct) in enumerate(rows):
        y, x = 30 + i * (bar + gap), left
        out.append(f'<text x="{left - 8}" y="{y + bar / 2 + 4}" text-anchor="end">{html.escape(name)}</text>')
        for key in keys:
            w = pct[key] / 100 * (width - left - 10)
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" fill="{COLORS[key]}"/>')
            if w > 34:  # room for the number
                out.append(f'<text x="{x + w / 2:.1f}" y="{y + bar / 2 + 4}" text-anchor="middle">'
                           f'{pct[key]:.0f}%</text>')
            x += w
    return "\n".join(out + ["</svg>"])


def loss_curves(metrics_path) -> str:
    """Training loss per step and dev loss per epoch from train.py's metrics.jsonl, as a chart."""
    # A resumed run logs the steps after its checkpoint again: the last record of a step wins.
    train, dev = {}, {}
    for n, r in numbered_jsonl(metrics_path):
        kind = next((k for k in ("loss", "dev_loss") if isinstance(r, dict) and k in r), None)
        if kind is None:  # a step's record or an epoch's, as train.py writes them
            check_record(r, f"{metrics_path}:{n}", "a train.py metrics record")
            raise EvalError(f'{metrics_path}:{n}: neither "loss" nor "dev_loss"; not a train.py metrics record')
        check_record(r, f"{metrics_path}:{n}", "a train.py metrics record", numbers=("step", "epoch", kind))
        if "loss" in r:
            train[r["step"]] = (r["epoch"], r["loss"])
        if "dev_loss" in r:
            dev[r["step"]] = (r["epoch"], r["dev_loss"])
    series = [(name, color, [pts[k] for k in sorted(pts)])
              for name, color, pts in (("train loss", "#4a6fa5", train), ("dev loss", "#c9543f", dev)) if pts]
    return svg_lines(series, "epoch", "loss") if series else "<p>no losses in the metrics file</p>"


def table(header: list[str], rows: list[list]) -> str:
    cell = lambda v: f'<td class="num">{v:.4g}</td>' if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows) + "</table>")


def answers_grid(files: list[Path]) -> str:
    """Prompts down the side, one column per answer file (per epoch), each cell the full answer."""
    columns = [(f.stem, load_answers(f)) for f in files]
    ids = list(dict.fromkeys(i for _, answers in columns for i in answers))  # first seen, first shown
    head = "<tr><th>prompt</th>" + "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns) + "</tr>"
    rows = []
    for i in ids:
        first = next(answers[i] for _, answers in columns if i in answers)
        cells = [f'<div class="text">{html.escape(answers[i]["answer"])}</div>' if i in answers
                 else "<em>no answer</em>" for _, answers in columns]
        rows.append(f'<tr><td class="prompt"><b>{html.escape(i)}</b><div class="text">'
                    f'{html.escape(prompt_text(first))}</div></td>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<div class="scroll"><table class="answers">{head}{"".join(rows)}</table></div>'


def report(run, pairwise=(), ratings=(), out=None) -> Path:
    """Write RUN/eval/report.html (or `out`) from whatever of the run's results exist."""
    run = Path(run)
    parts = []
    if (run / "metrics.jsonl").is_file():
        parts += ["<h2>Loss curves</h2>", loss_curves(run / "metrics.jsonl")]
    if (run / "eval" / "dev_loss.jsonl").is_file():
        rows = [check_record(r, f"{run / 'eval' / 'dev_loss.jsonl'}:{n}", "a row of eval.py loss",
                             strings=("checkpoint",), numbers=("epoch", "step", "dev_loss", "perplexity", "tokens"))
                for n, r in numbered_jsonl(run / "eval" / "dev_loss.jsonl")]
        parts += ["<h2>Dev loss per checkpoint</h2>",
                  table(["checkpoint", "epoch", "step", "dev loss", "perplexity", "tokens"],
                        [[r["checkpoint"], r["epoch"], r["step"], r["dev_loss"], r["perplexity"], r["tokens"]]
                         for r in rows])]
    for path in pairwise:
        bars = [(b, t) for b, t in win_tie_loss(read_annotations(path)).items()]
        parts += [f"<h2>Pairwise preference: {html.escape(str(path))}</h2>",
                  svg_stacked_bars(bars, RESULTS, ("ours wins", "tie", "baseline wins")),
                  table(["baseline", "n", "ours wins %", "tie %", "baseline wins %"],
                        [[b, t["n"], t["win"], t["tie"], t["loss"]] for b, t in bars])]
    for path in ratings:
        bars = list(rating_tally(read_annotations(path)).items())
        parts += [f"<h2>Absolute ratings: {html.escape(str(path))}</h2>", svg_stacked_bars(bars, RATINGS, RATINGS),
                  table(["system", "n"] + [f"{k} %" for k in RATINGS], [[s, t["n"]] + [t[k] for k in RATINGS]
                                                                       for s, t in bars])]
    answer_files = sorted((run / "eval" / "answers").glob("*.jsonl"))
    if answer_files:
        parts += ["<h2>Answers to the dev prompts</h2>", answers_grid(answer_files)]
    if not parts:
        raise EvalError(f"{run}: nothing to report (no metrics.jsonl, eval/dev_loss.jsonl or eval/answers/)")
    out = Path(out) if out else run / "eval" / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(PAGE.substitute(title=html.escape(f"lima: {run}"), body="\n".join(parts)))
    return out


# ---- command line ----

class Parser(argparse.ArgumentParser):
    """argparse, with errors as one `error:` line, and no abbreviated options (--max_tok would
    silently mean --max_tokens, and quietly change meaning when another option starts alike)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        fail(message)


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def at_least(low, kind=int):
    """An argparse type: a number of this kind, at least low (for a float: greater than low)."""
    def number(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"not {text!r}") from None
        if not (math.isfinite(value) and (value >= low if kind is int else value > low)):
            raise argparse.ArgumentTypeError(f"must be {'at least' if kind is int else 'greater than'} "
                                             f"{low}, not {text!r}")
        return value
    return number


def device_name(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, not {text!r}")
    return text


def build_parser() -> Parser:
    p = Parser(description="LIMA's evaluation; see the commands at the top of eval.py")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, help, *required):
        c = sub.add_parser(name, help=help)
        for flag in required:
            c.add_argument(f"--{flag}", required=True)
        return c

    def model_options(c):
        c.add_argument("--device", type=device_name, default="auto", help="auto: cuda if available, else cpu")
        c.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="auto: bf16 on GPU, fp32 on CPU")

    def judge_options(c):
        c.add_argument("--judge_prompt", help="a file to use instead of the prompt at the top of eval.py")
        c.add_argument("--retries", type=at_least(0), default=3, help="further tries for one prompt")
        c.add_argument("--timeout", type=at_least(0, float), default=120, help="seconds per request")
        c.add_argument("--max_requests", type=at_least(1), default=1000, help="requests in this run, at most")

    c = command("loss", "dev loss and perplexity of every epoch checkpoint", "run", "dev")
    c.add_argument("--max_len", type=at_least(1), default=2048)
    model_options(c)
    c = command("answers", "answers to the dev prompts for chosen epochs", "run", "dev")
    c.add_argument("--epochs", default="5-10", help="a range like 5-10 or a list like 5,7,9")
    c.add_argument("--batch_size", type=at_least(1), default=8)
    c.add_argument("--max_tokens", type=at_least(1), default=2048, help="prompt + answer, in all (LIMA: 2048)")
    c.add_argument("--seed", type=int, default=0)
    model_options(c)
    c = command("report", "one self-contained HTML page of the run's results", "run")
    c.add_argument("--pairwise", nargs="*", default=[], help="annotation files to chart")
    c.add_argument("--ratings", nargs="*", default=[], help="rating files to chart")
    c.add_argument("--out", help="default: RUN/eval/report.html")
    c = command("compare", "pairwise preference by a person, blind, resumable", "ours", "baseline",
                "annotator", "out")
    c.add_argument("--baseline_name", help="default: the baseline file's name")
    c.add_argument("--seed", type=int, default=0, help="for the A/B order")
    c = command("judge", "pairwise preference by a model behind an OpenAI-compatible endpoint", "ours",
                "baseline", "url", "model", "out")
    c.add_argument("--annotator", help="the judge's name in the records; default: --model")
    c.add_argument("--baseline_name", help="default: the baseline file's name")
    c.add_argument("--seed", type=int, default=0, help="for the A/B order")
    judge_options(c)
    c = command("tally", "win / tie / loss, ratings, and the agreement of two files")
    c.add_argument("files", nargs="+", metavar="FILE.jsonl")
    c = command("rate", "Fail / Pass / Excellent per answer, by a person or (--url, --model) a judge",
                "answers", "out")
    c.add_argument("--annotator", help="required for a person; default for a judge: --model")
    c.add_argument("--sample", type=at_least(0), default=0, help="rate a seeded sample of this many (0: all)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--url")
    c.add_argument("--model")
    judge_options(c)
    c = command("subset", "a training file for the ablations: by source and/or a seeded sample", "data", "out")
    c.add_argument("--subset_source", default="", help="keep these sources (comma-separated)")
    c.add_argument("--subset_n", type=at_least(0), default=0, help="then keep this many, sampled (0: all)")
    c.add_argument("--seed", type=int, default=0)
    return p


def make_judge(a) -> Judge:
    if not re.match(r"https?://[^/\s]", a.url):
        raise EvalError(f"--url {a.url}: expected an http:// or https:// address (an OpenAI-compatible endpoint)")
    return Judge(a.url, a.model, os.environ.get("OPENAI_API_KEY"), a.timeout, a.retries, a.max_requests)


def run_command(a):
    if a.command == "loss":
        loss_table(a.run, a.dev, a.max_len, a.device, a.dtype)
    elif a.command == "answers":
        for path in write_answers(a.run, a.dev, parse_epochs(a.epochs), a.batch_size, a.max_tokens, a.seed,
                                  a.device, a.dtype):
            print(f"wrote {path}")
    elif a.command == "report":
        print(f"wrote {report(a.run, a.pairwise, a.ratings, a.out)}")
    elif a.command in ("compare", "judge"):
        if a.command == "compare":
            who, label = a.annotator, human(VERDICTS)
        else:
            template = read_template(a.judge_prompt, JUDGE_PROMPT, ("prompt", "answer_a", "answer_b"))
            who, label = a.annotator or a.model, judged(make_judge(a), template, parse_verdict)
        skipped = compare(a.ours, a.baseline, a.out, who, label, a.seed, a.baseline_name)
        print(f"done{f'; {skipped} left without a verdict: run again to retry them' if skipped else ''}")
        print(tally_text(a.out))
    elif a.command == "tally":
        if len(a.files) > 2:
            raise EvalError("tally takes one annotation file, or two to measure their agreement")
        print("\n".join(tally_text(f) for f in a.files))
        if len(a.files) == 2:
            score, n = agreement(read_annotations(a.files[0]), read_annotations(a.files[1]))
            print(f"agreement (tie-discounted) on {n} shared judgements: "
                  + (f"{100 * score:.1f}%" if n else "none shared"))
    elif a.command == "rate":
        if a.url or a.model:
            if not (a.url and a.model):
                raise EvalError("a judge needs both --url and --model")
            template = read_template(a.judge_prompt, RATE_PROMPT, ("prompt", "answer"))
            who, label = a.annotator or a.model, judged(make_judge(a), template, parse_rating)
        elif not a.annotator:
            raise EvalError("rate needs --annotator NAME (a person) or --url and --model (a judge)")
        else:
            who, label = a.annotator, human(RATING_KEYS)
        skipped = rate(a.answers, a.out, who, label, a.sample, a.seed)
        print(f"done{f'; {skipped} left without a rating: run again to retry them' if skipped else ''}")
        print(tally_text(a.out))
    elif a.command == "subset":
        rows = subset(a.data, a.out, a.subset_source, a.subset_n, a.seed)
        print(f"wrote {len(rows)} conversations to {a.out}")


def main(argv: list[str]):
    a = build_parser().parse_args(argv)
    try:
        run_command(a)
    except Stop as e:  # a chosen stop: everything recorded so far is in the file
        print(e, file=sys.stderr)
    except KeyboardInterrupt:  # judgements, ratings and answers are appended as each is made
        saved = f": everything finished so far is in {a.out}, and the same command goes on" if getattr(a, "out", None) else ""
        print(f"\nstopped by Ctrl-C{saved}", file=sys.stderr)
        sys.exit(130)
    except (EvalError, OSError, ValueError) as e:
        fail(str(e))
    except Exception as e:
        data = sys.modules.get("data")  # imported only by the commands that run a model
        if data is None or not isinstance(e, data.DataError):
            raise
        fail(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
