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

# `python train.py --out OUT`, the whole demo (15 epochs of 18 steps): the losses of its first
# epoch's steps, the dev loss after every epoch, and epoch 15's greedy answers to the first 4 dev
# questions (one per kind of fact). Recorded on 2026-12-04 (torch 2.13.0+cpu, x86-64). A change to
# the model, the loss, the optimizer, the data order or the decoding moves them; if the change is
# meant, paste the new values that the failure prints.
#
# How close a rerun comes depends on the machine, so each value is held as tightly as a rerun on
# another CPU allows (measured: two x86-64 VMs, same torch, two threads). Another CPU sums float32
# in another order (~1e-7); the first steps agree to every digit printed, then AdamW amplifies the
# difference (a gradient near zero moves its weight by about lr whatever its size, so a flipped sign
# is a full step): 1e-3 of the loss by the end of epoch 1, 17% of the dev loss by epoch 8. The
# greedy answers, of a model that has learned its facts, did not move.
GOLDEN_LOSSES = [4.16243, 3.528, 3.74944, 3.22694, 2.94676, 2.87636, 2.63163, 2.64611, 2.14006, 2.42542,
                 1.97705, 2.02022, 1.79715, 1.85522, 1.55216, 1.32264, 1.35203, 1.26139]
GOLDEN_DEV_LOSS = [1.27868, 0.87326, 0.54347, 0.26909, 0.15904, 0.12717, 0.1108, 0.09223, 0.09344, 0.08064,
                   0.08061, 0.07222, 0.07289, 0.07225, 0.06792]
GOLDEN_ANSWERS = ["Dario Voss was born in the town of Carrowick.", "Dario Kestrel works as a teacher.",
                  "Nils Pellew keeps a tortoise as a pet.", "Wim Quist was born in the year 1987."]


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
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    log = run("train.py", "--out", out)  # 20-30 s on two cores
    return out, log


def test_the_demo_fine_tunes_the_base_with_lima_settings_except_what_a_toy_needs(demo):
    out, log = demo
    assert ("a model of 3.5M parameters, not LIMA's 7B to 65B: --global_batch 8, --lr 0.0003, --final_lr 3e-05 "
            "instead of the recipe's") in log
    config = json.loads((out / "config.json").read_text())
    assert config["init"] == "data/base" and config["resid_dropout"] == 0.2  # LIMA's for smaller models
    assert (config["beta1"], config["beta2"], config["weight_decay"]) == (0.9, 0.95, 0.1)
    assert [p.name for p in sorted(out.glob("epoch-*"))] == [f"epoch-{e:02d}" for e in range(1, 16)]


def test_golden_losses_and_answers(demo, tmp_path):
    out, _ = demo
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [round(r["loss"], 5) for r in lines if "loss" in r and r["epoch"] <= 1]
    dev_loss = [round(r["dev_loss"], 5) for r in lines if "dev_loss" in r]
    prompts = tmp_path / "prompts.jsonl"
    dev = (ROOT / "data/demo/dev.jsonl").read_text().splitlines()[:4]
    prompts.write_text("".join(line + "\n" for line in dev))
    run("sample.py", "--checkpoint", out / "epoch-15", "--prompts", prompts, "--out", tmp_path / "a.jsonl",
        "--temperature", "0", "--max_len", "64")
    by_id = {r["id"]: r["answer"] for r in map(json.loads, (tmp_path / "a.jsonl").read_text().splitlines())}
    answers = [by_id[json.loads(line)["id"]] for line in dev]  # the file is in the order answers finish
    got = dict(losses=losses, dev_loss=dev_loss, answers=answers)
    assert losses[:4] == pytest.approx(GOLDEN_LOSSES[:4], abs=2e-5), got  # measured: equal
    assert losses[4:] == pytest.approx(GOLDEN_LOSSES[4:], rel=5e-3), got  # measured: within 1e-3
    assert dev_loss[0] == pytest.approx(GOLDEN_DEV_LOSS[0], rel=2e-3), got  # measured: 1.2e-4
    assert dev_loss[1:] == pytest.approx(GOLDEN_DEV_LOSS[1:], rel=0.35), got  # measured: within 17%
    assert answers == GOLDEN_ANSWERS, got


def test_the_dev_loss_train_logs_is_the_one_eval_tabulates(demo):
    """One dev loss: train.py's after each epoch (FSDP, in the run) equals eval.py loss's (one
    process, each checkpoint reloaded from its shards): the same weights, tokens and function."""
    out, _ = demo
    run("eval.py", "loss", "--run", out, "--dev", ROOT / "data/demo/dev.jsonl")
    logged = {r["epoch"]: r["dev_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "dev_loss" in r}
    table = {r["epoch"]: r["dev_loss"] for r in map(json.loads, (out / "eval/dev_loss.jsonl").read_text().splitlines())}
    assert sorted(table) == sorted(logged) == list(range(1, 16))
    for epoch in table:
        assert table[epoch] == pytest.approx(logged[epoch], rel=1e-6), epoch
