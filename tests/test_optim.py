"""optim.AdamWBF16 keeps, at every magnitude of a LLaMA weight, the small updates that a plain bf16
AdamW rounds away: against float64 AdamW as the truth and float32 AdamW as the usual standard."""

import math

import pytest
import torch

from optim import AdamWBF16, gap, round_stochastic

MAGNITUDES = [1e-3, 1e-2, 0.1, 1.0, 2.0, 4.0, 8.0]  # from small matrix entries to large norm gains
N = 32768  # weights per magnitude


def start_weights(seed=1):
    """N weights per magnitude, +-5% around it, random signs, on bf16 values (all runs start equal)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.cat([m * (1 + 0.05 * torch.randn(N, generator=gen)) for m in MAGNITUDES])
    sign = torch.randint(0, 2, w.shape, generator=gen) * 2 - 1
    return (w * sign).bfloat16().double()


def run(make_opt, dtype, w0, steps, lr, compensation=None):
    """AdamW on a fixed gradient stream (independent of the weights, so every run sees the same):
    a consistent direction per weight plus noise, so that each update is close to lr.

    Returns (stored weights, exact weights): for Kahan the exact one adds the compensation.
    """
    p = torch.nn.Parameter(w0.clone().to(dtype))
    opt = make_opt([p], lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    if compensation is not None:  # Kahan in mid-training: start with these compensations
        opt.state[p] = dict(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                            compensation=compensation.clone())
    gen = torch.Generator().manual_seed(0)
    direction = torch.randint(0, 2, w0.shape, generator=gen).double() * 2 - 1
    for _ in range(steps):
        p.grad = (direction * (1 + 0.3 * torch.randn(w0.shape, generator=gen, dtype=torch.float64))).to(dtype)
        opt.step()
    stored = p.detach().double()
    comp = opt.state[p].get("compensation")
    exact = stored if comp is None else stored + comp.double() * gap(p.detach()).double() * 2**-16
    return stored, exact


def kahan(params, **kw):
    return AdamWBF16(params, rounding="kahan", **kw)


def stochastic(params, **kw):
    return AdamWBF16(params, rounding="stochastic", seed=7, **kw)


def buckets(x):
    return x.view(len(MAGNITUDES), N)  # (magnitude, weight)


@pytest.mark.parametrize("lr", [1e-5, 1e-6])  # LIMA's first and last learning rates
def test_both_bf16_adamws_keep_small_updates_at_every_magnitude(lr):
    steps = 400
    w0 = start_weights()
    ref, _ = run(torch.optim.AdamW, torch.float64, w0, steps, lr)  # the truth
    f32, _ = run(torch.optim.AdamW, torch.float32, w0, steps, lr)
    naive, _ = run(torch.optim.AdamW, torch.bfloat16, w0, steps, lr)
    k_stored, k_exact = run(kahan, torch.bfloat16, w0, steps, lr)
    s_stored, _ = run(stochastic, torch.bfloat16, w0, steps, lr)
    travel = buckets((ref - w0).abs()).mean(1)  # (magnitude,)
    assert torch.all(travel > 0.8 * steps * lr)  # the true run moves by about lr a step
    for i, m in enumerate(MAGNITUDES):
        w0_m, ref_m = buckets(w0)[i], buckets(ref)[i]
        # Plain bf16: where a gap is far wider than the whole journey, nothing moves at all.
        if gap(w0_m.bfloat16()).min() > 4 * steps * lr:
            assert torch.equal(buckets(naive)[i], w0_m), m
        # Kahan: weight + compensation is as close to the truth as float32 AdamW gets, ...
        k_err = (buckets(k_exact)[i] - ref_m).abs().mean()
        f32_err = (buckets(f32)[i] - ref_m).abs().mean()
        assert k_err < 1.5 * f32_err + 0.02 * travel[i], (m, k_err, f32_err, travel[i])
        # ... and the stored weight moves wherever the truth has moved to another bf16 value
        # (before the fix: 3% of them did for weights in [1, 1.05]), to within a gap of it.
        k_m, crossed = buckets(k_stored)[i], ref_m.bfloat16().double() != w0_m
        if crossed.sum() > 100:
            assert (k_m[crossed] != w0_m[crossed]).double().mean() > 0.95, m
        assert ((k_m - ref_m).abs() <= gap(k_m.bfloat16()).double()).double().mean() > 0.99, m
        # Stochastic: right on average. A z-test of the mean error against its own standard
        # error, at 5 sigma: a correct rounding fails it with probability 6e-7.
        s_err = buckets(s_stored)[i] - ref_m
        assert s_err.mean().abs() < 5 * s_err.std() / math.sqrt(N), (m, s_err.mean(), s_err.std())
        sign = torch.sign(ref_m - w0_m)
        assert ((buckets(s_stored)[i] - w0_m) * sign).mean() > 0.6 * travel[i], m  # and it moves


def test_kahan_keeps_small_updates_with_a_compensation_of_any_size():
    """Mid-training, a weight's compensation lies anywhere in +-half a gap. There a float16
    compensation (the bug this replaced) swallowed 1e-6 updates above 1.0 (its own spacing near
    2^-8 is 2^-19, 1.9e-6); the integer one keeps them like float32 AdamW at every magnitude."""
    steps, lr = 300, 1e-6
    w0 = start_weights()
    units = torch.randint(-2**15, 2**15, w0.shape, generator=torch.Generator().manual_seed(5)).to(torch.int16)
    exact0 = w0 + units.double() * gap(w0.bfloat16()).double() * 2**-16
    ref, _ = run(torch.optim.AdamW, torch.float64, exact0, steps, lr)
    f32, _ = run(torch.optim.AdamW, torch.float32, exact0, steps, lr)
    _, k_exact = run(kahan, torch.bfloat16, w0, steps, lr, compensation=units)
    travel = buckets((ref - exact0).abs()).mean(1)
    for i, m in enumerate(MAGNITUDES):
        k_err = (buckets(k_exact)[i] - buckets(ref)[i]).abs().mean()
        f32_err = (buckets(f32)[i] - buckets(ref)[i]).abs().mean()
        assert k_err < 1.5 * f32_err + 0.02 * travel[i], (m, k_err / travel[i], f32_err / travel[i])


def test_the_stochastic_rounding_is_unbiased():
    """For x between bf16 neighbours a < b the expected rounding is x: P(b) = (x - a) / (b - a).

    200,000 draws of each of 20 values (both signs, across binades, a power of two's
    neighbourhood): each mean within 5 standard errors of x (false alarm 6e-7 per value), and
    only ever a or b.
    """
    gen = torch.Generator().manual_seed(0)
    xs = torch.cat([torch.tensor([1 + 2**-9, 2 - 2**-10, 1 - 2**-12, 1e-3 + 3e-7, 7.99]),
                    torch.rand(15, generator=gen) * 10 - 5])
    for x in xs.tolist():
        draws = round_stochastic(torch.full((200_000,), x), gen).float()
        nearest = torch.tensor([x]).bfloat16()  # and its bf16 neighbours on either side
        around = [torch.nextafter(nearest, torch.tensor([v]).bfloat16()).item() for v in (-9.0, 9.0)]
        below = max(v for v in around + [nearest.item()] if v <= x)
        above = min(v for v in around + [nearest.item()] if v >= x)
        assert set(draws.unique().tolist()) <= {below, above}, x
        p = (x - below) / (above - below)
        se = (above - below) * math.sqrt(p * (1 - p) / len(draws)) + 1e-12
        assert abs(draws.double().mean().item() - x) < 5 * se, x


def test_stochastic_draws_do_not_depend_on_the_order_parameters_are_stepped():
    """train.py --step_in_backward steps parameters in backward's order, one at a time."""
    gen = torch.Generator().manual_seed(3)
    w = [torch.randn(1000, generator=gen) for _ in range(3)]
    grads = [[torch.randn(1000, generator=gen).bfloat16() for _ in range(3)] for _ in range(5)]
    results = []
    for order in ([0, 1, 2], [2, 1, 0]):
        params = [torch.nn.Parameter(x.bfloat16()) for x in w]
        opt = AdamWBF16(params, lr=1e-3, rounding="stochastic", seed=1)
        for step_grads in grads:
            for i in order:
                params[i].grad = step_grads[i]
                opt.step()  # only params[i] has a gradient
                params[i].grad = None
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    other_seed = [torch.nn.Parameter(x.bfloat16()) for x in w]
    opt = AdamWBF16(other_seed, lr=1e-3, rounding="stochastic", seed=2)
    for step_grads in grads:
        for p, g in zip(other_seed, step_grads):
            p.grad = g
        opt.step()
    assert not torch.equal(other_seed[0], results[0][0])  # the seed does change the draws


@pytest.mark.parametrize("make_opt, tolerance", [(kahan, 0.02), (stochastic, 0.04)])
def test_bf16_adamw_tracks_float32_adamw_at_ordinary_scale(make_opt, tolerance):
    """With weights ~0.02 (matrices) and lr 1e-3, both runs follow the same trajectory.

    Stochastic rounding's error is a random walk of steps up to a gap that nothing corrects
    (here 2.3% of the distance travelled); Kahan's is float32's plus the bf16 moments'.
    """
    w0 = 0.02 * torch.randn(4096, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w0 = w0.bfloat16().double()
    ref, _ = run(torch.optim.AdamW, torch.float32, w0, 300, 1e-3)
    ours, _ = run(make_opt, torch.bfloat16, w0, 300, 1e-3)
    assert (ours - ref).norm() / (ref - w0).norm() < tolerance


def test_a_reloaded_state_continues_exactly():
    """torch.optim casts floating-point state to the weight's dtype on loading: the integer
    compensation is untouched, and the reloaded optimizer takes the same next step."""
    def fresh(seed=3):
        p = torch.nn.Parameter(1 + 0.1 * torch.randn(4096, generator=torch.Generator().manual_seed(seed)).bfloat16())
        return p

    for make_opt in (kahan, stochastic):
        p = fresh()
        opt = make_opt([p], lr=1e-6)
        grads = [torch.randn(4096, generator=torch.Generator().manual_seed(s)).bfloat16() for s in range(3)]
        for g in grads[:2]:
            p.grad = g
            opt.step()
        q = torch.nn.Parameter(p.detach().clone())
        reloaded = make_opt([q], lr=1e-6)
        reloaded.load_state_dict(opt.state_dict())
        if make_opt is kahan:
            assert reloaded.state[q]["compensation"].dtype == torch.int16
            assert reloaded.state[q]["compensation"].abs().max() > 0
        p.grad, q.grad = grads[2], grads[2].clone()
        opt.step()
        reloaded.step()
        assert torch.equal(p, q), make_opt.__name__
