"""
AdamW for pure bf16 weights that does not lose LIMA's small updates (train.py --weights bf16_kahan
or bf16_sr).

    python -m pytest -q tests/test_optim.py

bf16 keeps 8 significant bits (7 stored): between 1 and 2 its values are 2^-7 apart, between 0.5
and 1 they are 2^-8 apart, so the neighbours of 1.0 are 1 - 2^-8 and 1 + 2^-7, and an update
smaller than half a gap (2^-9 below 1.0, 2^-8 above) rounds back to 1.0. AdamW's update is about lr
in size, 1e-5 to 1e-6 in LIMA's recipe: a plain bf16 AdamW leaves most weights where they were.
Both fixes here compute AdamW in float32 and differ in how the result is stored:

- rounding="kahan": round to the nearest bf16 and keep what the rounding threw away (less than
  half a gap) in a 16-bit integer, in units of 2^-16 of the weight's gap. Weight + compensation is
  then a float32 number (24 significant bits) at every magnitude: the trajectory is float32
  AdamW's. (A float16 compensation does not do it: its precision is relative to its own size,
  so near half a gap of a weight above 1.0 its own spacing is 2^-19 = 1.9e-6, and it swallows
  1e-6 updates.) 2 (weight) + 2 (compensation) + 2 + 2 (bf16 moments) = 8 bytes a parameter.
- rounding="stochastic": round up or down at random, with the probability that makes the stored
  value right on average (round up with probability (x - below) / gap), so that small updates
  move a weight by a whole gap now and then, as often as their sizes add up to. Unbiased but
  noisy: each weight carries a random error of up to a gap. No extra buffer: 6 bytes a parameter.
  The draws come from a stream keyed by (seed, parameter, step), so they do not depend on the
  order in which parameters are stepped (train.py --step_in_backward steps them in backward's
  order) and a resumed run draws exactly what the uninterrupted one did, with nothing to save.

The moments are rounded to the nearest bf16: each step moves them by a tenth (beta1 0.9) or a
twentieth (beta2 0.95) of their distance to the new gradient, far more than bf16's relative
precision of 2^-9, so nothing is rounded away there.
"""

import torch
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of an FSDP2 parameter, gradient or state (a view: writes go through)."""
    return t.to_local() if isinstance(t, DTensor) else t


def gap(w: torch.Tensor) -> torch.Tensor:
    """The distance from bf16 value w to the next bf16 value away from zero, as float32.

    For |w| in [2^e, 2^(e+1)) that is 2^(e-7): the float32 whose exponent field is w's minus 7
    and whose mantissa is zero (at least the smallest normal float, for w = 0).
    """
    exponent_bits = w.float().view(torch.int32) & 0x7F800000
    return (exponent_bits - (7 << 23)).clamp_(min=1 << 23).view(torch.float32)


def round_stochastic(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 -> bf16, rounding away from zero with probability (|x| - |below|) / gap.

    bf16 is float32's upper 16 bits. Adding a uniform 16-bit integer to the lower 16 bits and
    dropping them carries into the upper ones with exactly that probability (the carry crosses
    into the exponent at a power of two, as it should); on the sign-magnitude bit pattern this
    rounds the magnitude, so the expected result is x for either sign.
    """
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) >> 16).to(torch.int16).view(torch.bfloat16)


class AdamWBF16(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with bf16 weights and moments, float32 arithmetic."""

    def __init__(self, params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                 rounding="kahan", seed=0):
        if rounding not in ("kahan", "stochastic"):
            raise ValueError(f"rounding must be kahan or stochastic, not {rounding!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.rounding, self.seed = rounding, seed
        self.index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self.generators = {}  # one per device, reseeded for every parameter and step

    def load_state_dict(self, state_dict: dict):
        """torch.optim's loading, but the integer compensation stays an integer.

        Optimizer.load_state_dict casts every state tensor of a floating-point weight to the
        weight's dtype: bf16 here, which keeps 8 of the compensation's 16 bits.
        """
        super().load_state_dict(state_dict)
        # Saved keys (indices, or names from DCP) pair with the parameters in order, as torch does.
        keys = [k for group in state_dict["param_groups"] for k in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for key, p in zip(keys, params):
            if "compensation" in state_dict["state"].get(key, {}):
                self.state[p]["compensation"] = state_dict["state"][key]["compensation"].to(p.device, torch.int16)

    @torch.no_grad()
    def step(self, closure=None):
        # closure: torch.optim's interface, which DCP's optimizer-state loading calls
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group)
        return loss

    def step_param(self, p: torch.Tensor, group: dict):
        """One parameter's AdamW step, on this rank's shard of it."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
            if self.rounding == "kahan":
                state["compensation"] = torch.zeros_like(p, dtype=torch.int16)  # 2^-16 gaps
        state["step"] += 1
        step, (beta1, beta2) = state["step"], group["betas"]
        # The arithmetic is float32 on this rank's shard; only what is stored is bf16.
        w, grad = local(p), local(p.grad).float()
        exp_avg = local(state["exp_avg"]).float().lerp_(grad, 1 - beta1)
        exp_avg_sq = local(state["exp_avg_sq"]).float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        local(state["exp_avg"]).copy_(exp_avg)
        local(state["exp_avg_sq"]).copy_(exp_avg_sq)
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        weight = w.float()
        update = -group["lr"] * (exp_avg / bias1 / ((exp_avg_sq / bias2).sqrt() + group["eps"])
                                 + group["weight_decay"] * weight)
        if self.rounding == "kahan":
            # exact: the new float32 weight, (w + compensation) + update. Store its nearest bf16
            # and, in the compensation, what that rounding lost (exact in float32, |.| <= gap/2).
            comp = local(state["compensation"])
            exact = weight + comp.float() * gap(w) * 2**-16 + update
            w.copy_(exact)
            units = ((exact - w.float()) / gap(w) * 2**16).round_()
            comp.copy_(units.clamp_(-2**15, 2**15 - 1))  # +2^15 only at an exact tie: 1 unit off
        else:
            w.copy_(round_stochastic(weight + update, self.generator(w.device, self.index[p], step)))

    def generator(self, device: torch.device, index: int, step: int) -> torch.Generator:
        """The random stream of one parameter at one step: a function of (seed, index, step)."""
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device)
        key = ((self.seed * 1_000_003 + index) * 1_000_003 + step) % 2**63
        return self.generators[device].manual_seed(key)
