"""Run train.py with a loss, or a gradient, that becomes NaN at one step, as a poisoned batch would.

    python tests/poison.py STEP <train.py arguments>         # the loss is NaN at STEP
    python tests/poison.py grad:STEP <train.py arguments>    # the loss is finite, its gradient NaN

On exit it prints how many parameters --step_in_backward stepped during the poisoned step.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402

what, _, step = sys.argv[1].rpartition(":")
poison_step, poison_grad = int(step), what == "grad"
clean_lr_at, clean_loss_sum, clean_hook = train.lr_at, train.loss_sum, train.StepInBackward.hook
current = {"step": 0, "stepped": 0}


class NaNGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def counting_lr_at(step, *args):
    current["step"] = step + 1  # called once per optimizer step, before its micro-steps
    return clean_lr_at(step, *args)


def poisoned_loss_sum(*args):
    loss = clean_loss_sum(*args)
    if current["step"] != poison_step:
        return loss
    return NaNGradient.apply(loss) if poison_grad else loss * float("nan")


def counting_hook(self, p):
    current["stepped"] += current["step"] == poison_step
    clean_hook(self, p)


train.lr_at, train.loss_sum, train.StepInBackward.hook = counting_lr_at, poisoned_loss_sum, counting_hook
try:
    train.main(sys.argv[2:])
finally:
    print(f"parameters stepped in backward at step {poison_step}: {current['stepped']}", file=sys.stderr)
