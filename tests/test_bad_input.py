"""Every bad input gets one line (issue 15): a table of malformed inputs, each given to an entry point
as a user would, in a subprocess. Each must end with a non-zero exit status, no traceback, and a last
line on stderr that starts with "error: " and names the file and line, key or option at fault.

Almost every case is refused before a model is built, so a case costs what importing torch costs
(1.6 s of CPU): the subprocesses run two at a time, up front, and each test then reads its result.
The remaining options' ranges and choices go through the scripts' main() in this process.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

import pytest
import torch

import sample
import train
from cli import check_fields, parse_config
from data import Tokenizer, load_dataset
from test_checkpoint import ENV, ROOT, init_dir  # noqa: F401  (init_dir: a fixture)

TOKENIZER = ROOT / "data/tokenizer.model"


class Case(NamedTuple):
    id: str
    argv: list[str]  # {d}: the case's own folder, {init}: a good converted model (1,024 rows), {hf}: its HF copy
    expect: str  # in the last line of stderr (after "error: "): the file, line, key or option, and what is wrong
    setup: Callable | None = None  # setup(d, ctx) writes the case's files into d


# ---- building the bad inputs ----

def text(obj) -> str:
    return obj if isinstance(obj, str) else json.dumps(obj)


def jsonl(*records) -> str:
    return "".join(text(r) + "\n" for r in records)


def files(contents: dict):
    """setup: write each file {path inside d: str, bytes, or a JSON value}."""
    def setup(d: Path, ctx):
        for name, content in contents.items():
            path = d / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(text(content))
    return setup


def model(params=None, whole_params=None, model_pth=None, rows=None, more=None):
    """setup: d/m, a copy of the good converted model with params.json changed (keys of params) or
    replaced (whole_params), model.pth replaced by bytes or cut to `rows` vocabulary rows."""
    def setup(d: Path, ctx):
        shutil.copytree(ctx.init, d / "m")
        if params is not None or whole_params is not None:
            old = json.loads((d / "m/params.json").read_text())
            (d / "m/params.json").write_text(text(whole_params if whole_params is not None else {**old, **params}))
        if model_pth is not None:
            (d / "m/model.pth").write_bytes(model_pth)
        if rows is not None:
            state = torch.load(d / "m/model.pth")
            for key in ("tok_embeddings.weight", "output.weight"):
                state[key] = state[key][:rows].clone()
            torch.save(state, d / "m/model.pth")
        files({f"m/{name}": content for name, content in (more or {}).items()})(d, ctx)
    return setup


def hf(config=None, whole_config=None, rows=None, more=None):
    """setup: d/hf, a copy of the good model in Hugging Face's layout, its config.json changed."""
    def setup(d: Path, ctx):
        shutil.copytree(ctx.hf, d / "hf")
        if config is not None or whole_config is not None:
            old = json.loads((d / "hf/config.json").read_text())
            (d / "hf/config.json").write_text(text(whole_config if whole_config is not None else {**old, **config}))
        if rows is not None:
            import safetensors.torch
            state = safetensors.torch.load_file(d / "hf/model.safetensors")
            for key in ("model.embed_tokens.weight", "lm_head.weight"):
                state[key] = state[key][:rows].clone()
            safetensors.torch.save_file(state, d / "hf/model.safetensors")
        files({f"hf/{name}": content for name, content in (more or {}).items()})(d, ctx)
    return setup


def run_folder(name, steps):
    """setup: d/name, a training run's folder holding a checkpoint at each of these steps (epoch-NN
    at the end of an epoch of 5 steps, else step-NNNNNN), complete as list_checkpoints sees them."""
    def setup(d: Path, ctx):
        for step in steps:
            epoch, rest = divmod(step, 5)
            ckpt = f"{name}/epoch-{epoch:02d}" if rest == 0 else f"{name}/step-{step:06d}"
            files({f"{ckpt}/state.json": dict(step=step, epoch=epoch, world_size=1, config={}),
                   f"{ckpt}/params.json": {}, f"{ckpt}/tokenizer.model": b"", f"{ckpt}/model/.metadata": b""})(d, ctx)
    return setup


def both(*setups):
    def setup(d, ctx):
        for s in setups:
            s(d, ctx)
    return setup


LONG = {"conversations": ["word " * 40, "An answer."], "source": "t"}  # 41 prompt tokens
SHORT = {"conversations": ["Hi?", "Hello there."], "source": "t"}
ANSWER = {"id": 1, "prompt": "Hi?", "answer": "Hello."}
JUDGEMENT = {"id": 1, "ours": "a", "baseline": "b", "annotator": "x", "ours_is": "A", "verdict": "A",
             "result": "win"}
RATING = {"id": 1, "system": "a", "annotator": "x", "rating": "Pass"}
METRIC = {"step": 1, "epoch": 0.2, "loss": 6.9, "lr": 3e-3}
DEV_ROW = {"checkpoint": "epoch-01", "epoch": 1, "step": 5, "dev_loss": 5.1, "perplexity": 164.0, "tokens": 90}
TEXT = b"these are not weights\n"

T = ["train.py", "--out", "{d}/out", "--dev", ""]  # a bad option fails before the demo would start
PLAN = ["train.py", "--plan", "true"]
S = ["sample.py", "--checkpoint", "{init}", "--prompt", "Hi?"]
ANSWERS = ["eval.py", "answers", "--run", "{d}/run", "--dev", "data/demo/dev.jsonl"]
COMPARE = ["eval.py", "compare", "--ours", "{d}/ours.jsonl", "--baseline", "{d}/base.jsonl",
           "--annotator", "x", "--out", "{d}/ann.jsonl"]
JUDGE = ["eval.py", "judge", "--ours", "{d}/ours.jsonl", "--baseline", "{d}/base.jsonl",
         "--url", "http://localhost:9/v1", "--model", "m", "--out", "{d}/ann.jsonl"]
PAIR = files({"ours.jsonl": jsonl(ANSWER), "base.jsonl": jsonl(ANSWER)})  # compare's two answer files, good
TALLY = ["eval.py", "tally", "{d}/ann.jsonl"]
REPORT = ["eval.py", "report", "--run", "{d}/run"]
CONVERT = ["convert.py", "{d}/hf", "{d}/out"]
META = ["convert.py", "{d}/meta", "{d}/out"]
META_SHARD = b"consolidated shards are not read before params.json is checked"

CASES = [
    # -- numeric options out of range or of the wrong sign (cli.py's Range; eval.py's argparse types) --
    Case("train-epochs-0", [*T, "--epochs", "0"], "--epochs must be at least 1, not 0"),
    Case("train-lr-0", [*T, "--lr", "0"], "--lr must be greater than 0, not 0.0"),
    Case("sample-top_p-0", [*S, "--top_p", "0"], "--top_p must be in (0, 1], not 0.0"),
    Case("eval-answers-batch_size-0", [*ANSWERS, "--batch_size", "0"], "argument --batch_size: must be at least 1"),
    Case("eval-answers-max_len-negative", [*ANSWERS, "--max_len", "-1"], "argument --max_len: must be at least 1"),
    Case("eval-loss-max_len-0", ["eval.py", "loss", "--run", "{d}", "--dev", "x", "--max_len", "0"],
         "argument --max_len: must be at least 1"),
    Case("eval-judge-timeout-0", [*JUDGE, "--timeout", "0"], "argument --timeout: must be greater than 0"),
    Case("eval-judge-retries-negative", [*JUDGE, "--retries", "-1"], "argument --retries: must be at least 0"),
    Case("eval-judge-max_requests-0", [*JUDGE, "--max_requests", "0"], "argument --max_requests: must be at least 1"),
    Case("eval-rate-sample-negative", ["eval.py", "rate", "--answers", "{d}/a.jsonl", "--out", "{d}/r.jsonl",
                                       "--annotator", "x", "--sample", "-5"], "argument --sample: must be at least 0"),
    Case("eval-subset_n-negative", ["eval.py", "subset", "--data", "data/demo/train.jsonl", "--out", "{d}/s.jsonl",
                                    "--subset_n", "-1"], "argument --subset_n: must be at least 0"),
    Case("eval-answers-epochs-reversed", [*ANSWERS, "--epochs", "10-5"], "argument --epochs: 10-5: expected a range"),
    Case("eval-answers-epochs-0", [*ANSWERS, "--epochs", "0,1"], "argument --epochs: 0,1: expected"),

    # -- option values outside their choices (Literal annotations; argparse choices in eval.py) --
    Case("train-dtype-fp16", [*T, "--dtype", "fp16"], "--dtype must be one of auto, bf16, fp32, not 'fp16'"),
    Case("sample-dtype-fp8", [*S, "--dtype", "fp8"], "--dtype must be one of auto, fp32, bf16, fp16, not 'fp8'"),
    Case("eval-loss-dtype-fp8", ["eval.py", "loss", "--run", "{d}", "--dev", "x", "--dtype", "fp8"],
         "argument --dtype: invalid choice: 'fp8'"),
    Case("eval-answers-device-tpu", [*ANSWERS, "--device", "tpu"], "argument --device: must be auto, cpu, cuda"),
    Case("eval-judge-url-no-scheme", [*JUDGE[:6], "--url", "localhost:8000", *JUDGE[8:]],
         "--url localhost:8000: expected an http:// or https:// address", PAIR),

    # -- the command line itself: --name=value, options that mean nothing together, a script's own usage --
    Case("train-name=value-checked", [*T, "--epochs=0"], "--epochs must be at least 1, not 0"),
    Case("train-preset-with-init", ["train.py", "--init", "{init}", "--preset", "tiny", "--out", "{d}/out"],
         "--preset is for a model from random weights"),
    Case("checkpoint-export-nothing", ["checkpoint.py", "export", "{d}/nothing", "{d}/dst"], "{d}/nothing"),
    Case("checkpoint-no-arguments", ["checkpoint.py"], "the following arguments are required: COMMAND"),
    Case("checkpoint-export-unknown-dtype", ["checkpoint.py", "export", "{d}/a", "{d}/b", "--dtype", "fp16"],
         "argument --dtype: invalid choice: 'fp16'"),
    Case("checkpoint-export-stray-argument", ["checkpoint.py", "export", "{d}/a", "{d}/b", "fp32"],
         "unrecognized arguments: fp32"),
    Case("checkpoint-list-no-folder", ["checkpoint.py", "list", "{d}/no-run"], "{d}/no-run"),
    Case("train-resume-a-run-folder", [*T, "--resume", "{d}/out"],
         "{d}/out is a training run's folder, not one checkpoint: --resume auto continues from its newest, "
         "{d}/out/step-000012, or name it: --resume {d}/out/step-000012", run_folder("out", [5, 10, 12])),
    Case("train-resume-another-run-folder", [*T, "--resume", "{d}/run"],
         "{d}/run is a training run's folder, not one checkpoint: --resume auto --out {d}/run continues from its "
         "newest, {d}/run/epoch-02, or name it: --resume {d}/run/epoch-02", run_folder("run", [5, 10])),

    # -- params.json: not an object, sizes not positive integers, heads that do not divide --
    Case("params-not-an-object", ["train.py", "--init", "{d}/m", "--out", "{d}/out"],
         "{d}/m/params.json: expected a JSON object", model(whole_params=[64, 2, 4])),
    Case("params-empty-object", ["train.py", "--init", "{d}/m", "--out", "{d}/out"],
         "{d}/m/params.json: no dim, n_layers, n_heads", model(whole_params={})),
    Case("params-n_kv_heads-does-not-divide", ["train.py", "--init", "{d}/m", "--out", "{d}/out"],
         "{d}/m/params.json: n_kv_heads 3 does not divide n_heads 4", model(params={"n_kv_heads": 3})),
    Case("params-n_heads-0", ["sample.py", "--checkpoint", "{d}/m", "--prompt", "Hi?"],
         "{d}/m/params.json: n_heads must be a positive integer, not 0", model(params={"n_heads": 0})),
    Case("params-dim-fraction", ["sample.py", "--checkpoint", "{d}/m", "--prompt", "Hi?"],
         "{d}/m/params.json: dim must be a positive integer, not 64.5", model(params={"dim": 64.5})),
    Case("params-n_heads-does-not-divide", ["convert.py", "--to_hf", "{d}/m", "{d}/out"],
         "{d}/m/params.json: n_heads 3 does not divide dim 64", model(params={"n_heads": 3, "n_kv_heads": 3})),
    Case("params-odd-head-dim", ["convert.py", "--to_hf", "{d}/m", "{d}/out"],
         "{d}/m/params.json: the head dim, dim 36 / n_heads 4 = 9, is odd", model(params={"dim": 36})),
    Case("params-norm_eps-0", [*META], "{d}/meta/params.json: norm_eps must be a number greater than 0",
         files({"meta/consolidated.00.pth": META_SHARD, "meta/params.json": {"dim": 64, "n_layers": 2, "n_heads": 4,
                                                                           "norm_eps": 0}})),

    # -- truncated, foreign or text files where weights (or a tokenizer) should be --
    Case("weights-model.pth-text", ["sample.py", "--checkpoint", "{d}/m", "--prompt", "Hi?"],
         "{d}/m/model.pth: unreadable, truncated or not a checkpoint", model(model_pth=TEXT)),
    Case("weights-safetensors-text", [*CONVERT], "{d}/hf/model.safetensors: unreadable", hf(more={"model.safetensors": TEXT})),
    Case("weights-hf-tokenizer-text", [*CONVERT], "{d}/hf/tokenizer.model: not a sentencepiece model",
         hf(more={"tokenizer.model": TEXT})),

    # -- convert.py: HF config.json and index fields of the wrong type --
    Case("hf-config-not-an-object", [*CONVERT], "{d}/hf/config.json: expected a JSON object", hf(whole_config=["llama"])),
    Case("hf-hidden_size-string", [*CONVERT], '{d}/hf/config.json: hidden_size must be a positive integer, not "64"',
         hf(config={"hidden_size": "64"})),
    Case("hf-rms_norm_eps-string", [*CONVERT], 'rms_norm_eps must be a positive number, not "1e-5"',
         hf(config={"rms_norm_eps": "1e-5"})),
    Case("hf-kv-heads-do-not-divide", [*CONVERT], "num_key_value_heads 3 does not divide num_attention_heads 4",
         hf(config={"num_key_value_heads": 3})),
    Case("hf-index-weight_map-list", [*CONVERT], "{d}/hf/model.safetensors.index.json: weight_map must be an object",
         hf(more={"model.safetensors.index.json": {"weight_map": ["model.safetensors"]}})),

    # -- a tokenizer whose vocabulary does not match the weights --
    Case("vocab-sample", ["sample.py", "--checkpoint", "{d}/m", "--prompt", "Hi?"],
         "the tokenizer has 1024 pieces + EOT = 1025 tokens but model.pth has 1000 embedding rows", model(rows=1000)),
    Case("vocab-train-init", ["train.py", "--init", "{d}/m", "--out", "{d}/out"],
         "{d}/m/model.pth has 1000 embedding rows but {d}/m/tokenizer.model has 1024 pieces", model(rows=1000)),
    Case("vocab-convert", [*CONVERT], "{d}/hf/tokenizer.model: 1024 pieces, but the weights have 1000 embedding rows",
         hf(rows=1000)),

    # -- data sets: every answer trimmed away (train or dev), a step with none left --
    Case("data-every-answer-trimmed", [*T, "--data", "{d}/long.jsonl", "--max_len", "16"],
         "{d}/long.jsonl: every answer is trimmed away at --max_len 16", files({"long.jsonl": jsonl(LONG, LONG)})),
    Case("data-dev-every-answer-trimmed", ["train.py", "--out", "{d}/out", "--data", "{d}/short.jsonl",
                                           "--dev", "{d}/long.jsonl", "--max_len", "16"],
         "{d}/long.jsonl: every answer is trimmed away", files({"short.jsonl": jsonl(SHORT), "long.jsonl": jsonl(LONG)})),
    Case("data-a-step-with-no-answer", [*T, "--data", "{d}/mixed.jsonl", "--max_len", "16", "--global_batch", "1"],
         "draws only conversations with no answer token left", files({"mixed.jsonl": jsonl(SHORT, LONG)})),

    # -- prompt files: empty, ids twice or of the wrong type (sample.py --prompts, eval.py answers --dev) --
    Case("prompts-empty-txt", ["sample.py", "--checkpoint", "{init}", "--prompts", "{d}/p.txt", "--out", "{d}/o.jsonl"],
         "{d}/p.txt: empty file, no prompts", files({"p.txt": "\n  \n"})),
    Case("prompts-duplicate-id", ["sample.py", "--checkpoint", "{init}", "--prompts", "{d}/p.jsonl", "--out", "{d}/o.jsonl"],
         "{d}/p.jsonl:3: id 7 again (first on line 1)",
         files({"p.jsonl": jsonl({**SHORT, "id": 7}, "", {**SHORT, "id": "7"})})),
    Case("prompts-id-a-list", ["sample.py", "--checkpoint", "{init}", "--prompts", "{d}/p.jsonl", "--out", "{d}/o.jsonl"],
         '{d}/p.jsonl:1: "id" must be a string or an integer', files({"p.jsonl": jsonl({**SHORT, "id": [7]})})),
    Case("eval-answers-dev-duplicate-id", ["eval.py", "answers", "--run", "{d}/run", "--dev", "{d}/dev.jsonl"],
         "{d}/dev.jsonl:2: id 1 again", files({"dev.jsonl": jsonl({**SHORT, "id": 1}, {**SHORT, "id": 1})})),
    Case("eval-answers-dev-empty", ["eval.py", "answers", "--run", "{d}/run", "--dev", "{d}/dev.txt"],
         "{d}/dev.txt: empty file, no prompts", files({"dev.txt": ""})),

    # -- eval.py: answer, annotation and metrics records of the wrong shape or with unknown values --
    Case("answers-empty", COMPARE, "{d}/ours.jsonl: empty file, no answers", files({"ours.jsonl": "", "base.jsonl": ""})),
    Case("answers-not-an-object", COMPARE, "{d}/ours.jsonl:1: expected a JSON object",
         files({"ours.jsonl": jsonl(5), "base.jsonl": jsonl(ANSWER)})),
    Case("answers-prompt-a-number", COMPARE, '{d}/ours.jsonl:1: "prompt" must be a string',
         files({"ours.jsonl": jsonl({**ANSWER, "prompt": 5}), "base.jsonl": jsonl(ANSWER)})),
    Case("answers-history-a-string", COMPARE, '{d}/base.jsonl:2: "history" must be a list of strings',
         files({"ours.jsonl": jsonl(ANSWER), "base.jsonl": "\n" + jsonl({**ANSWER, "history": "earlier"})})),
    Case("annotations-unknown-result", TALLY, '{d}/ann.jsonl:2: "result" is "great"; expected one of win, tie, loss',
         files({"ann.jsonl": jsonl(JUDGEMENT, {**JUDGEMENT, "result": "great"})})),
    Case("annotations-no-result", TALLY, '{d}/ann.jsonl:1: no "result"',
         files({"ann.jsonl": jsonl({k: v for k, v in JUDGEMENT.items() if k != "result"})})),
    Case("annotations-unknown-rating", TALLY, '{d}/ann.jsonl:1: "rating" is "Good"; expected one of Excellent',
         files({"ann.jsonl": jsonl({**RATING, "rating": "Good"})})),
    Case("annotations-unknown-verdict", TALLY, '{d}/ann.jsonl:1: "verdict" is "C"',
         files({"ann.jsonl": jsonl({**JUDGEMENT, "verdict": "C"})})),
    Case("annotations-baseline-null", TALLY, '{d}/ann.jsonl:1: "baseline" must be a string',
         files({"ann.jsonl": jsonl({**JUDGEMENT, "baseline": None})})),
    Case("annotations-not-an-object", TALLY, "{d}/ann.jsonl:1: expected a JSON object", files({"ann.jsonl": jsonl([1, 2])})),
    Case("annotations-neither-kind", TALLY, '{d}/ann.jsonl:1: neither a judgement (with "baseline") nor a rating',
         files({"ann.jsonl": jsonl({"id": 1, "annotator": "x"})})),
    Case("annotations-earlier-out-of-compare", COMPARE, '{d}/ann.jsonl:1: "result" is "lost"',
         both(PAIR, files({"ann.jsonl": jsonl({**JUDGEMENT, "result": "lost"})}))),
    Case("metrics-no-step", REPORT, '{d}/run/metrics.jsonl:2: no "step"',
         files({"run/metrics.jsonl": jsonl(METRIC, {"epoch": 0.4, "loss": 6.5})})),
    Case("metrics-loss-a-string", REPORT, '{d}/run/metrics.jsonl:1: "loss" must be a number',
         files({"run/metrics.jsonl": jsonl({**METRIC, "loss": "6.9"})})),
    Case("metrics-neither-loss", REPORT, '{d}/run/metrics.jsonl:1: neither "loss" nor "dev_loss"',
         files({"run/metrics.jsonl": jsonl({"step": 1, "epoch": 0.2})})),
    Case("metrics-dev_loss-row-no-perplexity", REPORT, '{d}/run/eval/dev_loss.jsonl:1: no "perplexity"',
         files({"run/eval/dev_loss.jsonl": jsonl({k: v for k, v in DEV_ROW.items() if k != "perplexity"})})),
    Case("report-pairwise-bad-record", [*REPORT, "--pairwise", "{d}/ann.jsonl"], '{d}/ann.jsonl:1: "result" is "draw"',
         files({"run/metrics.jsonl": jsonl(METRIC), "ann.jsonl": jsonl({**JUDGEMENT, "result": "draw"})})),
    Case("subset-record-not-an-object", ["eval.py", "subset", "--data", "{d}/t.jsonl", "--out", "{d}/s.jsonl"],
         "{d}/t.jsonl:2: expected a JSON object", files({"t.jsonl": jsonl(SHORT, '"just text"')})),
]


@pytest.fixture(scope="module")
def ctx(init_dir, tmp_path_factory):  # noqa: F811
    import convert
    hf_dir = tmp_path_factory.mktemp("hf") / "hf"
    convert.to_hf(init_dir, hf_dir)  # the good model in Hugging Face's layout
    return SimpleNamespace(init=init_dir, hf=hf_dir, root=tmp_path_factory.mktemp("cases"))


def fill(s: str, d: Path, ctx) -> str:
    return s.replace("{d}", str(d)).replace("{init}", str(ctx.init)).replace("{hf}", str(ctx.hf))


def run_case(case: Case, ctx) -> tuple[Case, Path, subprocess.CompletedProcess]:
    d = ctx.root / case.id
    d.mkdir()
    if case.setup:
        case.setup(d, ctx)
    result = subprocess.run([sys.executable, *(fill(a, d, ctx) for a in case.argv)], cwd=ROOT, env=ENV,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    return case, d, result


@pytest.fixture(scope="module")
def results(ctx, request):
    """The selected cases' (folder, result), run two at a time: most of each is importing torch."""
    assert len({c.id for c in CASES}) == len(CASES)  # by id: a case sharing another's would go unchecked
    wanted = {item.callspec.params["case"].id for item in request.session.items
              if "case" in getattr(getattr(item, "callspec", None), "params", {})}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        done = list(pool.map(lambda c: run_case(c, ctx), [c for c in CASES if c.id in wanted]))
    return {case.id: (d, result) for case, d, result in done}


def check_one_line(case: Case, d: Path, result: subprocess.CompletedProcess, ctx):
    output = result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    why = f"{case.argv}\nexit {result.returncode}\n{output[-2000:]}"
    assert result.returncode != 0, why
    assert "Traceback" not in output, why
    assert lines and lines[-1].startswith("error: "), why
    assert fill(case.expect, d, ctx) in lines[-1], why


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_in_one_line(case, results, ctx):
    check_one_line(case, *results[case.id], ctx)


# ---- every other option's range and choices, given to the script's main in this process ----
# The same parse and the same one line as in a subprocess, without a second and a half of importing
# torch for each. train.py's run --plan true: an option that got through would print a plan and
# return, failing the test at once (it would not start a training run).

TRAIN_OPTIONS = [
    (["--global_batch", "-1"], "--global_batch must be at least 0, not -1"),
    (["--max_tokens", "-4096"], "--max_tokens must be at least 0, not -4096"),
    (["--max_len", "0"], "--max_len must be at least 1, not 0"),
    (["--gpu_gb", "0"], "--gpu_gb must be greater than 0, not 0.0"),
    (["--save_every", "-10"], "--save_every must be at least 0, not -10"),
    (["--keep_optim", "-1"], "--keep_optim must be at least 0, not -1"),
    (["--stop_after", "-5"], "--stop_after must be at least 0, not -5"),
    (["--final_lr", "-1e-6"], "--final_lr must be greater than 0, not -1e-06"),
    (["--lr", "inf"], "--lr takes a finite number, not 'inf'"),
    (["--beta1", "1"], "--beta1 must be in [0, 1), not 1.0"),
    (["--beta2", "-0.1"], "--beta2 must be in [0, 1), not -0.1"),
    (["--weight_decay", "-0.1"], "--weight_decay must be at least 0, not -0.1"),
    (["--resid_dropout", "1.5"], "--resid_dropout must be -1 or in [0, 1), not 1.5"),
    (["--resid_dropout", "-0.5"], "--resid_dropout must be -1 or in [0, 1), not -0.5"),
    (["--grad_clip", "-1"], "--grad_clip must be at least 0, not -1.0"),
    (["--seed", "-1"], "--seed must be in [0, 4294967296), not -1"),
    (["--seed", str(2**64)], "--seed must be in [0, 4294967296), not 18446744073709551616"),
    (["--weights", "bf16"], "--weights must be one of auto, fp32, bf16_kahan, bf16_sr, not 'bf16'"),
    (["--ac", "partial"], "--ac must be one of full, selective, none, not 'partial'"),
    (["--step_in_backward", "yes"], "--step_in_backward must be one of auto, true, false, not 'yes'"),
    (["--step_in_backward", "true", "--grad_clip", "1"], "cannot clip by the global norm"),
    (["--train_on_prompt", "maybe"], "--train_on_prompt takes true or false, not 'maybe'"),
    (["--epochs", "three"], "--epochs takes an int, not 'three'"),
    (["--epoch", "3"], "unknown option --epoch (did you mean --epochs?); see --help"),
    (["--lr"], "--lr needs a value"),
    (["--data", "--epochs", "3"], "--data needs a value"),
    (["--world_size", "0"], "--world_size must be at least 1, not 0"),
    (["--preset", "llama-3b"], "--preset must be one of llama-7b, llama-13b, llama-33b, llama-65b, llama2-7b, "
                               "llama2-13b, llama2-70b, tiny, not 'llama-3b'"),
]
P = ["--prompt", "Hi?"]
SAMPLE_OPTIONS = [
    ([*P, "--top_p", "1.5"], "--top_p must be in (0, 1], not 1.5"),
    ([*P, "--temperature", "-0.7"], "--temperature must be at least 0, not -0.7"),
    ([*P, "--temperature", "nan"], "--temperature takes a finite number, not 'nan'"),
    ([*P, "--repetition_penalty", "0"], "--repetition_penalty must be greater than 0, not 0.0"),
    ([*P, "--top_k", "-1"], "--top_k must be at least 0, not -1"),
    ([*P, "--batch_size", "0"], "--batch_size must be at least 1, not 0"),
    ([*P, "--max_len", "0"], "--max_len must be at least 1, not 0"),
    ([*P, "--max_len=-5"], "--max_len must be at least 1, not -5"),
    ([*P, "--penalize_prompt", "maybe"], "--penalize_prompt takes true or false, not 'maybe'"),
    ([*P, "--prompts", "x.txt"], "--prompt and --prompts are given: choose one"),
    (["--prompts", "data/demo/dev.jsonl"], "--prompts needs --out FILE.jsonl for the answers"),
    ([*P, "--chat"], "--prompt and --chat are given: choose one"),
    ([*P, "--out", "o.jsonl"], "--out o.jsonl is where --prompts writes its answers: give --prompts FILE too"),
    ([*P, "--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, not 'gpu'"),
]


@pytest.mark.parametrize("argv, expect", TRAIN_OPTIONS, ids=[" ".join(a) for a, _ in TRAIN_OPTIONS])
def test_every_train_option_is_checked(argv, expect, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        train.main(["--plan", "true", "--out", str(tmp_path / "out"), *argv])
    assert stopped.value.code.startswith("error: ") and expect in stopped.value.code


@pytest.mark.parametrize("argv, expect", SAMPLE_OPTIONS, ids=[" ".join(a) for a, _ in SAMPLE_OPTIONS])
def test_every_sample_option_is_checked(argv, expect, tmp_path):
    with pytest.raises(SystemExit) as stopped:  # refused before --checkpoint is looked at
        sample.main(["--checkpoint", str(tmp_path / "none"), *argv])
    assert stopped.value.code.startswith("error: ") and expect in stopped.value.code


# ---- the other side: what is legal stays legal, and what is reported is reported ----

def test_name_equals_value_is_the_same_as_name_space_value():
    cfg, given = parse_config(train.TrainConfig, ["--epochs=3", "--lr", "1e-4", "--dev=", "--offload=true", "--compile"])
    assert (cfg.epochs, cfg.lr, cfg.dev, cfg.offload, cfg.compile) == (3, 1e-4, "", True, True)
    assert given == {"epochs", "lr", "dev", "offload", "compile"}
    # an option given again overrides the earlier one, either way it is written (appended overrides)
    assert parse_config(train.TrainConfig, ["--lr", "1e-4", "--lr=2e-4", "--epochs=0", "--epochs", "2"])[0].lr == 2e-4


def test_the_special_values_and_every_default_are_accepted():
    for config in (train.TrainConfig(), sample.Config()):
        check_fields(config)
    cfg, _ = parse_config(train.TrainConfig, ["--resid_dropout", "-1", "--global_batch", "0", "--max_tokens", "0",
                                              "--grad_clip", "0", "--keep_optim", "0", "--beta1", "0"])
    assert (cfg.resid_dropout, cfg.global_batch, cfg.max_tokens) == (-1, 0, 0)
    cfg, _ = parse_config(sample.Config, ["--top_p", "1", "--temperature", "0", "--top_k", "0", "--max_len", "1"])
    assert (cfg.top_p, cfg.temperature) == (1, 0)


def test_conversations_without_a_source_are_counted_in_one_line(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl(SHORT, {"conversations": ["Hi?", "Hello."]}, {"conversations": ["Why?", "Because."]}))
    load_dataset(path, Tokenizer(TOKENIZER), verbose=True)
    assert capsys.readouterr().out.splitlines()[-1] == f'{path}: 2 of 3 conversations have no "source"'


@pytest.mark.skipif(torch.cuda.is_available(), reason="only a machine without CUDA can be asked for it in vain")
def test_asking_for_cuda_without_it_is_one_line(init_dir):  # noqa: F811
    result = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(init_dir), "--prompt", "Hi?",
                             "--device", "cuda"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --device cuda: no CUDA device is available here; use --device cpu"
