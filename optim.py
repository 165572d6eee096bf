"""
AdamW for pure bf16 weights that does not lose LIMA's small updates (train.py --weights bf16).

    python -m pytest -q tests/test_optim.py

bf16 keeps 8 bits of mantissa: next to a weight of 1.0 the nearest other values are 1 - 2^-9 and
1 + 2^-8, so any update smaller than ~0.002 rounds back to 1.0. AdamW's update is about lr in
size, 1e-5 to 1e-6 in LIMA's recipe, so a plain bf16 AdamW leaves most weights exactly where they
were. Kahan (compensated) summation fixes it for 2 bytes a parameter: keep what each rounding
threw away in a 2-byte buffer and add it back into the next update, so the small steps accumulate
until they move the weight. The moments are bf16 too: 2 (weight) + 2 (grad) + 2 + 2 (moments)
+ 2 (compensation) = 10 bytes a parameter instead of the 16 of fp32 weights with fp32 AdamW.
"""

import torch


class AdamWBF16(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with bf16 state and Kahan-compensated bf16 weights."""

    def __init__(self, params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict):
        """torch.optim's loading, but the float16 compensation stays float16.

        Optimizer.load_state_dict casts every floating-point state tensor to its weight's dtype:
        bf16 here, which would round away the compensation's 3 extra bits on every resume.
        """
        super().load_state_dict(state_dict)
        # Saved keys (indices, or names from DCP) pair with the parameters in order, as torch does.
        keys = [k for group in state_dict["param_groups"] for k in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for key, p in zip(keys, params):
            if key in state_dict["state"]:
                self.state[p]["compensation"] = state_dict["state"][key]["compensation"].to(p.device, torch.float16)

    @torch.no_grad()
    def step(self, closure=None):
        # closure: torch.optim's interface, which DCP's optimizer-state loading calls
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    # float16, not bf16: it only ever holds less than half a bf16 step of its
                    # weight, a narrow range where float16's 10-bit mantissa keeps the 1e-6
                    # updates that bf16's 7 bits would round away again (measured: 40x closer).
                    state["compensation"] = torch.zeros_like(p, dtype=torch.float16)
                state["step"] += 1
                step = state["step"]
                # The arithmetic is float32; only what is stored is bf16.
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
                weight = p.float()
                update = -group["lr"] * (exp_avg / bias1 / ((exp_avg_sq / bias2).sqrt() + group["eps"])
                                         + group["weight_decay"] * weight)
                # Kahan: the exact new weight is weight + compensation + update; store its bf16
                # rounding as the weight and what the rounding lost as the new compensation.
                exact = weight + (update + state["compensation"].float())
                p.copy_(exact)
                state["compensation"].copy_(exact - p.float())
        return loss
