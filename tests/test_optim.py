"""optim.AdamWBF16 keeps the small updates that a plain bf16 AdamW rounds away."""

import pytest
import torch

from optim import AdamWBF16

N = 4096


def run(opt_cls, dtype, steps, lr, w0):
    """A fixed gradient sequence (independent of the weights), so every optimizer sees the same.

    Returns the stored weights and, for AdamWBF16, the weights plus their compensation.
    """
    p = torch.nn.Parameter(w0.clone().to(dtype))
    opt = opt_cls([p], lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    bias = torch.randn(N, generator=gen)
    for _ in range(steps):
        p.grad = (bias + torch.randn(N, generator=gen)).to(dtype)
        opt.step()
    exact = p.detach().float() + opt.state[p].get("compensation", torch.zeros(N)).float()
    return p.detach().float(), exact


@pytest.mark.parametrize("lr", [1e-5, 1e-6])  # LIMA's first and last learning rates
def test_bf16_adamw_keeps_updates_that_naive_bf16_loses(lr):
    # Weights near 1.0 (RMSNorm gains), starting on bf16 values so every run starts equal.
    w0 = (1.0 + 0.05 * torch.randn(N, generator=torch.Generator().manual_seed(1))).bfloat16().float()
    ref, _ = run(torch.optim.AdamW, torch.float32, steps=2000, lr=lr, w0=w0)
    naive, _ = run(torch.optim.AdamW, torch.bfloat16, steps=2000, lr=lr, w0=w0)
    ours, ours_exact = run(AdamWBF16, torch.bfloat16, steps=2000, lr=lr, w0=w0)
    moved = (ref - w0).abs().mean()
    assert moved > 1000 * lr * 0.9  # the float32 run really moves (Adam steps are ~lr each)
    # Plain bf16 AdamW: each update (~lr) is far below bf16's spacing near 1 (2^-7): nothing moves.
    assert torch.equal(naive, w0)
    # Ours: weight + compensation follows float32 AdamW to within a few percent of the distance
    # travelled, and the stored bf16 weight is as close as bf16 can be (rounding of the answer).
    assert (ours_exact - ref).abs().mean() < 0.1 * moved
    best = (ref.bfloat16().float() - ref).abs().mean()
    assert (ours - ref).abs().mean() < 1.1 * best


def test_bf16_adamw_tracks_float32_adamw_at_ordinary_scale():
    """With weights ~0.02 (matrices) and lr 1e-3, both runs follow the same trajectory."""
    w0 = 0.02 * torch.randn(N, generator=torch.Generator().manual_seed(2))
    ref, _ = run(torch.optim.AdamW, torch.float32, steps=300, lr=1e-3, w0=w0)
    ours, _ = run(AdamWBF16, torch.bfloat16, steps=300, lr=1e-3, w0=w0)
    rel = (ours - ref).norm() / (ref - w0).norm()
    assert rel < 0.02


def test_a_reloaded_state_keeps_its_float16_compensation():
    """torch.optim casts loaded state to the weight's dtype; the compensation must not go bf16."""
    p = torch.nn.Parameter(torch.ones(N, dtype=torch.bfloat16))
    opt = AdamWBF16([p], lr=1e-6)
    p.grad = torch.randn(N, generator=torch.Generator().manual_seed(3)).bfloat16()
    opt.step()
    saved = opt.state[p]["compensation"].clone()
    assert saved.dtype == torch.float16 and saved.abs().max() > 0
    fresh = AdamWBF16([p], lr=1e-6)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[p]["compensation"].dtype == torch.float16
    assert torch.equal(fresh.state[p]["compensation"], saved)
    assert fresh.state[p]["step"] == 1
