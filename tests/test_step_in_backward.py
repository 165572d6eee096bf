"""train.py --step_in_backward: the same training as the ordinary step, resumable, and stopped by a
NaN before (loss) or as soon as (gradient) it can be seen. Runs train.py as a user would."""

import pytest
import torch

import checkpoint
from test_checkpoint import init_dir, losses, run, train_args  # noqa: F401  (init_dir: a fixture)

# Rows of global_batch x max_len = 4 x 256 tokens: both modes take one row per rank per step,
# so they compute the same gradients and differ only in when the optimizer steps.
ONE_ROW = ("--max_tokens", "1024")


def trained_weights(out, step):
    model, _ = checkpoint.load_model(out / f"step-{step:06d}")
    return model.state_dict()


@pytest.mark.parametrize("nproc, weights", [(1, "fp32"), (1, "bf16_kahan"), (1, "bf16_sr"), (2, "fp32"),
                                            (2, "bf16_sr")])
def test_stepping_in_backward_trains_the_same_weights_as_the_ordinary_step(init_dir, tmp_path, nproc, weights):
    for mode in ("false", "true"):
        run(train_args(init_dir, tmp_path / mode, "--weights", weights, "--step_in_backward", mode,
                       *ONE_ROW, "--stop_after", "4"), nproc)
    ordinary, in_backward = trained_weights(tmp_path / "false", 4), trained_weights(tmp_path / "true", 4)
    start = torch.load(init_dir / "model.pth", weights_only=True)
    for name, p in ordinary.items():
        rows = start[name].size(0)  # the EOT row added to embeddings and output trains too
        assert not torch.equal(p[:rows], start[name].to(p.dtype)), name  # really trained
        # fp32: the same float32 operations on the same gradients; bf16: the same random stream
        # (optim.py keys it by parameter and step, not by the order of stepping)
        torch.testing.assert_close(in_backward[name], p, rtol=0, atol=0, msg=name)
    assert losses(tmp_path / "true") == losses(tmp_path / "false")


def test_resume_with_stochastic_rounding_in_backward_reproduces_every_later_loss(init_dir, tmp_path):
    sr = ("--weights", "bf16_sr", "--step_in_backward", "true", *ONE_ROW)
    run(train_args(init_dir, tmp_path / "straight", *sr))
    run(train_args(init_dir, tmp_path / "stopped", *sr, "--stop_after", "13"))
    # --weights and --step_in_backward left at auto: a resumed run continues as it began
    run(train_args(init_dir, tmp_path / "stopped", *ONE_ROW, "--resume", "auto"))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert sorted(resumed) == list(range(1, 21))
    assert all(straight[s] == resumed[s] for s in straight), (straight, resumed)


def test_a_nan_loss_stops_before_any_weight_is_stepped(init_dir, tmp_path):
    out = tmp_path / "run"
    args = train_args(init_dir, out, "--save_every", "4", "--step_in_backward", "true", *ONE_ROW)[1:]
    result = run(["tests/poison.py", "6"] + args, check=False)
    assert result.returncode == 1
    assert "step 6: loss nan; stopping without saving (last good checkpoint: " in result.stderr
    assert "parameters stepped in backward at step 6: 0" in result.stderr
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000004"]
    assert max(losses(out)) == 5


def test_a_nan_gradient_stops_the_run_naming_the_step_and_saves_nothing(init_dir, tmp_path):
    out = tmp_path / "run"
    args = train_args(init_dir, out, "--save_every", "4", "--step_in_backward", "true", *ONE_ROW)[1:]
    result = run(["tests/poison.py", "grad:8"] + args, check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()
    assert any(line.startswith("error: step 8: loss ") and ", grad norm nan; the weights were already "
               "stepped in backward; stopping without saving" in line for line in last), result.stderr
    assert "parameters stepped in backward at step 8: 0" not in result.stderr  # it was seen after
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000004"]  # step 8's save: not made
    assert max(losses(out)) == 7
