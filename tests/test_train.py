"""train.py: LIMA's schedule, the loss normalisation, FSDP on 2 CPU ranks, prompt masking."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import train
from data import IGNORE, pack_batch
from model import ModelArgs, Transformer
from test_checkpoint import init_dir, run, train_args  # noqa: F401  (init_dir: a fixture)

ROOT = Path(__file__).resolve().parents[1]
ARGS = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                 max_seq_len=256)


def torchrun(nproc: int, *args, timeout=300):
    """Run a script under torchrun on CPU (gloo); fail with its output if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def random_examples(lengths, seed=0, prompt_len=3):
    """Conversations as data.py makes them: pre-shifted targets, the first prompt_len masked."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        tokens = torch.randint(0, ARGS.vocab_size, (n,), generator=gen).tolist()
        targets = torch.randint(0, ARGS.vocab_size, (n,), generator=gen).tolist()
        targets[:prompt_len] = [IGNORE] * prompt_len
        examples.append(dict(tokens=tokens, targets=targets))
    return examples


def reference_gradients(model, examples):
    """The definition: one example at a time, no packing, mean over every trained token."""
    model.zero_grad()
    n_trained = sum(sum(t != IGNORE for t in e["targets"]) for e in examples)
    for e in examples:
        logits = model(torch.tensor([e["tokens"]]))
        targets = torch.tensor(e["targets"])
        losses = F.cross_entropy(logits[0], targets, ignore_index=IGNORE, reduction="none")
        (losses.sum() / n_trained).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def fresh_model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ARGS)
    model.init_weights()
    return model


# ---- LIMA's learning rate and sizes ----

def test_a_run_steps_at_1e5_first_and_1e6_last_in_a_straight_line(init_dir, tmp_path):
    """LIMA's schedule (section 2: 1e-5 decaying linearly to 1e-6, no warmup) as a real run logs it:
    the rate each of its 10 optimizer steps took, from metrics.jsonl."""
    assert (train.TrainConfig.lr, train.TrainConfig.final_lr) == (1e-5, 1e-6)  # the recipe's defaults
    # given on the command line: a model this small would get train.TOY's instead
    run(train_args(init_dir, tmp_path, "--epochs", "1", "--lr", "1e-5", "--final_lr", "1e-6"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "loss" in r]
    assert len(lrs) == 10
    assert lrs[0] == 1e-5  # no warmup: the first step takes the whole rate
    assert lrs[-1] == pytest.approx(1e-6, rel=1e-9)  # and the last step the final one
    drops = [a - b for a, b in zip(lrs, lrs[1:])]
    assert min(drops) > 0 and max(drops) == pytest.approx(min(drops), rel=1e-6)  # a straight line down


def test_size_defaults_follow_the_paper():
    assert train.lima_size_defaults(65_285_660_672) == dict(global_batch=32, resid_dropout=0.3)
    assert train.lima_size_defaults(6_738_415_616) == dict(global_batch=64, resid_dropout=0.2)


# ---- the loss: one normalisation however the batch is split ----

def test_packed_micro_steps_give_the_full_batch_gradient():
    """Very uneven lengths, packed into rows of at most 40 tokens (several micro-steps)."""
    examples = random_examples([3 + 2, 37, 9, 21, 5, 30, 12])
    model = fresh_model()
    expected = reference_gradients(model, examples)
    model.zero_grad()
    packing = pack_batch([len(e["tokens"]) for e in examples], 1, 40)
    assert len(packing[0]) > 1 and any(len(row) > 1 for row in packing[0])  # accumulation and packing
    n_global = sum(sum(t != IGNORE for t in e["targets"]) for e in examples)
    train.run_micro_steps(model, examples, packing[0], n_global, torch.device("cpu"), 1)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_averaging_per_micro_batch_would_be_wrong():
    """The well-known mistake gives a different gradient: the test above can tell them apart."""
    examples = random_examples([40, 6])
    model = fresh_model()
    expected = reference_gradients(model, examples)
    model.zero_grad()
    for e in examples:  # mean per micro-batch, then mean over micro-batches
        logits = model(torch.tensor([e["tokens"]]))
        (F.cross_entropy(logits[0], torch.tensor(e["targets"]), ignore_index=IGNORE) / 2).backward()
    assert not torch.allclose(model.output.weight.grad, expected["output.weight"], rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_output_loss_equals_cross_entropy_of_the_full_logits(monkeypatch, dtype):
    """The loss and both gradients, over chunks of 7 positions (the last one ragged)."""
    monkeypatch.setattr(train.ChunkedOutputLoss, "CHUNK_BYTES", 7 * 4 * ARGS.vocab_size)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 25, ARGS.dim, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(ARGS.vocab_size, ARGS.dim, generator=gen) / 8).to(dtype).requires_grad_()
    targets = torch.randint(0, ARGS.vocab_size, (2, 25), generator=gen)
    targets[:, :4] = IGNORE
    train.loss_sum(h, w, targets).backward()
    h_ref, w_ref = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    loss = F.cross_entropy((h_ref @ w_ref.t()).flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    loss.backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(train.loss_sum(h, w, targets), loss, **tol)
    torch.testing.assert_close(h.grad.float(), h_ref.grad, **tol)
    torch.testing.assert_close(w.grad.float(), w_ref.grad, **tol)
    assert h.grad.dtype == w.grad.dtype == dtype
    with torch.no_grad():  # the dev loss: the same value, no gradients built
        torch.testing.assert_close(train.loss_sum(h, w, targets), loss, **tol)


def write_init(dir: Path, model: Transformer, examples):
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "params.json").write_text(json.dumps(asdict(model.args)))
    torch.save(model.state_dict(), dir / "model.pth")
    torch.save(examples, dir / "examples.pt")


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_fsdp_two_ranks_equals_full_batch_gradient(tmp_path, ac):
    """2 gloo ranks, FSDP2, activation checkpointing, accumulation: the one-shot gradient."""
    examples = random_examples([50, 7, 33, 12, 60, 9, 25, 18, 41])
    model = fresh_model()
    write_init(tmp_path, model, examples)
    torchrun(2, "tests/fsdp_worker.py", str(tmp_path), str(tmp_path / "out.pt"), "64", ac)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["micro_steps"] > 1
    expected = reference_gradients(model, examples)
    for name, grad in out["grads"].items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


# ---- what is trained ----

def test_masked_prompt_positions_get_no_gradient_and_eot_rows_train():
    eot = ARGS.vocab_size - 1  # the last row, as data.py's EOT is the first id past the base
    model = fresh_model()
    tokens = [1, 5, 6, 7, eot, 8, 9, 10]  # BOS, a prompt, EOT, an answer ...
    targets = [IGNORE, IGNORE, IGNORE, IGNORE, 8, 9, 10, eot]  # ... trained up to its EOT
    h = model.hidden(torch.tensor([tokens])).detach().requires_grad_()
    train.loss_sum(h, model.output.weight, torch.tensor([targets])).backward()
    masked = torch.tensor([t == IGNORE for t in targets])
    assert torch.all(h.grad[0, masked] == 0)
    assert torch.all(h.grad[0, ~masked].abs().sum(-1) > 0)
    # one optimizer step moves the EOT rows of both the embedding and the output layer (without
    # weight decay, which would move every row, trained or not)
    before_emb, before_out = model.tok_embeddings.weight[eot].clone(), model.output.weight[eot].clone()
    opt = train.build_optimizer(model, train.TrainConfig(lr=1e-3, weight_decay=0.0, weights="fp32"))
    train.loss_sum(model.hidden(torch.tensor([tokens])), model.output.weight, torch.tensor([targets])).backward()
    assert model.tok_embeddings.weight.grad[eot].abs().sum() > 0 and model.output.weight.grad[eot].abs().sum() > 0
    opt.step()
    assert not torch.equal(model.tok_embeddings.weight[eot], before_emb)
    assert not torch.equal(model.output.weight[eot], before_out)


def test_weight_decay_skips_norm_gains():
    groups = train.build_optimizer(fresh_model(), train.TrainConfig(weights="fp32")).param_groups
    assert groups[0]["weight_decay"] == 0.1 and all(p.dim() == 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.dim() == 1 for p in groups[1]["params"])


def fake_gpus(monkeypatch, gb=80.0, count=8):
    """A node of `count` GPUs of `gb` GB, as torch would report them; nothing is allocated."""
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Props", (), {"total_memory": gb * 1e9})())
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    return torch.device("cuda", 0)  # only named: choose_memory allocates nothing


def choice(cfg):
    return cfg.weights, cfg.step_in_backward, cfg.max_tokens


def test_65b_picks_the_most_precise_configuration_that_fits_and_refuses_one_that_cannot(monkeypatch):
    cuda = fake_gpus(monkeypatch)
    args = ModelArgs.from_name("llama-65b", vocab_size=32001)
    lima = dict(global_batch=32, resid_dropout=0.3)
    # One node: only bf16 weights with stochastic rounding, stepped in backward (75.5 GB of 78).
    assert choice(train.choose_memory(train.TrainConfig(**lima), args, 8, cuda)) == ("bf16_sr", "true", 8192)
    assert choice(train.choose_memory(train.TrainConfig(**lima), args, 16, cuda)) == ("fp32", "true", 4096)
    assert choice(train.choose_memory(train.TrainConfig(**lima), args, 32, cuda)) == ("fp32", "false", 4096)
    # Every choice stays the user's: a fixed one that does not fit is refused before loading.
    fixed = dict(weights="fp32", step_in_backward="false")
    with pytest.raises(ValueError, match=r"needs at least 84\.\d GB per GPU .* and 78.0 GB are available"):
        train.choose_memory(train.TrainConfig(**lima, **fixed), args, 16, cuda)
    assert choice(train.choose_memory(train.TrainConfig(**lima, weights="bf16_kahan"), args, 16, cuda))[:2] \
        == ("bf16_kahan", "false")
    with pytest.raises(ValueError, match=r"needs at least 84.3 GB per GPU \(--weights bf16_sr --step_in_backward false\)"):  # clipping: no step in backward
        train.choose_memory(train.TrainConfig(**lima, grad_clip=1.0), args, 8, cuda)
    tried = train.choose_memory(train.TrainConfig(**lima, **fixed, memory_check=False), args, 16, cuda)
    assert choice(tried) == ("fp32", "false", 4096)


def test_a_cpu_run_that_cannot_fit_the_hosts_memory_stops_before_loading(monkeypatch):
    """python train.py --preset llama-7b on a 24 GB machine: refused in one line, not OOM-killed."""
    monkeypatch.setattr(train.memory, "host_available_gb", lambda: 24.0)
    cpu = torch.device("cpu")
    args = ModelArgs.from_name("llama-7b", vocab_size=1025)
    with pytest.raises(ValueError, match=r"GB per CPU rank .* and 23.0 GB are available"):
        train.choose_memory(train.TrainConfig(global_batch=64), args, 1, cpu)
    tiny = ModelArgs.from_name("tiny", vocab_size=1025)
    assert choice(train.choose_memory(train.TrainConfig(global_batch=8), tiny, 1, cpu)) == ("fp32", "false", 4096)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks share the machine: 11 GB each
    with pytest.raises(ValueError, match="and 11.0 GB are available"):
        train.choose_memory(train.TrainConfig(global_batch=64), args, 2, cpu)


def test_offload_is_refused_when_the_node_lacks_the_host_memory(monkeypatch):
    cuda = fake_gpus(monkeypatch)
    args = ModelArgs.from_name("llama-65b", vocab_size=32001)
    monkeypatch.setattr(train.memory, "host_available_gb", lambda: 600.0)  # 592 GB with 8 ranks' own
    offload = dict(offload=True, step_in_backward="false", global_batch=32)
    with pytest.raises(ValueError, match=r"--offload true also needs 105\d.\d GB of host memory on this node, "
                                         r"which has 592.0 GB available"):
        train.choose_memory(train.TrainConfig(weights="fp32", **offload), args, 8, cuda)
    # auto: the most precise whose offloaded state the host can hold (bf16_kahan: 653 GB does not)
    assert choice(train.choose_memory(train.TrainConfig(**offload), args, 8, cuda))[0] == "bf16_sr"


def test_step_in_backward_refuses_clipping_and_a_resume_keeps_its_configuration(monkeypatch):
    cuda = fake_gpus(monkeypatch)
    args = ModelArgs.from_name("llama-65b", vocab_size=32001)
    with pytest.raises(ValueError, match="cannot clip by the global norm"):
        train.choose_memory(train.TrainConfig(step_in_backward="true", grad_clip=1.0), args, 8, cuda)
    with pytest.raises(ValueError, match="--weights must be one of auto, fp32, bf16_kahan, bf16_sr, not 'bf16'"):
        train.choose_memory(train.TrainConfig(weights="bf16"), args, 8, cuda)
    saved = dict(weights="bf16_kahan", step_in_backward="false", max_tokens=2048)  # fits 32 GPUs
    resumed = train.choose_memory(train.TrainConfig(global_batch=32), args, 32, cuda, saved)
    assert choice(resumed) == ("bf16_kahan", "false", 2048)  # not the fp32 that auto would pick
    with pytest.raises(ValueError, match="optimizer state is --weights bf16_kahan, which cannot continue as"):
        train.choose_memory(train.TrainConfig(weights="fp32"), args, 32, cuda, saved)


def test_the_plan_counts_the_compute_dtype_the_run_uses(monkeypatch, capsys):
    """One dtype rule for the plan and the run: --dtype fp32 plans 4-byte activations, on a GPU or
    the CPU, and --dtype bf16 plans 2 bytes on the CPU too (it computes in bf16 there)."""
    def planned(**options) -> float:
        train.print_plan(train.TrainConfig(init="", preset="llama-7b", world_size=8, **options))
        totals = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.strip().startswith("total")]
        return float(totals[0])
    assert planned(dtype="fp32") > planned(dtype="bf16") == planned(dtype="auto")  # GPUs are planned: auto is bf16
    monkeypatch.setattr(train.memory, "host_available_gb", lambda: 1000.0)
    args, cpu = ModelArgs.from_name("tiny", vocab_size=1025), torch.device("cpu")
    seen = []
    monkeypatch.setattr(train.memory, "candidates", lambda base, *rest: seen.append(base.compute_bytes) or [base])
    for dtype in ("auto", "fp32", "bf16"):
        train.choose_memory(train.TrainConfig(global_batch=8, dtype=dtype), args, 1, cpu, verbose=False)
    assert seen == [4, 4, 2] == [train.resolve_dtype(d, cpu).itemsize for d in ("auto", "fp32", "bf16")]


def test_step_in_backward_refuses_a_batch_that_needs_more_than_one_row():
    batches = train.Batches([30, 30, 30, 30], global_batch=4, world_size=1, max_tokens=64, seed=0)
    with pytest.raises(ValueError, match="step 1 packs into 2 rows of --max_tokens 64"):
        train.check_one_row(batches, 0, 2)
    train.check_one_row(train.Batches([30] * 4, global_batch=4, world_size=2, max_tokens=64, seed=0), 0, 2)


def test_step_flops_match_torch_flop_counter():
    # torch's FlopCounterMode counts every matmul of forward and backward, and attention (here
    # the math kernel, which it can see into) as the full n x n square; step_flops counts the
    # causal half only, so they differ by exactly that.
    model = Transformer(ARGS)
    lengths = [40, 7, 90]
    tokens = torch.randint(0, ARGS.vocab_size, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens, positions, lengths).sum().backward()
    causal_half = 6 * ARGS.n_layers * ARGS.dim * sum(n * n for n in lengths)
    assert counter.get_total_flops() == train.step_flops(ARGS, lengths) + causal_half
