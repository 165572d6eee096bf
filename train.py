"""
LIMA fine-tuning: supervised loss on ~1,000 curated conversations, FSDP2 + activation checkpointing.

The CPU demo (data/base, a 3.5M-parameter LLaMA pretrained on facts, fine-tuned on 144
conversations about them; about 25 s; see README and data/make_demo.py):
    python train.py
The same on two CPU processes (gloo), as the 8-GPU run would be on a node:
    torchrun --standalone --nproc_per_node 2 train.py
The same fine-tune from random weights (what pretraining gave the base, missing):
    python train.py --init "" --preset tiny --out out/demo-scratch
LIMA itself: LLaMA 65B converted with convert.py, on one 8xA100-80GB node, which it fits with
bf16 weights, stochastic rounding and the optimizer stepped in backward (picked by the memory
plan, printed at the start; more nodes get float32; see --plan true):
    torchrun --nproc_per_node 8 train.py --init ckpt/llama-65b --data lima/train.jsonl \\
        --dev lima/dev.jsonl --out out/lima-65b
    (slurm.sh does the same under SLURM)
Resume after a crash or preemption (the newest complete checkpoint in --out):
    torchrun ... train.py <same arguments> --resume auto
Every option, with its default:
    python train.py --help
"""

import sys
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Literal

from cli import Range, check_fields, parse_config, parse_or_exit

# model.py's CONFIGS by name (and below, --weights: memory.WEIGHTS), spelled out so that the command
# line is read without torch; tests/test_cli.py checks that they agree.
PRESETS = ("llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama2-7b", "llama2-13b", "llama2-70b", "tiny")


@dataclass
class TrainConfig:
    # What to train. --init is a directory written by convert.py (params.json, model.pth,
    # tokenizer.model); the default is the CPU demo's small pretrained base (data/make_demo.py).
    init: str = "data/base"  # the model to fine-tune, a directory written by convert.py; "": --preset from random weights
    preset: Literal[*PRESETS] = "tiny"  # the shape of a model from random weights, with --init "" (model.py CONFIGS)
    tokenizer: str = "data/tokenizer.model"  # with --init "" (a converted directory brings its own)
    data: str = "data/demo/train.jsonl"  # the training conversations: jsonl in LIMA's format (data.py)
    dev: str = "data/demo/dev.jsonl"  # dev loss after every epoch; "" to skip
    out: str = "out/demo"  # the run's folder: its checkpoints (epoch-NN), metrics.jsonl, config.json
    # LIMA's recipe (section 2 of the paper).
    epochs: Annotated[int, Range(ge=1)] = 15  # passes over --data
    global_batch: Annotated[int, Range(ge=0)] = 0  # examples per optimizer step over all ranks; 0: 32 for 65B, 64 smaller
    lr: Annotated[float, Range(gt=0)] = 1e-5  # the learning rate of the first step, decaying to --final_lr
    final_lr: Annotated[float, Range(gt=0)] = 1e-6  # linear decay from lr to final_lr over the whole run, no warmup
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9  # AdamW's decay rate of its first moment (the mean gradient)
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.95  # AdamW's decay rate of its second moment (the squared gradient)
    weight_decay: Annotated[float, Range(ge=0)] = 0.1  # AdamW's decoupled weight decay, on matrices and embeddings (not norm gains)
    resid_dropout: Annotated[float, Range(ge=0, lt=1, also=(-1,))] = -1.0  # top layer's residual dropout; -1: 0.3 for 65B, 0.2 smaller
    max_len: Annotated[int, Range(ge=1)] = 2048  # longer conversations are trimmed (counted and reported)
    train_on_prompt: bool = False  # LIMA trains on the responses only
    grad_clip: Annotated[float, Range(ge=0)] = 0.0  # max global grad norm; 0: off (LIMA does not mention clipping)
    seed: Annotated[int, Range(ge=0, lt=2**32)] = 0  # the data order, the random init and dropout
    # How to run it.
    max_tokens: Annotated[int, Range(ge=0)] = 0  # tokens in one packed row (a micro-step) per rank; 0: 4096, or a rank's whole share with --step_in_backward
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # compute dtype: auto is bf16 on GPU, fp32 on CPU
    weights: Literal["auto", "fp32", "bf16_kahan", "bf16_sr"] = "auto"  # fp32 (fp32 AdamW), bf16_kahan or bf16_sr (optim.py); auto: the most precise that fits
    step_in_backward: Literal["auto", "true", "false"] = "auto"  # true: step each parameter as its gradient arrives (no whole-model gradients); auto: if needed to fit
    ac: Literal["full", "selective", "none"] = "full"  # activation checkpointing per block: full, selective or none
    offload: bool = False  # FSDP CPU offload of parameters, gradients and optimizer state
    compile: bool = False  # torch.compile each block
    # Checkpoints: one after every epoch, all kept.
    save_every: Annotated[int, Range(ge=0)] = 0  # also every this many steps (0: epochs only)
    keep_optim: Annotated[int, Range(ge=0)] = 1  # AdamW state kept in the newest this many checkpoints (0: none)
    resume: str = ""  # "auto" (newest complete in --out, or start fresh) or a checkpoint dir
    stop_after: Annotated[int, Range(ge=0)] = 0  # save and exit once this many steps are done (a time-limited job); 0: off
    plan: bool = False  # print the memory plan (memory.py) for this model and options, and exit
    memory_check: bool = True  # refuse to start a run the plan says will not fit (GPU memory, or host RAM on a CPU run)
    world_size: Annotated[int, Range(ge=1)] = 8  # GPUs to plan for (--plan)
    gpu_gb: Annotated[float, Range(gt=0)] = 80.0  # memory of each planned GPU (--plan)


# LIMA's values are for LLaMA 7B to 65B. A model of a few million parameters (the CPU demo's
# base, or --preset tiny) does not learn the format from a few dozen conversations at lr 1e-5 in
# the 15 steps that a batch of 64 gives: it needs larger steps, and more of them. For models under
# TOY_PARAMS parameters these replace the recipe's values, unless set on the command line, and
# train.py says so when they apply; every other value is the paper's.
TOY_PARAMS = 100_000_000
TOY = dict(global_batch=8, lr=3e-4, final_lr=3e-5)


# The command line is read before torch is imported (a second or two), so that --help and a
# mistyped option answer at once: all of the above needs only the standard library.
if __name__ == "__main__":
    parse_or_exit(TrainConfig, sys.argv[1:])

import gc
import json
import math
import os
import signal
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from tqdm import tqdm

import checkpoint
import memory
from data import IGNORE, Batches, DataError, Tokenizer, collate, load_dataset, pack_batch
from model import (CONFIGS, ModelArgs, Transformer, check_state_dict, extend_vocab, load_weights_file,
                   resolve_dtype, vocab_rows)
from optim import AdamWBF16, local


# ---- LIMA's schedule and loss, each with its reason ----

def lr_at(step: int, total_steps: int, lr: float, final_lr: float) -> float:
    """Linear decay from lr at the first step to final_lr at the last, no warmup (LIMA, sec. 2).

    The model is already pretrained, so there is nothing to warm up from: the first step takes
    the full 1e-5, the last takes 1e-6.
    """
    return lr + (final_lr - lr) * step / max(total_steps - 1, 1)


def lima_size_defaults(n_params: int) -> dict:
    """The paper's two sizes of recipe: 65B gets batch 32 and dropout 0.3, smaller models 64, 0.2."""
    big = n_params > 50e9
    return dict(global_batch=32 if big else 64, resid_dropout=0.3 if big else 0.2)


def loss_sum(h: torch.Tensor, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the per-token cross-entropies over trained tokens (targets != IGNORE).

    h (B, T, D): the model's final hidden states (Transformer.hidden); output (V, D): its output
    projection. The logits are formed only where a target is trained (the prompts need none).
    A sum, not a mean: train() divides by the number of trained tokens in the whole global
    batch, over all ranks and micro-steps. Averaging per micro-batch instead would give each
    token of a short example more weight than a token of a long one, and make the gradient
    depend on how the batch happens to be split.
    """
    keep = targets != IGNORE  # (B, T)
    # Under no_grad (the dev loss) autograd still reports the weight as needing a gradient: say so.
    return ChunkedOutputLoss.apply(h[keep], output, targets[keep], torch.is_grad_enabled())


class ChunkedOutputLoss(torch.autograd.Function):
    """sum(cross_entropy(h @ output.T, targets)), a chunk of positions at a time.

    Done the plain way, a packed row of 4,096 tokens over 32,001 pieces makes five (T, V)
    tensors (logits, float32 copy, log-softmax, two gradients), 2.6 GB in float32: for a
    small model most of a step's memory traffic, and on the CPU fresh memory that the kernel
    faults in page by page. Here each chunk's logits become its loss and at once its gradient, softmax minus the
    one-hot target, which feeds both input gradients and is dropped. The gradients are
    computed in forward because nothing after the loss can change them but the scalar
    backward brings. Same FLOPs as the plain way, nothing recomputed; float32 softmax.
    """
    CHUNK_BYTES = memory.LOSS_CHUNK_BYTES  # of float32 logits per chunk: the memory plan counts the same

    @staticmethod
    def forward(ctx, h, output, targets, grad_enabled):  # h (N, D), output (V, D), targets (N,)
        needs_grad = grad_enabled and any(ctx.needs_input_grad[:2])
        chunk = max(1, ChunkedOutputLoss.CHUNK_BYTES // (4 * output.size(0)))
        loss = torch.zeros((), device=h.device)
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_out = torch.zeros(output.shape, device=h.device) if needs_grad else None  # float32
        for s in range(0, h.size(0), chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]  # (c, D), (c,)
            z = (hc @ output.t()).float()  # (c, V)
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            loss += (lse - z.gather(1, tc[:, None]).squeeze(1)).sum()
            if needs_grad:
                z.sub_(lse[:, None]).exp_()  # softmax
                z[torch.arange(len(tc), device=z.device), tc] -= 1  # d loss / d logits
                dz = z.to(h.dtype)
                grad_h[s:s + chunk] = dz @ output
                if grad_out.dtype == dz.dtype:
                    grad_out.addmm_(dz.t(), hc)
                else:  # bf16 matmul, summed over the chunks in float32
                    grad_out += dz.t() @ hc
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_out.to(output.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_out = ctx.saved_tensors
        return grad_h * grad_loss, grad_out * grad_loss, None, None


# ---- distributed setup, model building ----

def setup_distributed() -> tuple[int, int, torch.device]:
    """One code path at every scale: a plain `python train.py` is a process group of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(29500 + os.getpid() % 20000)))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        # nccl for the GPUs; gloo beside it for collectives on CPU tensors, which --offload
        # makes of the gradients (their norm is all-reduced on the CPU, where they live).
        dist.init_process_group("cuda:nccl,cpu:gloo", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shutdown_distributed():
    """Destroy the process group after train() has returned, not inside it.

    Only then are the model, its device mesh and the optimizer gone, and with them the last
    references to gloo's communicator: it is destroyed now, while Python is alive, instead of at
    interpreter exit, where its worker threads can abort the process after a finished run.
    """
    gc.collect()  # FSDP's modules and hooks hold each other in cycles
    dist.barrier()  # no rank may tear down the group while another still talks
    dist.destroy_process_group()


def apply_ac(model: Transformer, mode: str):
    """Activation checkpointing per block: keep only each block's input, recompute the rest.

    full: recompute the whole block in backward (~1/3 more compute, activations of one block).
    selective: save the matmul and attention outputs, recompute only the cheap elementwise ops.
    Dropout masks are replayed exactly: the wrapper restores the RNG state for the recompute.
    """
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"--ac must be full, selective or none, not {mode!r}")
    save_ops = {torch.ops.aten.mm.default, torch.ops.aten._scaled_dot_product_efficient_attention.default,
                torch.ops.aten._scaled_dot_product_flash_attention.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save_ops else CheckpointPolicy.PREFER_RECOMPUTE

    context_fn = partial(create_selective_checkpoint_contexts, policy)
    for i, block in enumerate(model.layers):
        model.layers[i] = (checkpoint_wrapper(block, context_fn=context_fn) if mode == "selective"
                           else checkpoint_wrapper(block))


def apply_fsdp(model: Transformer, cfg: TrainConfig, compute_dtype: torch.dtype):
    """FSDP2: shard each block, then the root (embeddings, final norm, output).

    Each block's weights are gathered just before it runs and freed after, so a rank holds its
    1/world of the model plus about one block. Weights and their AdamW state stay float32 (the
    small LIMA updates survive); compute runs in compute_dtype; gradients are reduced in float32.
    """
    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    kwargs = dict(mesh=mesh, mp_policy=mp)
    if cfg.offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for i, block in enumerate(model.layers):
        # The last block's weights are needed again at once by backward: keep them gathered.
        fully_shard(block, reshard_after_forward=i < len(model.layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    # The loss calls model.hidden, not forward: it must gather the root's weights all the same.
    # The root is not resharded after its forward, so model.output.weight is then the whole
    # (V, D) matrix, whose gradient FSDP reduces with the rest.
    register_fsdp_forward_method(model, "hidden")


@torch.no_grad()
def load_pretrained_(model: Transformer, path: Path):
    """Fill the sharded model from convert.py's model.pth, each rank reading only its own rows.

    The file is memory-mapped: a rank touches the pages of its shard of each tensor, so no
    rank ever holds the whole model. Tensors with fewer vocabulary rows than the model (the
    base model before EOT) get the new rows as the mean of the old ones (model.extend_vocab).
    """
    state_dict = load_weights_file(path / "model.pth")
    vocab_size = vocab_rows(state_dict, source=str(path / "model.pth"))  # before EOT, if a base model
    with torch.device("meta"):
        base = Transformer(ModelArgs(**{**asdict(model.args), "vocab_size": vocab_size}))
    check_state_dict(base, state_dict, source=str(path / "model.pth"))
    for name, param in model.named_parameters():
        # Meta's name: without what activation checkpointing and torch.compile wrap around a block
        full = state_dict[name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")]
        if full.size(0) < param.size(0):  # tok_embeddings and output: grow by EOT
            full = extend_vocab(full, param.size(0) - full.size(0))
        copy_shard_(param, full)


def copy_shard_(param: torch.Tensor, full: torch.Tensor):
    """Copy this rank's part of `full` into param: FSDP2 shards dim 0 as torch.chunk does."""
    if not isinstance(param, DTensor):
        param.copy_(full)
        return
    mesh = param.device_mesh
    chunks = full.chunk(mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    local = param.to_local()  # (rows of this rank, ...): a view of FSDP's storage
    if local.numel():
        local.copy_(chunks[rank])  # the dtype conversion touches this slice only


def model_args(cfg: TrainConfig, tokenizer: Tokenizer) -> ModelArgs:
    """The model's shape (from --init's params.json or --preset), vocabulary including EOT."""
    if cfg.init:
        args = ModelArgs.from_params(Path(cfg.init) / "params.json", vocab_size=tokenizer.vocab_size)
        check_init_vocab(Path(cfg.init), tokenizer)
    else:
        args = ModelArgs.from_name(cfg.preset, vocab_size=tokenizer.vocab_size)
    args.max_seq_len = max(args.max_seq_len, cfg.max_len)
    return args


def check_init_vocab(init: Path, tokenizer: Tokenizer):
    """--init's embedding rows must be the tokenizer's pieces (a base model, which gets LIMA's EOT
    row) or pieces + EOT (a model fine-tuned here before): any other count is another tokenizer's."""
    rows = vocab_rows(load_weights_file(init / "model.pth"), source=str(init / "model.pth"))  # mmap: reads no weights
    if rows not in (tokenizer.n_base, tokenizer.vocab_size):
        raise ValueError(f"{init / 'model.pth'} has {rows} embedding rows but {init / 'tokenizer.model'} has "
                         f"{tokenizer.n_base} pieces: expected {tokenizer.n_base} (a base model) or "
                         f"{tokenizer.vocab_size} (with LIMA's EOT); the weights and the tokenizer do not belong together")


def resolve_size_defaults(cfg: TrainConfig, args: ModelArgs) -> TrainConfig:
    """--global_batch 0 and --resid_dropout -1 filled from the model's size, as the paper does."""
    sized = lima_size_defaults(memory.param_counts(args)[0])
    return replace(cfg, global_batch=cfg.global_batch or sized["global_batch"],
                   resid_dropout=sized["resid_dropout"] if cfg.resid_dropout < 0 else cfg.resid_dropout)


def toy_overrides(cfg: TrainConfig, args: ModelArgs, given: set[str]) -> tuple[TrainConfig, dict]:
    """TOY's values for a model under TOY_PARAMS, where not given: (the config, what changed)."""
    if memory.param_counts(args)[0] >= TOY_PARAMS:
        return cfg, {}
    changed = {k: v for k, v in TOY.items() if k not in given and getattr(cfg, k) != v}
    return replace(cfg, **changed), changed


def build_model(cfg: TrainConfig, args: ModelArgs, device) -> Transformer:
    """Meta device -> activation checkpointing -> FSDP -> materialise -> load or init."""
    with torch.device("meta"):
        model = Transformer(args)  # no memory: 65B of parameters are only shapes here
    if cfg.weights != "fp32":
        model.to(torch.bfloat16)  # on meta: only the recorded dtype changes
    apply_ac(model, cfg.ac)
    if cfg.compile:
        for i, block in enumerate(model.layers):
            model.layers[i] = torch.compile(block, dynamic=True)
    apply_fsdp(model, cfg, resolve_dtype(cfg.dtype, device))
    model.to_empty(device="cpu" if cfg.offload else device)
    if cfg.init:
        model.init_buffers()
        load_pretrained_(model, Path(cfg.init))
    else:
        torch.manual_seed(cfg.seed)
        with warnings.catch_warnings():
            # On a CPU mesh each rank draws its own shard from its own generator: a valid random
            # init, though not the one a single process would draw. Nothing to warn about.
            warnings.filterwarnings("ignore", "DTensor random operators")
            model.init_weights()
    if cfg.offload:  # the RoPE table is used where the computation runs
        model.freqs_cis = model.freqs_cis.to(device)
    return model


def build_optimizer(model: Transformer, cfg: TrainConfig, rank: int = 0) -> torch.optim.Optimizer:
    """AdamW with decay on the weight matrices and embeddings, none on the RMSNorm gains.

    Decay pulls weights toward zero, a prior that makes sense for matrices; a norm gain is a
    per-channel scale whose natural value is 1, and decaying it only shrinks activations.
    fp32: torch's AdamW one tensor at a time (foreach=False), whose temporaries are one
    tensor's, not the whole model's; bf16: optim.py's, with its rounding.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if cfg.weights == "fp32":
        return torch.optim.AdamW(groups, foreach=False, **kwargs)
    rounding = dict(bf16_kahan="kahan", bf16_sr="stochastic")[cfg.weights]
    return AdamWBF16(groups, rounding=rounding, seed=cfg.seed * 100_003 + rank, **kwargs)


# ---- the loop ----

class Stop:
    """Remembers a SIGTERM/SIGINT (SLURM preemption, Ctrl-C) until the next step boundary."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request)

    def request(self, signum, frame):
        self.requested = True

    def agreed(self, device) -> bool:
        """True on every rank if any rank was signalled, so all of them save together."""
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def row_loss(model, examples, idxs, device) -> torch.Tensor:
    """Forward over one packed row: the summed loss of its trained tokens (no division)."""
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(examples, idxs).items()}
    h = model.hidden(batch["tokens"], batch["positions"], batch["doc_lens"])  # (1, L, D)
    return loss_sum(h, model.output.weight, batch["targets"])


def global_loss(loss_sum_rank: torch.Tensor, n_global: int) -> float:
    """This rank's summed loss -> the mean over every trained token of the global batch."""
    total = loss_sum_rank.detach().clone()
    dist.all_reduce(total)
    return total.item() / n_global


def run_micro_steps(model, examples, rows, n_global, device, world_size):
    """Forward and backward over this rank's packed rows; returns the summed loss (no division).

    Every row's loss is divided by the global count of trained tokens, so the accumulated
    gradient is d(sum of all token losses)/N however the batch was split. FSDP averages
    gradients over ranks, which the factor world_size undoes. Gradients are reduce-scattered
    after every row: skipping that for all but the last (FSDP's no-sync) would hold the whole
    model's unsharded float32 gradients on every rank, 261 GB at 65B.
    """
    total = torch.zeros((), device=device)
    for idxs in rows:
        loss = row_loss(model, examples, idxs, device)
        (loss * world_size / n_global).backward()
        total += loss.detach()
    return total


class StepInBackward:
    """--step_in_backward: step each parameter as soon as FSDP2 has reduce-scattered its gradient,
    and free that gradient at once, so that no rank ever holds the whole model's gradients.

    FSDP2 runs a sharded parameter's post-accumulate-grad hooks right after writing its gradient,
    block by block as backward goes down the model. That needs the whole batch in one backward
    (one row per rank: a gradient cannot be accumulated over micro-steps once it is spent), and
    rules out clipping by the global norm (known only when every gradient exists). The squared
    norm is summed on the device as the gradients pass, with no sync per parameter, which would
    stall the reduce-scatters behind it; grad_norm() reduces it once, after backward.
    """

    def __init__(self, model, optimizer, device):
        self.optimizer, self.sq = optimizer, torch.zeros((), device=device)
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(self.hook)

    def hook(self, p):
        self.sq += local(p.grad).float().pow(2).sum()
        self.optimizer.step()  # p holds the only gradient: the others are spent or still to come
        p.grad = None

    def grad_norm(self) -> float:
        dist.all_reduce(self.sq)
        norm = self.sq.sqrt().item()
        self.sq.zero_()
        return norm


def check_every_step_trains(batches: Batches, train_set, cfg: TrainConfig):
    """Refuse a run with a step whose every conversation lost its answers to trimming: its loss
    would be divided by zero trained tokens. Cheap: one shuffle per epoch, no tokens touched."""
    trained = [e["n_trained"] for e in train_set.examples]
    for epoch in range(cfg.epochs):
        for step in range(batches.steps_per_epoch):
            if not any(trained[i] for i in batches.global_batch_indices(epoch, step)):
                raise DataError(f"{train_set.path}: step {epoch * batches.steps_per_epoch + step + 1} draws only "
                                f"conversations with no answer token left after trimming to --max_len "
                                f"{cfg.max_len}: raise --max_len or --global_batch, or drop those conversations")


def check_one_row(batches: Batches, start: int, total_steps: int):
    """--step_in_backward: every step left must give each rank a single row; else refuse now."""
    for step in range(start, total_steps):
        rows = len(batches.rows(*divmod(step, batches.steps_per_epoch))[0])
        if rows > 1:
            raise ValueError(f"--step_in_backward needs one row per rank at every step, but step "
                             f"{step + 1} packs into {rows} rows of --max_tokens {batches.max_tokens}: "
                             f"raise --max_tokens, or use --step_in_backward false")


def stop_if_not_finite(step: int, out: Path, loss: float, grad_norm: float | None = None, stepped=False):
    """A NaN or infinite loss or gradient stops the run naming the step; nothing is saved."""
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    last = checkpoint.list_checkpoints(out)
    where = "the weights were already stepped in backward; " if stepped else ""
    norm = f", grad norm {grad_norm}" if grad_norm is not None else ""
    raise FloatingPointError(f"step {step + 1}: loss {loss}{norm}; {where}stopping without saving "
                             f"(last good checkpoint: {last[-1] if last else 'none'})")


@torch.no_grad()
@torch.no_grad()
def dev_loss(model, examples, max_tokens: int, device, rank: int = 0, world_size: int = 1) -> tuple[float, int]:
    """(mean loss per trained token, trained tokens) on the dev set, dropout off: the loss that
    training minimises, on conversations it never saw. The ranks share the set out by the same
    packing; eval.py's loss table computes it with this function too, one process on a checkpoint."""
    was_training = model.training
    model.eval()
    packing = pack_batch([len(e["tokens"]) for e in examples], world_size, max_tokens)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, trained tokens)
    for idxs in packing[rank]:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(examples, idxs).items()}
        h = model.hidden(batch["tokens"], batch["positions"], batch["doc_lens"])
        total[0] += loss_sum(h, model.output.weight, batch["targets"])
        total[1] += (batch["targets"] != IGNORE).sum()
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item(), int(total[1].item())


# ---- the memory plan: what fits the device ----

CUDA_RESERVE_GB = 2.0  # GPU memory outside the plan: CUDA context, NCCL buffers, fragmentation (not measured)


def ranks_on_this_node(device) -> int:
    """The ranks that share this machine's memory: its GPUs, or the CPU processes torchrun started."""
    return torch.cuda.device_count() if device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def memory_budget(device) -> tuple[float, str]:
    """GB one rank may plan for, and of what: its GPU, or its share of the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / memory.GB - CUDA_RESERVE_GB, "GPU"
    return memory.host_available_gb() / ranks_on_this_node(device) - memory.PROCESS_GB, "CPU rank"


def choose_memory(cfg: TrainConfig, args: ModelArgs, world_size: int, device, saved: dict | None = None,
                  verbose: bool = True) -> TrainConfig:
    """Before anything loads: settle --weights, --step_in_backward and --max_tokens, and refuse a
    run that the memory plan says would run out of memory.

    "auto" takes the most precise configuration that fits this rank's memory (memory.candidates
    gives the order); a resumed run keeps what it started with. Without this a 65B run that cannot
    fit finds out after many minutes of loading, and a CPU run that exhausts the host's RAM is
    killed by the kernel without a word.
    """
    check_choices(cfg)
    if saved:  # a resumed run continues as it began: the same optimizer state and rows
        for name, unset in (("weights", "auto"), ("step_in_backward", "auto"), ("max_tokens", 0)):
            if getattr(cfg, name) == unset:
                setattr(cfg, name, saved[name])
        if saved["weights"] != cfg.weights:
            raise ValueError(f"this run's optimizer state is --weights {saved['weights']}, which cannot "
                             f"continue as --weights {cfg.weights}: resume with the same value")
    budget_gb, budget = memory_budget(device)
    ranks_here = ranks_on_this_node(device)
    host_gb = memory.host_available_gb() - ranks_here * memory.PROCESS_GB  # for --offload's state
    base = memory.Options(world_size=world_size, gpus_per_node=ranks_here, max_tokens=cfg.max_tokens,
                          ac=cfg.ac, offload=cfg.offload, gpu_gb=budget_gb, host_gb=host_gb if cfg.offload else 0.0,
                          compute_bytes=resolve_dtype(cfg.dtype, device).itemsize)
    options = memory.candidates(base, cfg.weights, cfg.step_in_backward, cfg.global_batch, cfg.max_len,
                                cfg.grad_clip > 0)
    chosen, plans = memory.choose(args, options)
    p = next((p for o, p in zip(options, plans) if o is chosen), None)
    if chosen is None:
        least, p = min(zip(options, plans), key=lambda op: (op[1]["gpu_total"], op[1]["cpu_per_node"]))
        if cfg.memory_check:
            host = (f"; --offload true also needs {p['cpu_per_node'] / memory.GB:.1f} GB of host memory on "
                    f"this node, which has {host_gb:.1f} GB available" if cfg.offload else "")
            raise ValueError(f"the memory plan needs at least {p['gpu_total'] / memory.GB:.1f} GB per {budget} "
                             f"(--weights {least.weights} --step_in_backward {str(least.step_in_backward).lower()}) "
                             f"and {budget_gb:.1f} GB are available ({world_size} rank(s), --ac {cfg.ac}){host}; "
                             f"see train.py --plan true for what fits (--memory_check false to try anyway)")
        chosen = least  # told to try anyway: the least hungry
    cfg.weights, cfg.max_tokens = chosen.weights, chosen.max_tokens
    cfg.step_in_backward = str(chosen.step_in_backward).lower()
    if verbose:
        print(f"memory plan: --weights {cfg.weights} --step_in_backward {cfg.step_in_backward} --max_tokens "
              f"{cfg.max_tokens}: {p['gpu_total'] / memory.GB:.1f} of {budget_gb:.1f} GB per {budget}"
              + (" (the most precise that fits)" if len(options) > 1 else ""))
    return cfg


# ---- checkpoints and metrics ----

RUN_DEFINING = ("data", "epochs", "global_batch", "seed", "lr", "final_lr", "max_len", "train_on_prompt")


def check_same_run(saved: dict, cfg: TrainConfig, path: Path):
    """The step count is the data position only if the run is the same run: refuse otherwise."""
    for name in RUN_DEFINING:
        if saved.get(name) != getattr(cfg, name):
            raise ValueError(f"{path} was trained with --{name} {saved.get(name)} but this run has "
                             f"--{name} {getattr(cfg, name)}: resume with the same value, or start "
                             f"a new run in another --out")


def open_metrics(path: Path, step: int):
    """metrics.jsonl for appending, holding only the records up to `step`, where the run resumes:
    a crashed run's steps after its last checkpoint are dropped, as they are about to be redone.
    A last line cut short by the crash goes with them; a bad line before it is an error."""
    kept = []
    lines = path.read_text().splitlines() if step and path.is_file() else []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            record_step = record["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if n == len(lines):
                print(f"{path}:{n}: dropped a line cut short (by the crash?)", file=sys.stderr)
                break
            raise ValueError(f"{path}:{n}: not a metrics record (a JSON object with a step); "
                             f"fix or delete the line, then resume") from None
        if record_step <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")


def save(path: Path, step: int, batches: Batches, cfg: TrainConfig, ckpt_args: dict):
    """Save a checkpoint, then drop AdamW's state from all but the newest --keep_optim.

    The data position needs no saving of its own: the order of epoch e is a pure function of
    (seed, e), so the step count says exactly where in which epoch the run stands.
    """
    epoch, step_in_epoch = divmod(step, batches.steps_per_epoch)
    state = dict(step=step, epoch=epoch, step_in_epoch=step_in_epoch, config=asdict(cfg))
    checkpoint.save(path, state=state, **ckpt_args)
    checkpoint.drop_old_optimizer_states(path.parent, cfg.keep_optim)


def step_flops(args: ModelArgs, lengths: list[int]) -> float:
    """Model FLOPs of one optimizer step over conversations of these lengths (PaLM's count).

    Every matmul weight costs 6 FLOPs per token (2 forward, 4 backward); the embedding is a
    lookup and the RMSNorm gains are elementwise, so neither counts. Causal attention within a conversation of n tokens adds, per layer,
    n^2 D multiply-adds for q k^T and as many for the weighted sum of v (half of the n x n
    square, twice 2 FLOPs each): 2 n^2 D forward, 6 n^2 D with backward. Recomputation by
    activation checkpointing is not counted: MFU measures useful work.
    """
    norm_gains = (2 * args.n_layers + 1) * args.dim
    matmul_params = memory.param_counts(args)[0] - args.vocab_size * args.dim - norm_gains
    return 6 * matmul_params * sum(lengths) + 6 * args.n_layers * args.dim * sum(n * n for n in lengths)


# Dense bf16 tensor-core peak by device name (first match wins), from NVIDIA's data sheets.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_stats(device, flops_per_s: float) -> dict:
    """Peak memory and MFU (model FLOPs per second per GPU over the bf16 peak), on GPU."""
    if device.type != "cuda":
        return {}
    stats = dict(peak_mem_gb=torch.cuda.max_memory_allocated(device) / 1e9)
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak:
        stats["mfu"] = flops_per_s / peak
    return stats


# ---- the run ----

def train(cfg: TrainConfig):
    rank, world_size, device = setup_distributed()
    out = Path(cfg.out)
    if not cfg.resume and checkpoint.list_checkpoints(out):  # before minutes of loading
        raise ValueError(f"{out} already holds checkpoints of a run: --resume auto continues it, "
                         f"or choose another --out (nothing was overwritten)")
    if cfg.resume not in ("", "auto"):  # one checkpoint, not a run's folder of them
        auto = "--resume auto" + ("" if Path(cfg.resume) == out else f" --out {cfg.resume}")
        if why := checkpoint.not_one_checkpoint(Path(cfg.resume), resume=auto):
            raise ValueError(why)
    tokenizer_path = Path(cfg.init) / "tokenizer.model" if cfg.init else Path(cfg.tokenizer)
    tokenizer = Tokenizer(tokenizer_path)
    args = model_args(cfg, tokenizer)  # --init's params.json and vocabulary: checked before the data is read
    cfg = resolve_size_defaults(cfg, args)
    args.resid_dropout = cfg.resid_dropout
    train_set = load_dataset(cfg.data, tokenizer, cfg.max_len, cfg.train_on_prompt, verbose=rank == 0)
    dev_set = load_dataset(cfg.dev, tokenizer, cfg.max_len, cfg.train_on_prompt, verbose=rank == 0) if cfg.dev else None
    found = (checkpoint.list_checkpoints(out) if cfg.resume == "auto" else [Path(cfg.resume)]) if cfg.resume else []
    if cfg.resume == "auto" and rank == 0:
        for why in checkpoint.damaged(out):  # a damaged one is never picked, and said so
            print(f"skipping: {why}")
    saved = checkpoint.read_state(found[-1])["config"] if found else None
    if found:
        checkpoint.check_same_shape(found[-1], args)  # before minutes of loading
    cfg = choose_memory(cfg, args, world_size, device, saved, verbose=rank == 0)
    batches = Batches([len(e["tokens"]) for e in train_set.examples], cfg.global_batch, world_size,
                      cfg.max_tokens, cfg.seed)
    check_every_step_trains(batches, train_set, cfg)  # before the model is built
    model = build_model(cfg, args, device)
    torch.manual_seed(cfg.seed + rank)  # dropout masks: reproducible, and different on every rank
    n_params = model.num_params()
    optimizer = build_optimizer(model, cfg, rank)
    total_steps = cfg.epochs * batches.steps_per_epoch

    step = 0  # optimizer steps taken so far, over all epochs
    if found:
        state = checkpoint.load(found[-1], model, optimizer)
        check_same_run(state["config"], cfg, found[-1])
        step = state["step"]
        if rank == 0:
            print(f"resumed from {found[-1]} at step {step}")
    stepper = None
    if cfg.step_in_backward == "true":
        check_one_row(batches, step, total_steps)
        stepper = StepInBackward(model, optimizer, device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        print(f"{n_params:,} parameters, {world_size} rank(s) on {device.type}, "
              f"{len(train_set.examples)} examples, {batches.steps_per_epoch} steps per epoch, "
              f"{total_steps} steps")
    metrics = open_metrics(out / "metrics.jsonl", step) if rank == 0 else None
    stop = Stop()
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    ckpt_args = dict(model=model, optimizer=optimizer, args=model.args, tokenizer_path=tokenizer_path)
    while step < total_steps:
        epoch, step_in_epoch = divmod(step, batches.steps_per_epoch)
        t0 = time.perf_counter()
        idxs = batches.global_batch_indices(epoch, step_in_epoch)
        rows = batches.rows(epoch, step_in_epoch)  # rows[rank][micro-step] = examples in that row
        n_global = sum(train_set.examples[i]["n_trained"] for i in idxs)
        lengths = [len(train_set.examples[i]["tokens"]) for i in idxs]
        n_tokens = sum(lengths)
        lr = lr_at(step, total_steps, cfg.lr, cfg.final_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if stepper:
            loss_sum_row = row_loss(model, train_set.examples, rows[rank][0], device)
            loss = global_loss(loss_sum_row, n_global)  # the whole batch's, before backward touches any weight
            stop_if_not_finite(step, out, loss)
            (loss_sum_row * world_size / n_global).backward()  # every parameter is stepped in it
            grad_norm = stepper.grad_norm()
            stop_if_not_finite(step, out, loss, grad_norm, stepped=True)
        else:
            loss = global_loss(run_micro_steps(model, train_set.examples, rows[rank], n_global, device,
                                               world_size), n_global)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
            stop_if_not_finite(step, out, loss, grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        record = dict(step=step, epoch=round(step / batches.steps_per_epoch, 4), loss=loss, lr=lr,
                      grad_norm=grad_norm, tokens=n_tokens, trained_tokens=n_global,
                      tokens_per_s=n_tokens / dt,
                      **device_stats(device, step_flops(model.args, lengths) / dt / world_size))
        if rank == 0:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix(epoch=f"{step / batches.steps_per_epoch:.2f}", loss=f"{loss:.3f}",
                            lr=f"{lr:.2e}", tok_s=f"{n_tokens / dt:,.0f}")
            bar.update(1)

        end_of_epoch = step % batches.steps_per_epoch == 0
        if end_of_epoch:
            epoch = step // batches.steps_per_epoch
            if dev_set is not None:
                loss_dev = dev_loss(model, dev_set.examples, cfg.max_tokens, device, rank, world_size)[0]
                if rank == 0:
                    metrics.write(json.dumps(dict(step=step, epoch=epoch, dev_loss=loss_dev)) + "\n")
                    metrics.flush()
                    bar.write(f"epoch {epoch}: dev loss {loss_dev:.4f}, perplexity {math.exp(loss_dev):.2f}")
            save(out / f"epoch-{epoch:02d}", step, batches, cfg, ckpt_args)
        elif cfg.save_every and step % cfg.save_every == 0:
            save(out / f"step-{step:06d}", step, batches, cfg, ckpt_args)
        signalled = stop.agreed(device)
        if signalled or step == cfg.stop_after:
            if not end_of_epoch:
                save(out / f"step-{step:06d}", step, batches, cfg, ckpt_args)
            if rank == 0:
                why = "a signal" if signalled else "--stop_after"
                bar.write(f"stopped by {why} at step {step}; continue with --resume auto")
            break
    bar.close()


# What fixes the data order and the learning-rate schedule: a resume must not change them.
# ---- command line ----

def check_choices(cfg: TrainConfig):
    """Every option among its choices and in its range (the annotations of TrainConfig, checked by
    cli.check_fields, as parse_config does), and the combinations that cannot run."""
    check_fields(cfg)
    if cfg.step_in_backward == "true" and cfg.grad_clip > 0:
        raise ValueError("--step_in_backward true steps each parameter before the other gradients exist, "
                         "so it cannot clip by the global norm: drop --grad_clip or use --step_in_backward false")


def print_plan(cfg: TrainConfig):
    """--plan: the memory each GPU and node will need, from the model's shape alone."""
    check_choices(cfg)
    if cfg.init or cfg.preset not in CONFIGS or cfg.preset == "tiny":
        args = model_args(cfg, Tokenizer(Path(cfg.init) / "tokenizer.model" if cfg.init else cfg.tokenizer))
    else:  # a Meta preset: Meta's 32,000 pieces plus EOT
        args = ModelArgs.from_name(cfg.preset, vocab_size=32001)
    global_batch = cfg.global_batch or lima_size_defaults(memory.param_counts(args)[0])["global_batch"]
    base = memory.Options(world_size=cfg.world_size, max_tokens=cfg.max_tokens, ac=cfg.ac,
                          offload=cfg.offload, gpu_gb=cfg.gpu_gb,
                          compute_bytes=resolve_dtype(cfg.dtype, "cuda").itemsize)  # planned GPUs
    options = memory.candidates(base, cfg.weights, cfg.step_in_backward, global_batch, cfg.max_len,
                                cfg.grad_clip > 0)
    print(memory.format_choice(args, options))


def main(argv):
    try:
        cfg, given = parse_config(TrainConfig, argv)
        if cfg.init and (ignored := [name for name in ("preset", "tokenizer") if name in given]):
            if "init" not in given:
                raise ValueError(f"--{ignored[0]} is for a model from random weights, but --init defaults "
                                 f"to the demo's base ({cfg.init}): add --init \"\"")
            raise ValueError(f"--{ignored[0]} is for a model from random weights: --init {cfg.init} "
                             f"brings its own shape (params.json) and tokenizer.model")
        if cfg.plan:
            return print_plan(cfg)
        args = model_args(cfg, Tokenizer(Path(cfg.init) / "tokenizer.model" if cfg.init else cfg.tokenizer))
        cfg, changed = toy_overrides(cfg, args, given)
        if changed and os.environ.get("RANK", "0") == "0":
            print(f"a model of {memory.param_counts(args)[0] / 1e6:.1f}M parameters, not LIMA's 7B to 65B: "
                  + ", ".join(f"--{k} {v}" for k, v in changed.items())
                  + " instead of the recipe's (train.py TOY says why; set them to choose)")
        check_choices(cfg)  # before anything is loaded
        train(cfg)
        shutdown_distributed()
    except (DataError, FileNotFoundError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")  # one line, exit status 1; a NaN leaves the last checkpoint alone


if __name__ == "__main__":
    main(sys.argv[1:])
