"""Run train.py with a loss that becomes NaN at one step, as a poisoned batch would.

    python tests/poison.py STEP <train.py arguments>
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402

poison_step = int(sys.argv[1])
clean_lr_at, clean_loss_sum = train.lr_at, train.loss_sum
current = {"step": 0}


def counting_lr_at(step, *args):
    current["step"] = step + 1  # called once per optimizer step, before its micro-steps
    return clean_lr_at(step, *args)


def poisoned_loss_sum(*args):
    loss = clean_loss_sum(*args)
    return loss * float("nan") if current["step"] == poison_step else loss


train.lr_at, train.loss_sum = counting_lr_at, poisoned_loss_sum
train.main(sys.argv[2:])
