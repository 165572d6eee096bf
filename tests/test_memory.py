"""memory.py's plan against a real optimizer step, the closed forms it gives for every preset, a real
FSDP run, and autograd's saved tensors."""

import json
from dataclasses import asdict
from functools import cache

import pytest
import torch

import train
from memory import (Options, activation_bytes_per_token, candidates, choose, param_counts, plan,
                    smallest_world_size)
from model import CONFIGS, ModelArgs, Transformer

# Meta's counts at vocab 32,000 (tests/test_model.py), plus the EOT rows: 2 * dim more.
COUNTS = {"llama-7b": 6_738_415_616 + 2 * 4096, "llama-13b": 13_015_864_320 + 2 * 5120,
          "llama-33b": 32_528_943_616 + 2 * 6656, "llama-65b": 65_285_660_672 + 2 * 8192,
          "llama2-70b": 68_976_648_192 + 2 * 8192}
SMALL = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=16, max_seq_len=32)


MODES = ["fp32", "bf16_kahan", "bf16_sr"]


@cache
def state_after_a_step(weights: str) -> tuple[dict[str, int], int]:
    """Bytes of the weights, gradients and AdamW state that a SMALL model holds after one real step
    of train.py's optimizer in this --weights mode (torch's AdamW in float32, or optim.AdamWBF16
    with its bf16 moments and, for Kahan, its int16 compensation); and its parameter count."""
    torch.manual_seed(0)
    model = Transformer(SMALL)
    model.init_weights()
    if weights != "fp32":
        model.to(torch.bfloat16)
    optimizer = train.build_optimizer(model, train.TrainConfig(weights=weights))
    model(torch.randint(0, SMALL.vocab_size, (1, 8))).float().sum().backward()
    optimizer.step()

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)
    params = list(model.parameters())
    state = [t for p in params for t in optimizer.state[p].values() if torch.is_tensor(t) and t.dim() > 0]  # not step counts
    return dict(params=nbytes(params), grads=nbytes(p.grad for p in params), optim=nbytes(state)), model.num_params()


@pytest.mark.parametrize("weights", MODES)
def test_the_plan_on_one_rank_is_what_a_real_step_holds(weights):
    planned = plan(SMALL, Options(world_size=1, weights=weights))["gpu"]
    assert state_after_a_step(weights)[0] == {k: planned[k] for k in ("params", "grads", "optim")}


@pytest.mark.parametrize("name", sorted(COUNTS))
@pytest.mark.parametrize("world_size", [1, 8, 16, 64])
def test_sharded_state_bytes_are_the_closed_forms(name, world_size):
    """Bytes a parameter (measured above) x Meta's parameter count / ranks, for every preset and mode."""
    args = ModelArgs.from_name(name, vocab_size=32001)
    for weights in MODES:
        measured, n_params = state_after_a_step(weights)
        gpu = plan(args, Options(world_size=world_size, weights=weights))["gpu"]
        for k, b in measured.items():
            assert gpu[k] == pytest.approx(b / n_params * COUNTS[name] / world_size, rel=1e-12), (weights, k)


def chosen(args, world_size, **kw):
    o = Options(world_size=world_size, max_tokens=0)
    best, _ = choose(args, candidates(o, kw.get("weights", "auto"), kw.get("in_backward", "auto"), 32, 2048,
                                      kw.get("grad_clip", False)))
    return best and (best.weights, best.step_in_backward, best.max_tokens)


def test_65b_fits_one_node_only_with_stochastic_rounding_stepped_in_backward():
    args = ModelArgs.from_name("llama-65b", vocab_size=32001)
    # 8 GPUs: 6 bytes a parameter (bf16 weights and moments) = 49 GB of state; rows of a rank's
    # 4 examples of up to 2,048 tokens
    assert chosen(args, 8) == ("bf16_sr", True, 8192)
    assert chosen(args, 8, grad_clip=True) is None  # clipping needs whole-model gradients
    assert chosen(args, 8, weights="bf16_kahan") is None  # 8 bytes a parameter: 65 GB of state
    assert chosen(args, 16) == ("fp32", True, 4096)  # two nodes: float32, stepped in backward
    assert chosen(args, 16, in_backward="false") == ("bf16_kahan", False, 4096)
    assert chosen(args, 32) == ("fp32", False, 4096)  # four nodes: the ordinary float32 step
    assert not plan(args, Options(world_size=8))["fits"]  # 16 bytes x 65B / 8 = 130 GB of state
    assert plan(args, Options(world_size=8, offload=True))["fits"]
    assert smallest_world_size(args, Options(weights="bf16_kahan")) == 16


def test_block_and_root_counts_add_up():
    for name in CONFIGS:
        args = ModelArgs.from_name(name, vocab_size=1000)
        with torch.device("meta"):
            model = Transformer(args)
        total, block, root = param_counts(args)
        assert total == model.num_params()
        assert block == sum(p.numel() for p in model.layers[0].parameters())


@pytest.mark.parametrize("weights, in_backward", [("fp32", False), ("bf16_kahan", False), ("bf16_sr", True)])
def test_plan_matches_what_fsdp_allocates_on_two_ranks(tmp_path, weights, in_backward):
    """Parameter, gradient and AdamW bytes each rank really holds, against the plan; stepped in
    backward, the most gradient bytes alive at any moment of backward."""
    from test_train import torchrun
    args = ModelArgs(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=500, multiple_of=32,
                     max_seq_len=128)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    (tmp_path / "params.json").write_text(json.dumps(asdict(args)))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    torch.save([dict(tokens=list(range(1, 40)), targets=list(range(2, 41)))] * 2, tmp_path / "examples.pt")
    torchrun(2, "tests/fsdp_worker.py", str(tmp_path), str(tmp_path / "out.pt"), "64", "full", weights,
             str(in_backward).lower())
    measured = torch.load(tmp_path / "out.pt", weights_only=True)["bytes"]  # (rank, [params, grads, optim])
    planned = plan(args, Options(world_size=2, compute_bytes=4, weights=weights,
                                 step_in_backward=in_backward))["gpu"]
    # In backward the plan allows two blocks' reduce buffers (a GPU overlaps the next block's
    # reduce-scatter with this one's steps); the CPU ranks here hold one at a time.
    planned["grads"] /= 2 if in_backward else 1
    for rank in range(2):
        for i, key in enumerate(["params", "grads", "optim"]):
            assert measured[rank, i].item() == pytest.approx(planned[key], rel=0.03), (rank, key)


def saved_bytes(fn, exclude):
    """Bytes of the distinct storages autograd saves for backward while fn runs."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_activation_estimate_within_15_percent_of_saved_tensors():
    args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=1000, multiple_of=32,
                     max_seq_len=512, resid_dropout=0.2)
    model = Transformer(args).train()
    model.init_weights()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights.add(model.freqs_cis.untyped_storage().data_ptr())
    T = 256
    x = torch.randn(1, T, args.dim, requires_grad=True)
    measured = saved_bytes(lambda: model.layers[1](x, model.freqs_cis[:T]), weights)
    estimate = T * activation_bytes_per_token(args, 4)["none"]
    assert measured == pytest.approx(estimate, rel=0.15)

    def every_block():
        h = x
        for layer in model.layers:
            h = layer(h, model.freqs_cis[:T])
    planned = plan(args, Options(world_size=1, max_tokens=T, ac="none", compute_bytes=4))["gpu"]["activations"]
    assert planned == pytest.approx(saved_bytes(every_block, weights), rel=0.15)  # without checkpointing
