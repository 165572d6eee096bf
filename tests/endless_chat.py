"""Run sample.py with an answer that never ends (a token every 10 ms), to interrupt it at will.

    python tests/endless_chat.py <sample.py arguments>
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sample  # noqa: E402


def endless(model, prompts, s, eot_id, slots=None, keys=None, on_token=None, limits=None):
    """sample.decode that never finishes an answer: generate(), chat and --prompts all use it."""
    word = torch.tensor([300])  # any piece but EOT
    while True:
        if on_token:
            on_token(word)
        time.sleep(0.01)
        yield from ()


sample.decode = endless
sample.main(sys.argv[1:])
