"""
Judging answers the way LIMA did: pairwise preference against a baseline and Fail / Pass / Excellent
ratings, by a person at the terminal or by a model behind an OpenAI-compatible endpoint, then the
tallies. No torch here: an annotator's laptop runs it. The commands are eval.py's:

    python eval.py compare --ours ours.jsonl --baseline alpaca.jsonl --annotator ana --out ann-ana.jsonl
    python eval.py judge --ours ours.jsonl --baseline alpaca.jsonl --url https://api.openai.com/v1 --model gpt-4 --out ann-gpt4.jsonl
    python eval.py tally ann-ana.jsonl ann-gpt4.jsonl
    python eval.py rate --answers ours.jsonl --sample 50 --annotator ana --out rate-ana.jsonl

Answer files are jsonl, one line per prompt: {"id", "prompt", "answer"}, and "history" (the earlier
turns) for a multi-turn prompt, as sample.py writes them. Annotation files are jsonl too, one line
per judgement: the prompt id, which side showed ours, the raw verdict, the result for ours, who, when.
"""

import http.client
import json
import math
import random
import re
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

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
    """Bad input or a refused request: eval.py prints it as one line and exits with status 2."""


class Quit(Exception):
    """A clean stop before the end (the annotator quit, the request limit): what is recorded stays recorded."""


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
                raise Quit("stopped; run the same command again to continue")
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
                raise Quit(f"request limit reached ({self.max_requests}); run again (or raise "
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

