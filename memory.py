"""
The memory plan: what each GPU and each node's CPU will hold during training, before anything runs.

    python train.py --plan true --init ckpt/llama-65b --world_size 16     # a converted model
    python train.py --plan true --preset llama-65b --world_size 8 --offload true
    python memory.py                                                      # 65B on 1, 2 and 4 nodes

Everything here is arithmetic on the model's shape; nothing is allocated. tests/test_memory.py
checks the parameter, gradient and optimizer bytes against closed forms and against what a small
FSDP run really allocates, and the activation estimate against the tensors autograd really saves.
"""

import math
import os
from dataclasses import dataclass

from model import ModelArgs

GB = 1e9


# What each --weights mode stores per parameter (optim.py): weight, gradient, optimizer state.
WEIGHT_BYTES = dict(fp32=4, bf16_kahan=2, bf16_sr=2)
OPTIM_BYTES = dict(fp32=8, bf16_kahan=6, bf16_sr=4)  # two moments (+ Kahan's int16 compensation)
# The modes by precision, best first: float32 AdamW; float32-exact weights with bf16 moments;
# unbiased but noisy stochastic rounding.
WEIGHTS = ("fp32", "bf16_kahan", "bf16_sr")
LOSS_CHUNK_BYTES = 32 * 2**20  # float32 logits per chunk of train.ChunkedOutputLoss (about 256 tokens of 32,001 pieces)
PROCESS_GB = 1.0  # host memory of one rank besides the model: Python, torch, the data (0.3 GB after imports)


@dataclass
class Options:
    world_size: int = 8
    gpus_per_node: int = 8
    max_tokens: int = 4096  # tokens in one packed row: the micro-step
    ac: str = "full"  # activation checkpointing: full, selective or none
    offload: bool = False  # FSDP CPU offload of parameters, gradients and optimizer state
    weights: str = "fp32"  # fp32 (AdamW state fp32), bf16_kahan or bf16_sr (see optim.py)
    step_in_backward: bool = False  # each parameter stepped as soon as its gradient is reduced
    compute_bytes: int = 2  # bf16 compute on GPU
    gpu_gb: float = 80.0
    host_gb: float = 0.0  # host memory a node can give offloaded state; 0: not checked


def param_counts(args: ModelArgs) -> tuple[int, int, int]:
    """(total, one block, root: embeddings + final norm + output) parameter counts."""
    D, F, V, hd = args.dim, args.hidden_dim, args.vocab_size, args.head_dim
    attention = D * args.n_heads * hd * 2 + D * args.n_kv_heads * hd * 2  # wq, wo; wk, wv
    block = attention + 3 * D * F + 2 * D  # w1, w2, w3; two RMSNorm gains
    root = 2 * V * D + D  # tok_embeddings, output; final norm
    return args.n_layers * block + root, block, root


def activation_bytes_per_token(args: ModelArgs, cb: int) -> dict:
    """Bytes autograd keeps per token: one block, by checkpointing mode; cb: compute dtype bytes.

    A block saves 10 D + 2 Dkv + 4 F elements per token (counted with saved_tensors_hooks in
    tests/test_memory.py): the residual input, the two norms' inputs, scales and outputs, q, the
    rotated k and v, the attention output, wo's and w2's outputs, and w1, w3, silu(w1) and their
    product; dropout masks add a byte per element of each branch output.
    """
    D, F, Dkv = args.dim, args.hidden_dim, args.n_kv_heads * args.head_dim
    full_block = cb * (10 * D + 2 * Dkv + 4 * F) + 2 * D
    return dict(
        none=full_block,  # every block keeps everything
        full=cb * D,  # only each block's input; one block's internals are rebuilt at a time
        selective=cb * (3 * D + 2 * Dkv + 2 * F),  # outputs of the matmuls and of attention
        block=full_block,  # what one block holds while it is recomputed and backpropagated
    )


def plan(args: ModelArgs, o: Options) -> dict:
    """Bytes per GPU and per node's CPU, item by item. The whole arithmetic of the plan."""
    if o.weights not in WEIGHTS:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHTS)}, not {o.weights!r}")
    P, P_block, P_root = param_counts(args)
    W, T, cb, wb = o.world_size, o.max_tokens, o.compute_bytes, WEIGHT_BYTES[o.weights]
    # Sharded state: every rank holds 1/W of each tensor (FSDP2 pads dim 0 to a multiple of W;
    # the padding is at most W-1 rows per tensor, which this ignores).
    params, optim = P * wb / W, P * OPTIM_BYTES[o.weights] / W
    if o.step_in_backward:
        # Only the gradients FSDP has just reduce-scattered: one block's (or the root's) buffer
        # in the weights' dtype, freed once its parameters are stepped; on a GPU the next
        # block's can already be arriving (2 CPU ranks, which do not overlap, hold one).
        grads = 2 * max(P_block, P_root) * wb / W
    else:
        grads = P * wb / W  # the whole model's, in the weights' dtype, until optimizer.step
    # Gathered for compute: the running block and the one prefetched, in the compute dtype; in
    # backward also that block's unsharded gradient (reduced in fp32), and the root's weights
    # (embeddings and output, gathered around the first and last block).
    in_flight = 2 * P_block * cb + P_block * 4 + P_root * cb + P_root * 4
    # The optimizer steps one tensor at a time (optim.py; torch's AdamW with foreach=False):
    # about six float32 temporaries of this rank's part of the largest tensor.
    largest = max(args.vocab_size * args.dim, args.hidden_dim * args.dim)
    step = 6 * 4 * largest / W
    per_token = activation_bytes_per_token(args, cb)
    if o.ac == "none":
        activations = args.n_layers * T * per_token["none"]
    else:
        activations = args.n_layers * T * per_token[o.ac] + T * per_token["block"]
    # The loss (train.ChunkedOutputLoss): one chunk of float32 logits, which becomes their
    # gradient, and its compute-dtype copy; the output weight's float32 gradient and its cast;
    # the gradient of the hidden states.
    logits = LOSS_CHUNK_BYTES * (1 + cb / 4) + args.vocab_size * args.dim * (4 + cb) + T * args.dim * cb
    gpu = dict(params=params, grads=grads, optim=optim, step=step, in_flight=in_flight,
               activations=activations, logits=logits)
    cpu_per_node = 0.0
    if o.offload:  # sharded state lives in host memory; the GPU keeps only what is in flight
        cpu_per_node = (params + grads + optim + step) * min(o.gpus_per_node, W)  # ranks on a node
        gpu.update(params=0.0, grads=0.0, optim=0.0, step=0.0)
    total = sum(gpu.values())
    host_fits = not o.offload or not o.host_gb or cpu_per_node <= o.host_gb * GB
    return dict(gpu=gpu, gpu_total=total, cpu_per_node=cpu_per_node, fits=total <= o.gpu_gb * GB and host_fits)


def backward_row_tokens(global_batch: int, world_size: int, max_len: int) -> int:
    """--step_in_backward's row: a rank's whole share of a batch, trimmed conversations at most."""
    return math.ceil(global_batch / world_size) * max_len


def candidates(o: Options, weights: str, step_in_backward: str, global_batch: int, max_len: int,
               grad_clip: bool) -> list[Options]:
    """The configurations --weights / --step_in_backward allow ("auto" allows each), most precise
    first: by weights (fp32, bf16_kahan, bf16_sr), then the ordinary step before the one in
    backward, which needs a row of a rank's whole share and cannot clip gradients."""
    found = []
    for w in WEIGHTS if weights == "auto" else [weights]:
        for in_backward in {"auto": [False, True], "true": [True], "false": [False]}[step_in_backward]:
            if in_backward and grad_clip:
                continue
            tokens = o.max_tokens or (backward_row_tokens(global_batch, o.world_size, max_len)
                                      if in_backward else 4096)
            found.append(Options(**{**o.__dict__, "weights": w, "step_in_backward": in_backward,
                                    "max_tokens": tokens}))
    return found


def choose(args: ModelArgs, options: list[Options]) -> tuple[Options | None, list[dict]]:
    """The first (most precise) of the options whose plan fits, or None; and every option's plan."""
    plans = [plan(args, o) for o in options]
    return next((o for o, p in zip(options, plans) if p["fits"]), None), plans


def host_available_gb() -> float:
    """Memory the kernel can give this machine's processes now (MemAvailable), in GB."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB


def smallest_world_size(args: ModelArgs, o: Options) -> int | None:
    """The fewest GPUs (whole nodes past one node) on which the plan fits, up to 1,024."""
    sizes = [w for w in (1, 2, 4) if w < o.gpus_per_node] + list(range(o.gpus_per_node, 1025, o.gpus_per_node))
    for w in sizes:
        if plan(args, Options(**{**o.__dict__, "world_size": w}))["fits"]:
            return w
    return None


def format_plan(args: ModelArgs, o: Options, budget: str = "GPU") -> str:
    p = plan(args, o)
    P = param_counts(args)[0]
    lines = [f"{P / 1e9:.2f}B parameters, {o.world_size} {budget}(s), {o.max_tokens} tokens per micro-step, "
             f"ac={o.ac}, weights={o.weights}, step_in_backward={str(o.step_in_backward).lower()}, "
             f"offload={str(o.offload).lower()}",
             f"{'per ' + budget:<34}{'GB':>8}"]
    names = dict(params="sharded parameters", grads="sharded gradients", optim="optimizer state",
                 step="optimizer step temporaries", in_flight="unsharded blocks in flight",
                 activations="activations", logits="logits and loss")
    for k, v in p["gpu"].items():
        lines.append(f"  {names[k]:<32}{v / GB:>8.1f}")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"  {'total':<32}{p['gpu_total'] / GB:>8.1f}   {verdict} in {o.gpu_gb:.1f} GB")
    if o.offload:
        lines.append(f"  host memory per node (offloaded)  {p['cpu_per_node'] / GB:>8.1f}")
    return "\n".join(lines)


def format_choice(args: ModelArgs, options: list[Options], budget: str = "GPU") -> str:
    """Every allowed configuration with its total, the choice, and the chosen one's plan."""
    chosen, plans = choose(args, options)
    lines = [f"{'weights':<12}{'step_in_backward':<18}{'row tokens':>11}{'GB per ' + budget:>14}"]
    for o, p in zip(options, plans):
        mark = "  <- chosen" if o is chosen else ("  fits" if p["fits"] else "")
        lines.append(f"{o.weights:<12}{str(o.step_in_backward).lower():<18}{o.max_tokens:>11,}"
                     f"{p['gpu_total'] / GB:>14.1f}{mark}")
    shown = chosen or min(zip(options, plans), key=lambda op: op[1]["gpu_total"])[0]
    lines += ["", format_plan(args, shown, budget)]
    if chosen is None:
        w = smallest_world_size(args, shown)
        lines.append(f"nothing fits {shown.gpu_gb:.1f} GB; the smallest world size where the least "
                     f"hungry option fits: {w if w else 'none up to 1,024'}")
    return "\n".join(lines)


if __name__ == "__main__":
    args = ModelArgs.from_name("llama-65b", vocab_size=32001)
    for world in (8, 16, 32):
        o = Options(world_size=world, max_tokens=0)
        print(format_choice(args, candidates(o, "auto", "auto", 32, 2048, grad_clip=False)), "\n")
