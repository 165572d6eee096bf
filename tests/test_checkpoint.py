"""Checkpoints: resume step for step, atomic saves under SIGKILL, SIGTERM, NaN, export."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import checkpoint
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """A small random model in convert.py's format, with the project's own tokenizer."""
    from data import Tokenizer
    path = tmp_path_factory.mktemp("init")
    tok = Tokenizer(ROOT / "data/tokenizer.model")
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_base,
                     multiple_of=16, max_seq_len=512)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    (path / "params.json").write_text(json.dumps({k: v for k, v in asdict(args).items() if k != "resid_dropout"}))
    torch.save(model.state_dict(), path / "model.pth")
    shutil.copyfile(ROOT / "data/tokenizer.model", path / "tokenizer.model")
    demo = (ROOT / "data/demo/train.jsonl").read_text().splitlines(keepends=True)
    (path / "train40.jsonl").write_text("".join(demo[:40]))  # 10 steps an epoch at batch 4
    return path


def train_args(init_dir, out, *extra):
    # 20 steps over 2 epochs of 10 (40 of the demo's conversations at batch 4), dropout on
    # so that resuming must restore the RNG too, rows of 64 tokens so that a step accumulates
    # two micro-steps on one rank (the conversations have 18 to 45 tokens).
    return ["train.py", "--init", str(init_dir), "--data", str(init_dir / "train40.jsonl"),
            "--out", str(out), "--epochs", "2",
            "--global_batch", "4", "--lr", "1e-3", "--final_lr", "1e-4", "--resid_dropout", "0.2",
            "--max_len", "64", "--max_tokens", "64", "--dev", "", *extra]


def run(args, nproc=1, check=True, **kwargs):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable]) + args
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, **kwargs)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(out) -> dict[int, float]:
    """step -> loss, from metrics.jsonl (a resumed run appends to the same file)."""
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_mid_epoch_reproduces_every_later_loss(init_dir, tmp_path, nproc):
    run(train_args(init_dir, tmp_path / "straight"), nproc)
    run(train_args(init_dir, tmp_path / "stopped", "--stop_after", "7"), nproc)  # mid-epoch 1
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "stopped")] == ["step-000007"]
    run(train_args(init_dir, tmp_path / "stopped", "--resume", "auto"), nproc)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert sorted(straight) == sorted(resumed) == list(range(1, 21))
    assert all(straight[s] == resumed[s] for s in straight), (straight, resumed)


def test_resume_with_bf16_weights_and_their_compensated_adamw(init_dir, tmp_path):
    """optim.AdamWBF16's state (moments, integer Kahan terms) resumes too."""
    bf16 = ("--weights", "bf16_kahan", "--lr", "1e-2", "--final_lr", "1e-3")
    run(train_args(init_dir, tmp_path / "straight", *bf16))
    run(train_args(init_dir, tmp_path / "stopped", *bf16, "--stop_after", "13"))
    run(train_args(init_dir, tmp_path / "stopped", *bf16, "--resume", "auto"))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert sorted(resumed) == list(range(1, 21))
    assert all(straight[s] == resumed[s] for s in straight), (straight, resumed)


def test_resume_refuses_a_changed_schedule_or_data_order(init_dir, tmp_path):
    run(train_args(init_dir, tmp_path / "run", "--stop_after", "3"))
    result = run(train_args(init_dir, tmp_path / "run", "--resume", "auto", "--seed", "1"), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith(
        "was trained with --seed 0 but this run has --seed 1: resume with the same value, or start "
        "a new run in another --out")


def test_every_epoch_is_kept_and_old_optimizer_state_dropped(init_dir, tmp_path):
    run(train_args(init_dir, tmp_path, "--save_every", "5"))
    found = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert found == ["step-000005", "epoch-01", "step-000015", "epoch-02"]
    with_optim = [p.name for p in checkpoint.list_checkpoints(tmp_path) if (p / "optim").is_dir()]
    assert with_optim == ["epoch-02"]  # --keep_optim 1


def test_sigkill_during_a_save_never_leaves_a_checkpoint_that_resume_picks(init_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable] + train_args(init_dir, out, "--save_every", "1"),
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = random.Random(0)
    # Wait until the third save is being written, then kill at a random moment within it.
    while len(list(out.glob("step-*"))) < 2 or not list(out.glob(".tmp-*")):
        assert proc.poll() is None, "training ended before the kill"
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete = checkpoint.list_checkpoints(out)  # the saves made before the kill
    assert len(complete) >= 2
    # whatever the kill interrupted is ignored; the newest complete checkpoint resumes
    result = run(train_args(init_dir, out, "--resume", "auto"))
    assert f"resumed from {complete[-1]}" in result.stdout + result.stderr
    # the killed run's steps after that checkpoint were redone, and are in metrics.jsonl once
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 21))
    # starting again without --resume would overwrite the run: refused, in one line
    again = run(train_args(init_dir, out), check=False)
    assert again.returncode == 1 and "already holds checkpoints" in again.stderr.strip().splitlines()[-1]


def test_sigterm_saves_a_resumable_checkpoint_and_exits_0(init_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable] + train_args(init_dir, out), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (out / "metrics.jsonl").is_file() or len(losses(out)) < 3:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "stopped by a signal" in output
    stopped_at = json.loads((checkpoint.list_checkpoints(out)[-1] / "state.json").read_text())["step"]
    assert stopped_at == max(losses(out))
    run(train_args(init_dir, out, "--resume", "auto"))
    assert sorted(losses(out)) == list(range(1, 21))


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(init_dir, tmp_path):
    # tests/poison.py runs train.py with a loss that turns NaN at step 9 (a poisoned batch).
    out = tmp_path / "run"
    result = run(["tests/poison.py", "9"] + train_args(init_dir, out, "--save_every", "4")[1:], check=False)
    assert result.returncode != 0
    assert "step 9: loss nan" in result.stderr
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000004", "step-000008"]
    assert max(losses(out)) == 8


def test_exported_epoch_loads_and_gives_the_training_models_logits(init_dir, tmp_path):
    run(train_args(init_dir, tmp_path))
    ckpt = tmp_path / "epoch-01"
    trained, tok = checkpoint.load_model(ckpt)  # straight from the sharded training checkpoint
    checkpoint.export(ckpt, tmp_path / "export", dtype=torch.float32)
    exported, tok2 = checkpoint.load_model(tmp_path / "export", "cpu", torch.float32)  # the converted format
    tokens = torch.tensor([tok.encode_dialog(["How do I boil an egg?"])])
    torch.testing.assert_close(exported(tokens), trained(tokens), rtol=0, atol=0)
    assert trained.args.vocab_size == tok.vocab_size == tok2.vocab_size  # EOT included


def test_two_ranks_train_the_same_weights_as_one(init_dir, tmp_path):
    # An epoch of 10 AdamW steps without dropout (whose draws depend on the rank count), on one
    # process and as 2-rank FSDP: the same global batches, split differently. Float32 sums in
    # another order differ in the last bits, and AdamW's normalised update can amplify that for
    # a gradient near zero to a sizeable fraction of one step (lr 1e-3), never more.
    for nproc in (1, 2):
        run(train_args(init_dir, tmp_path / f"n{nproc}", "--epochs", "1", "--resid_dropout", "0"), nproc)
    one, _ = checkpoint.load_model(tmp_path / "n1" / "epoch-01")
    two, _ = checkpoint.load_model(tmp_path / "n2" / "epoch-01")
    start = torch.load(init_dir / "model.pth", weights_only=True)
    for (name, p1), p2 in zip(one.state_dict().items(), two.state_dict().values()):
        rows = start[name].size(0)  # the EOT row added to embeddings and output trains too
        assert (p1[:rows] - start[name]).abs().max() > 1e-3, name  # both really trained
        torch.testing.assert_close(p2, p1, rtol=0, atol=1e-4, msg=name)


@pytest.fixture(scope="module")
def two_saves(init_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("saves") / "run"
    run(train_args(init_dir, out, "--save_every", "4", "--stop_after", "8", "--keep_optim", "2"))
    return out


@pytest.mark.parametrize("damage", ["cut-off state.json", "state.json without a step", "no DCP metadata"])
def test_resume_auto_skips_a_damaged_checkpoint_and_says_so(init_dir, two_saves, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(two_saves, out)
    newest = out / "step-000008"
    state = newest / "state.json"
    if damage == "cut-off state.json":
        state.write_text(state.read_text()[:40])
    elif damage == "state.json without a step":
        state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "step"}))
    else:
        (newest / "model" / ".metadata").unlink()
    result = run(train_args(init_dir, out, "--resume", "auto"))
    output = result.stdout + result.stderr
    assert f"skipping: {newest}" in output and f"resumed from {out / 'step-000004'} at step 4" in output


def test_a_truncated_shard_is_refused_in_one_line(init_dir, two_saves, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_saves, out)
    shard = next((out / "step-000008" / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = run(train_args(init_dir, out, "--resume", "auto"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {out / 'step-000008' / 'model'}: ")


def test_resuming_into_a_model_of_another_shape_is_refused(init_dir, two_saves, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_saves, out)
    other = tmp_path / "other"
    shutil.copytree(init_dir, other)
    params = json.loads((other / "params.json").read_text())
    (other / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    result = run(train_args(other, out, "--resume", "auto"), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {out / 'step-000008'} holds a model with n_layers 2, and this run's model has n_layers 3: "
        f"resume with the same model (--init or --preset)")


PEAK = """
import sys
sys.path.insert(0, {root!r})
import checkpoint, torch
{body}
print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')))
"""


def peak_rss(body: str) -> int:
    """Peak resident bytes of a fresh process that imports checkpoint.py and runs body."""
    result = subprocess.run([sys.executable, "-c", PEAK.format(root=str(ROOT), body=body)], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


def test_streaming_export_writes_todays_file_and_never_holds_the_model(tmp_path):
    """A 36M-parameter training checkpoint (146 MB in float32, 12 blocks): the exported model.pth is
    byte for byte the file torch.save(model.state_dict()) writes after loading the whole model (a
    zip whose checksums hold), and the export's peak memory stays under half the model (loading it
    whole: 1.5x)."""
    import warnings
    import torch.distributed.checkpoint as dcp
    from data import Tokenizer
    src = tmp_path / "epoch-01"
    tok = Tokenizer(ROOT / "data/tokenizer.model")
    args = ModelArgs(dim=512, n_layers=12, n_heads=8, n_kv_heads=4, vocab_size=tok.vocab_size, multiple_of=64,
                     max_seq_len=256)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process, on purpose
        dcp.save(model.state_dict(), checkpoint_id=src / "model", no_dist=True)  # as train.py's ranks do
    (src / "params.json").write_text(json.dumps(asdict(args)))
    shutil.copyfile(ROOT / "data/tokenizer.model", src / "tokenizer.model")
    (src / "state.json").write_text(json.dumps(dict(step=1, epoch=1, world_size=1, config={})))
    model_bytes = model.num_params() * 4
    del model
    floor = peak_rss(f"checkpoint.read_metadata({str(src / 'model')!r})")
    streamed = peak_rss(f"checkpoint.export({str(src)!r}, {str(tmp_path / 'new')!r})")
    (tmp_path / "old").mkdir()  # model.pth too: the zip's folder inside is named after the file
    whole = peak_rss(f"m, _ = checkpoint.load_model({str(src)!r}, dtype=torch.bfloat16)\n"
                     f"torch.save(m.state_dict(), {str(tmp_path / 'old/model.pth')!r})")  # the export before
    assert streamed - floor < model_bytes / 2 < whole - floor, (floor, streamed, whole, model_bytes)
    assert (tmp_path / "new/model.pth").read_bytes() == (tmp_path / "old/model.pth").read_bytes()
    new = torch.load(tmp_path / "new/model.pth", weights_only=True)
    assert {t.dtype for t in new.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "new" / "params.json").read_text()) == {
        k: v for k, v in asdict(args).items() if k != "resid_dropout"}


def test_resume_drops_a_metrics_line_cut_by_the_crash_and_refuses_a_broken_one(init_dir, two_saves, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_saves, out)
    metrics = out / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"step": 9, "lo')  # the crash cut the last write short
    result = run(train_args(init_dir, out, "--resume", "auto"))
    assert f"{metrics}:9: dropped a line cut short" in result.stderr
    assert sorted(losses(out)) == list(range(1, 21))
    lines = good.splitlines()
    metrics.write_text("\n".join(lines[:2] + ["not json"] + lines[2:]) + "\n")
    result = run(train_args(init_dir, out, "--resume", "auto"), check=False)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"error: {metrics}:3: not a metrics record (a JSON object with a step); fix or delete the line, then resume")
