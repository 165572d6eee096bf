"""eval.py: tallies and agreement against hand-computed numbers, the blind A/B order undone,
resumed annotation, a model judge against a scripted local server (good, malformed, slow and
failing replies), the HTML report, subsets, and dev loss / answers from tiny checkpoints."""

import html
import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import eval as ev
import judge
import report

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answer_files(tmp_path, n=10):
    """Ours and a baseline's answers to the same n prompts; ours are recognisable by 'OURS'."""
    prompts = [f"prompt {i}: what is {i} + {i}?" for i in range(n)]
    ours = write(tmp_path / "epoch-07.jsonl", [dict(id=i, prompt=p, answer=f"OURS says {2 * i}")
                                                for i, p in enumerate(prompts)])
    base = write(tmp_path / "alpaca.jsonl", [dict(id=i, prompt=p, answer=f"base says {2 * i + 1}")
                                              for i, p in enumerate(prompts)])
    return ours, base


def oracle(screen: str) -> str:
    """An annotator who always prefers our answer: it finds which side shows it."""
    a = screen.split("\nA:\n")[1].split("\nB:\n")[0]
    return "a" if "OURS" in a else "b"


# ---- tallies against hand-computed numbers ----

def pairwise_record(i, baseline, result, annotator="ana"):
    return dict(id=i, ours="epoch-07", baseline=baseline, annotator=annotator, result=result)


def test_win_tie_loss_per_baseline_matches_hand_count(tmp_path):
    alpaca = ["win"] * 5 + ["tie"] * 3 + ["loss"] * 2  # 50 / 30 / 20
    davinci = ["win", "tie", "loss", "loss"]  # 25 / 25 / 50
    records = ([pairwise_record(i, "alpaca", r) for i, r in enumerate(alpaca)]
               + [pairwise_record(i, "davinci", r) for i, r in enumerate(davinci)])
    records.append(pairwise_record(9, "alpaca", "win"))  # annotated again: replaces the loss
    t = judge.win_tie_loss(records)
    assert t["alpaca"] == dict(n=10, win=60.0, tie=30.0, loss=10.0)
    assert t["davinci"] == dict(n=4, win=25.0, tie=25.0, loss=50.0)
    # a second annotator in the same file adds her judgements; she replaces nobody's
    records += [pairwise_record(i, "davinci", "win", "bo") for i in range(4)]
    assert judge.win_tie_loss(records)["davinci"] == dict(n=8, win=62.5, tie=12.5, loss=25.0)
    with pytest.raises(judge.EvalError, match="one file holds ana, bo"):
        judge.agreement(records, records)


def test_tie_discounted_agreement_matches_hand_computation():
    one = ["win", "win", "win", "tie", "tie", "loss", "loss", "loss"]
    two = ["win", "tie", "loss", "tie", "loss", "loss", "win", "tie"]
    # 1 + 0.5 + 0 + 1 + 0.5 + 1 + 0 + 0.5 = 4.5 over 8; prompt 8 is judged by the first only
    r1 = [pairwise_record(i, "alpaca", r) for i, r in enumerate(one)] + [pairwise_record(8, "alpaca", "win")]
    r2 = [pairwise_record(i, "alpaca", r, "bo") for i, r in enumerate(two)]
    score, n = judge.agreement(r1, r2)
    assert (score, n) == (4.5 / 8, 8)
    assert judge.agreement(r1, r1) == (1.0, 9)


def test_rating_tally_is_percentages_of_answers():
    ratings = ["Excellent"] * 5 + ["Pass"] * 3 + ["Fail"] * 2
    records = [dict(id=i, system="epoch-07", annotator="ana", rating=r) for i, r in enumerate(ratings)]
    assert judge.rating_tally(records) == {"epoch-07": dict(n=10, Excellent=50.0, Pass=30.0, Fail=20.0)}


def test_tally_and_agreement_on_the_command_line(tmp_path):
    a = write(tmp_path / "a.jsonl", [pairwise_record(i, "alpaca", r) for i, r in enumerate(["win", "tie"])])
    b = write(tmp_path / "b.jsonl", [pairwise_record(i, "alpaca", r, "bo") for i, r in enumerate(["win", "loss"])])
    out = subprocess.run([sys.executable, "eval.py", "tally", str(a), str(b)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert re.search(r"alpaca\s+2\s+50.0%\s+50.0%\s+0.0%", out)
    assert "agreement (tie-discounted) on 2 shared judgements: 75.0%" in out


# ---- people: blind order, resuming ----

def test_ab_order_is_random_recorded_and_undone(tmp_path):
    ours, base = answer_files(tmp_path, n=40)
    out = tmp_path / "ann.jsonl"
    judge.compare(ours, base, out, "ana", judge.human(judge.VERDICTS, ask=oracle), seed=0)
    records = judge.read_jsonl(out)
    assert len(records) == 40
    sides = [r["ours_is"] for r in records]
    assert 10 < sides.count("A") < 30  # a coin per prompt, not a fixed side
    assert all(r["verdict"] == r["ours_is"] and r["result"] == "win" for r in records)
    assert all(r["annotator"] == "ana" and r["baseline"] == "alpaca" and r["time"] for r in records)
    # The same seed gives the same order; an annotator who always says A wins exactly where ours was A.
    out2 = tmp_path / "always-a.jsonl"
    judge.compare(ours, base, out2, "al", judge.human(judge.VERDICTS, ask=lambda screen: "a"), seed=0)
    again = judge.read_jsonl(out2)
    assert [r["ours_is"] for r in again] == sides
    assert [r["result"] for r in again] == ["win" if s == "A" else "loss" for s in sides]
    assert judge.result_for_ours("neither", "B") == "tie"


def test_a_resumed_annotation_run_continues_where_it_stopped(tmp_path):
    ours, base = answer_files(tmp_path, n=10)
    out = tmp_path / "ann.jsonl"
    shown = []

    def quits_after_three(screen):
        if screen.startswith("type one of"):  # asked again after a key that is not a choice
            return "n"
        shown.append(re.search(r"prompt (\d+):", screen).group(1))
        return "x" if len(shown) == 2 else "q" if len(shown) == 4 else oracle(screen)

    with pytest.raises(judge.Quit):
        judge.compare(ours, base, out, "ana", judge.human(judge.VERDICTS, ask=quits_after_three))
    first = judge.read_jsonl(out)
    assert [r["id"] for r in first] == [0, 1, 2] and first[1]["verdict"] == "neither"

    shown.clear()
    judge.compare(ours, base, out, "ana", judge.human(judge.VERDICTS, ask=oracle_logging(shown)))
    assert shown == [str(i) for i in range(3, 10)]  # nothing asked twice
    records = judge.read_jsonl(out)
    assert records[:3] == first and [r["id"] for r in records] == list(range(10))
    # Another annotator into the same file starts from the beginning.
    shown.clear()
    judge.compare(ours, base, out, "bo", judge.human(judge.VERDICTS, ask=oracle_logging(shown)))
    assert len(shown) == 10


def oracle_logging(shown):
    def ask(screen):
        shown.append(re.search(r"prompt (\d+):", screen).group(1))
        return oracle(screen)
    return ask


def test_answer_files_must_hold_the_same_prompts(tmp_path):
    ours, base = answer_files(tmp_path, n=3)
    other = write(tmp_path / "other.jsonl", [dict(id=i, prompt=f"something else {i}", answer="x") for i in range(3)])
    short = write(tmp_path / "short.jsonl", [dict(id=0, prompt="prompt 0: what is 0 + 0?", answer="x")])
    with pytest.raises(judge.EvalError, match="prompt differs"):
        judge.pair_answers(ours, other)
    with pytest.raises(judge.EvalError, match="different prompts"):
        judge.pair_answers(ours, short)


def test_human_rating_of_a_seeded_sample(tmp_path):
    ours, _ = answer_files(tmp_path, n=10)
    keys = iter("epfe")
    out = tmp_path / "rate.jsonl"
    judge.rate(ours, out, "ana", judge.human(judge.RATING_KEYS, ask=lambda screen: next(keys)), sample=4, seed=1)
    records = judge.read_jsonl(out)
    assert [r["rating"] for r in records] == ["Excellent", "Pass", "Fail", "Excellent"]
    assert len({r["id"] for r in records}) == 4 and all(r["system"] == "epoch-07" for r in records)
    judge.rate(ours, out, "ana", judge.human(judge.RATING_KEYS, ask=lambda screen: pytest.fail("asked again")), sample=4, seed=1)


# ---- a model judge against a local server ----

class ScriptedJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that plays `script` (one action per request), then 'good'."""
    script: list = []
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(dict(body=body, auth=self.headers.get("Authorization")))
        action = type(self).script.pop(0) if type(self).script else "good"
        if action == "slow":
            time.sleep(0.6)  # longer than the client's timeout
            action = "good"
        if isinstance(action, int):
            return self.send_error(action)
        prompt = body["messages"][0]["content"]
        side = "A" if "OURS" in prompt.split("Answer A:")[-1].split("Answer B:")[0] else "B"
        content = {"good": f"The answer is clearer.\nVerdict: **{side}**", "rating": "Fine.\nRating: pass",
                   "malformed": "I cannot decide."}[action] if action != "garbage" else None
        payload = b"{not json" if action == "garbage" else json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    ScriptedJudge.script, ScriptedJudge.requests = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedJudge)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def scripted_judge(url, **kw):
    return judge.Judge(url, "judge-model", api_key="sk-test", **{"timeout": 0.3, "retries": 2, "backoff": 0, **kw})


def test_judge_records_good_verdicts_blind_and_undone(server, tmp_path):
    ours, base = answer_files(tmp_path, n=6)
    out = tmp_path / "ann.jsonl"
    assert judge.compare(ours, base, out, "judge-model", judge.judged(scripted_judge(server), judge.JUDGE_PROMPT, judge.parse_verdict)) == 0
    records = judge.read_jsonl(out)
    assert [r["result"] for r in records] == ["win"] * 6 and {r["ours_is"] for r in records} == {"A", "B"}
    assert all("Verdict" in r["reply"] for r in records)
    first = ScriptedJudge.requests[0]
    assert first["auth"] == "Bearer sk-test" and first["body"]["model"] == "judge-model"
    assert "prompt 0: what is 0 + 0?" in first["body"]["messages"][0]["content"]


def test_judge_retries_malformed_slow_and_failing_replies(server, tmp_path):
    ours, base = answer_files(tmp_path, n=3)
    out = tmp_path / "ann.jsonl"
    # prompt 0: malformed, then good; prompt 1: too slow, then a 500, then good; prompt 2: bad JSON, good
    ScriptedJudge.script = ["malformed", "good", "slow", 500, "good", "garbage", "good"]
    assert judge.compare(ours, base, out, "j", judge.judged(scripted_judge(server), judge.JUDGE_PROMPT, judge.parse_verdict)) == 0
    assert [r["id"] for r in judge.read_jsonl(out)] == [0, 1, 2]
    assert len(ScriptedJudge.requests) == 7


def test_judge_gives_up_on_a_prompt_keeps_the_rest_and_a_rerun_fills_the_gap(server, tmp_path):
    ours, base = answer_files(tmp_path, n=3)
    out = tmp_path / "ann.jsonl"
    ScriptedJudge.script = ["good", "malformed", "malformed", "malformed", "good"]  # 3 tries on prompt 1
    assert judge.compare(ours, base, out, "j", judge.judged(scripted_judge(server), judge.JUDGE_PROMPT, judge.parse_verdict)) == 1
    assert [r["id"] for r in judge.read_jsonl(out)] == [0, 2]
    assert judge.compare(ours, base, out, "j", judge.judged(scripted_judge(server), judge.JUDGE_PROMPT, judge.parse_verdict)) == 0
    assert sorted(r["id"] for r in judge.read_jsonl(out)) == [0, 1, 2]


def test_judge_stops_on_a_refusal_or_the_request_limit_keeping_what_it_recorded(server, tmp_path):
    ours, base = answer_files(tmp_path, n=5)
    out = tmp_path / "ann.jsonl"
    ScriptedJudge.script = ["good", 401]
    with pytest.raises(judge.EvalError, match="HTTP 401"):
        judge.compare(ours, base, out, "j", judge.judged(scripted_judge(server), judge.JUDGE_PROMPT, judge.parse_verdict))
    assert len(judge.read_jsonl(out)) == 1
    with pytest.raises(judge.Quit, match="request limit"):
        judge.compare(ours, base, out, "j", judge.judged(scripted_judge(server, max_requests=2), judge.JUDGE_PROMPT, judge.parse_verdict))
    assert [r["id"] for r in judge.read_jsonl(out)] == [0, 1, 2]
    judge.compare(ours, base, out, "j", judge.judged(scripted_judge(server), judge.JUDGE_PROMPT, judge.parse_verdict))
    assert [r["id"] for r in judge.read_jsonl(out)] == [0, 1, 2, 3, 4]


def test_judge_with_an_unreachable_endpoint_times_out_and_records_nothing(tmp_path):
    ours, base = answer_files(tmp_path, n=2)
    out = tmp_path / "ann.jsonl"
    dead = judge.Judge("http://127.0.0.1:9/v1", "m", timeout=0.3, retries=1, backoff=0)  # port 9: discard
    assert judge.compare(ours, base, out, "j", judge.judged(dead, judge.JUDGE_PROMPT, judge.parse_verdict)) == 2
    assert judge.read_jsonl(out) == []


def test_judge_rating_and_the_command_line(server, tmp_path):
    ours, base = answer_files(tmp_path, n=2)
    ScriptedJudge.script = ["rating", "rating"]
    out = tmp_path / "rate.jsonl"
    run = subprocess.run([sys.executable, "eval.py", "rate", "--answers", str(ours), "--url", server,
                          "--model", "m", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert [r["rating"] for r in judge.read_jsonl(out)] == ["Pass", "Pass"]
    assert re.search(r"epoch-07\s+2\s+0.0%\s+100.0%\s+0.0%", run.stdout)
    bad = tmp_path / "prompt.txt"
    bad.write_text("Which is better? {prompt}")
    run = subprocess.run([sys.executable, "eval.py", "judge", "--ours", str(ours), "--baseline", str(base),
                          "--url", server, "--model", "m", "--out", str(tmp_path / "j.jsonl"),
                          "--judge_prompt", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error:") and "{answer_a}" in run.stderr


def test_braces_in_answers_reach_the_judge_verbatim():
    text = judge.fill(judge.JUDGE_PROMPT, prompt="f{x}", answer_a="{'a': 1}", answer_b="{answer_a}")
    assert "Question: f{x}" in text and "Answer A: {'a': 1}" in text and "Answer B: {answer_a}" in text
    # a value naming a placeholder filled after it stays as written too
    text = judge.fill(judge.JUDGE_PROMPT, prompt="say {answer_b}", answer_a="{answer_b} \\1", answer_b="B's")
    assert "Question: say {answer_b}" in text and "Answer A: {answer_b} \\1" in text and "Answer B: B's" in text
    assert judge.parse_verdict("A is better...\nVerdict: neither") == "neither"
    assert judge.parse_verdict("Verdict: A\n\nOn reflection, Verdict: B.") == "B"
    assert judge.parse_verdict("Answer A is better.") is None


# ---- the report ----

def test_report_holds_every_prompt_every_epoch_and_the_charts(tmp_path):
    run = tmp_path / "run"
    prompts = {1: "Why is the sky blue?", 2: "Write <b>bold</b> HTML & explain", 3: "Name three primes."}
    for epoch in (5, 6, 7):
        write(run / "eval" / "answers" / f"epoch-{epoch:02d}.jsonl",
              [dict(id=i, prompt=p, history=[], answer=f"answer to {i} at epoch {epoch}") for i, p in prompts.items()])
    write(run / "metrics.jsonl", [dict(step=s, epoch=s / 4, loss=3 - s / 10, lr=1e-5) for s in range(1, 13)]
          + [dict(step=4 * e, epoch=e, dev_loss=2.5 - e / 10) for e in (1, 2, 3)])
    write(run / "eval" / "dev_loss.jsonl", [dict(checkpoint=f"epoch-0{e}", epoch=e, step=4 * e, dev_loss=2.0,
                                                 perplexity=math.exp(2.0), tokens=99) for e in (1, 2, 3)])
    ann = write(tmp_path / "ann.jsonl", [pairwise_record(i, "alpaca", r) for i, r in enumerate(["win", "tie"])])
    rated = write(tmp_path / "rate.jsonl", [dict(id=1, system="epoch-07", annotator="a", rating="Pass")])
    page = report.write_report(run, pairwise=[ann], ratings=[rated]).read_text()
    for i, p in prompts.items():
        assert html.escape(p) in page
        assert all(f"answer to {i} at epoch {e}" in page for e in (5, 6, 7))
    assert all(f"<th>epoch-0{e}</th>" in page for e in (5, 6, 7))
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert page.count("<svg") == 3 and "<script" not in page and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched from anywhere
    assert "ours wins" in page and "Excellent" in page and "7.389" in page


# ---- subsets for the ablations ----

def test_subset_by_source_and_count_is_seeded(tmp_path):
    rows = [dict(conversations=[f"q{i}", f"a{i}"], source=["stackexchange", "wikihow", "manual"][i % 3])
            for i in range(30)]
    data = write(tmp_path / "train.jsonl", rows)
    a = ev.subset(data, tmp_path / "a.jsonl", source="stackexchange,wikihow", n=8, seed=3)
    b = ev.subset(data, tmp_path / "b.jsonl", source="stackexchange,wikihow", n=8, seed=3)
    assert a == b == judge.read_jsonl(tmp_path / "a.jsonl") and len(a) == 8
    assert {r["source"] for r in a} <= {"stackexchange", "wikihow"}
    assert ev.subset(data, tmp_path / "c.jsonl", n=8, seed=4) != a
    with pytest.raises(judge.EvalError, match=r"manual \(10\)"):
        ev.subset(data, tmp_path / "d.jsonl", source="reddit")
    with pytest.raises(judge.EvalError, match="only 10"):
        ev.subset(data, tmp_path / "d.jsonl", source="manual", n=11)


def test_bad_input_is_one_line_and_exit_status_2(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\nnot json\n')
    for args in (["tally", str(tmp_path / "missing.jsonl")], ["tally", str(tmp_path / "bad.jsonl")],
                 ["subset", "--data", str(tmp_path / "bad.jsonl")], ["answers", "--run", str(tmp_path),
                                                                     "--dev", "x", "--epochs", "five"]):
        run = subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, args


def imported_modules(argv: list[str]) -> set[str]:
    """The modules a run of `python argv...` imports (from -X importtime), whatever its exit status."""
    run = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=ROOT, capture_output=True, text=True)
    return {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}


def test_the_commands_that_load_no_model_never_import_torch(tmp_path):
    ann = write(tmp_path / "ann.jsonl", [pairwise_record(i, "alpaca", r) for i, r in enumerate(["win", "tie"])])
    for argv in (["eval.py", "tally", str(ann)], ["eval.py", "report", "--run", str(tmp_path / "none")],
                 ["eval.py", "--help"], ["eval.py", "loss", "--help"], ["eval.py", "answers", "--epochs", "x"]):
        modules = imported_modules(argv)
        assert "judge" in modules or "--help" in argv or "x" in argv, argv
        assert "torch" not in modules and "numpy" not in modules, argv
    assert "torch" in imported_modules(["eval.py", "loss", "--run", str(tmp_path), "--dev", "x"])  # the check sees it


# ---- checkpoints: dev loss and answers from tiny random models ----

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory with epoch-01 and epoch-02, as train.py writes them (DCP weights, state.json)."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from data import Tokenizer
    from model import ModelArgs, Transformer
    tokenizer = ROOT / "data" / "tokenizer.model"
    tok = Tokenizer(tokenizer)
    run = tmp_path_factory.mktemp("run")
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                         multiple_of=16, max_seq_len=256)
        model = Transformer(args)
        model.init_weights()
        path = run / f"epoch-{epoch:02d}"
        path.mkdir()
        (path / "params.json").write_text(json.dumps(asdict(args)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one process, on purpose
            dcp.save(model.state_dict(), checkpoint_id=path / "model", no_dist=True)  # as train.py's ranks do
        shutil.copy(tokenizer, path / "tokenizer.model")
        (path / "state.json").write_text(json.dumps(dict(step=10 * epoch, epoch=epoch, world_size=1, config={})))
    return run, tok


def test_dev_loss_table_of_every_epoch(tiny_run, tmp_path):
    run, tok = tiny_run
    dev = write(tmp_path / "dev.jsonl", [dict(conversations=["Say hi.", "Hi there, friend."], source="x"),
                                         dict(conversations=["Count to three.", "One, two, three."], source="x")])
    rows = ev.loss_table(run, dev, max_len=256, device="cpu")
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [10, 20]
    for r in rows:
        # A random model's logits are nearly uniform: its loss is close to log(vocabulary size).
        assert abs(r["dev_loss"] - math.log(tok.vocab_size)) < 0.1
        assert r["perplexity"] == pytest.approx(math.exp(r["dev_loss"])) and r["tokens"] > 0
    assert rows[0]["dev_loss"] != rows[1]["dev_loss"]
    assert judge.read_jsonl(run / "eval" / "dev_loss.jsonl") == rows
    for args in (["--dev", str(tmp_path / "missing.jsonl")], ["--dev", str(dev), "--dtype", "fp8"]):
        bad = subprocess.run([sys.executable, "eval.py", "loss", "--run", str(run), *args], cwd=ROOT,
                             capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


def test_answers_for_chosen_epochs_feed_the_report(tiny_run, tmp_path):
    run, _ = tiny_run
    dev = write(tmp_path / "dev.jsonl", [dict(conversations=[f"Question {i}?", "An answer."]) for i in range(3)])
    files = ev.write_answers(run, dev, [1, 2], batch_size=2, max_len=40, device="cpu")
    assert [f.name for f in files] == ["epoch-01.jsonl", "epoch-02.jsonl"]
    for f in files:
        assert [r["prompt"] for r in judge.read_jsonl(f)] == ["Question 0?", "Question 1?", "Question 2?"]
    page = report.write_report(run).read_text()
    assert all(f"Question {i}?" in page for i in range(3)) and "<th>epoch-02</th>" in page
    with pytest.raises(judge.EvalError, match="no checkpoint for epoch"):
        ev.write_answers(run, dev, [5], device="cpu")
