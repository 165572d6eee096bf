"""
The memory plan: what each GPU and each node's CPU will hold during training, before anything runs.

    python train.py --plan true --init ckpt/llama-65b --world_size 16     # a converted model
    python train.py --plan true --preset llama-65b --world_size 8 --offload true
    python memory.py                                                      # 65B on 1, 2 and 4 nodes

Everything here is arithmetic on the model's shape; nothing is allocated. tests/test_memory.py
checks the parameter, gradient and optimizer bytes against closed forms and against what a small
FSDP run really allocates, and the activation estimate against the tensors autograd really saves.
"""

from dataclasses import dataclass

from model import ModelArgs

GB = 1e9


@dataclass
class Options:
    world_size: int = 8
    gpus_per_node: int = 8
    max_tokens: int = 4096  # tokens in one packed row: the micro-step
    ac: str = "full"  # activation checkpointing: full, selective or none
    offload: bool = False  # FSDP CPU offload of parameters, gradients and optimizer state
    weights: str = "fp32"  # master weights: fp32 (AdamW state fp32), or bf16 (see optim.py)
    compute_bytes: int = 2  # bf16 compute on GPU
    gpu_gb: float = 80.0


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
    P, P_block, P_root = param_counts(args)
    W, T, cb = o.world_size, o.max_tokens, o.compute_bytes
    wb = 4 if o.weights == "fp32" else 2
    # Sharded state: every rank holds 1/W of each tensor (FSDP2 pads dim 0 to a multiple of W;
    # the padding is at most W-1 rows per tensor, which this ignores).
    params, grads = P * wb / W, P * wb / W
    # AdamW's two moments, fp32; AdamWBF16 keeps them in bf16 plus a 2-byte compensation term.
    optim = P * 8 / W if o.weights == "fp32" else P * 6 / W
    # Gathered for compute: the running block and the one prefetched, in the compute dtype; in
    # backward also that block's unsharded gradient (reduced in fp32), and the root's weights
    # (embeddings and output, gathered around the first and last block).
    in_flight = 2 * P_block * cb + P_block * 4 + P_root * cb + P_root * 4
    per_token = activation_bytes_per_token(args, cb)
    if o.ac == "none":
        activations = args.n_layers * T * per_token["none"]
    else:
        activations = args.n_layers * T * per_token[o.ac] + T * per_token["block"]
    # The loss (train.ChunkedOutputLoss): one chunk of float32 logits, which becomes their
    # gradient, and its compute-dtype copy; the output weight's float32 gradient and its cast;
    # the gradient of the hidden states.
    chunk_bytes = 32 * 2**20  # train.ChunkedOutputLoss.CHUNK_BYTES
    logits = chunk_bytes * (1 + cb / 4) + args.vocab_size * args.dim * (4 + cb) + T * args.dim * cb
    gpu = dict(params=params, grads=grads, optim=optim, in_flight=in_flight,
               activations=activations, logits=logits)
    cpu_per_node = 0.0
    if o.offload:  # sharded state lives in host memory; the GPU keeps only what is in flight
        cpu_per_node = (params + grads + optim) * min(o.gpus_per_node, W)  # ranks on a node
        gpu.update(params=0.0, grads=0.0, optim=0.0)
    total = sum(gpu.values())
    return dict(gpu=gpu, gpu_total=total, cpu_per_node=cpu_per_node, fits=total <= o.gpu_gb * GB)


def smallest_world_size(args: ModelArgs, o: Options) -> int | None:
    """The fewest GPUs (whole nodes past one node) on which the plan fits, up to 1,024."""
    sizes = [w for w in (1, 2, 4) if w < o.gpus_per_node] + list(range(o.gpus_per_node, 1025, o.gpus_per_node))
    for w in sizes:
        if plan(args, Options(**{**o.__dict__, "world_size": w}))["fits"]:
            return w
    return None


def format_plan(args: ModelArgs, o: Options) -> str:
    p = plan(args, o)
    P = param_counts(args)[0]
    lines = [f"{P / 1e9:.2f}B parameters, {o.world_size} GPU(s), {o.max_tokens} tokens per micro-step, "
             f"ac={o.ac}, weights={o.weights}, offload={o.offload}",
             f"{'per GPU':<34}{'GB':>8}"]
    names = dict(params="sharded parameters", grads="sharded gradients", optim="optimizer state",
                 in_flight="unsharded blocks in flight", activations="activations", logits="logits and loss")
    for k, v in p["gpu"].items():
        lines.append(f"  {names[k]:<32}{v / GB:>8.1f}")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"  {'total':<32}{p['gpu_total'] / GB:>8.1f}   {verdict} in {o.gpu_gb:.0f} GB of GPU memory")
    if o.offload:
        lines.append(f"  host memory per node (offloaded)  {p['cpu_per_node'] / GB:>8.1f}")
    w = smallest_world_size(args, o)
    lines.append(f"smallest world size that fits the GPUs: {w if w else 'none up to 1,024'}"
                 + (" (the host memory above is not checked)" if o.offload else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    args = ModelArgs.from_name("llama-65b", vocab_size=32001)
    for world, weights, offload in [(8, "fp32", False), (8, "fp32", True), (8, "bf16", True),
                                    (16, "fp32", False), (16, "bf16", False), (32, "fp32", False)]:
        print(format_plan(args, Options(world_size=world, weights=weights, offload=offload)), "\n")
