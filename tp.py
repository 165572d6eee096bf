"""
Tensor parallelism for generation, applied from outside the model (as gpt-fast does).

LLaMA-65B is 130 GB in bf16 and one GPU holds 80; under `torchrun --nproc_per_node 8` each rank
keeps 1/8 of every block (Megatron-LM's split, Shoeybi et al. 2019):
    attention     wq, wk, wv by output rows (whole heads)  ->  wo by input columns
    feed-forward  w1, w3 by output rows (hidden columns)   ->  w2 by input columns
Each rank then computes its heads (hidden units) end to end with no communication, and its wo
(w2) gives a partial sum of the block's output: one all-reduce after attention and one after the
feed-forward make it whole. Embeddings, norms and the output layer stay whole on every rank
(2% of 65B), so every rank holds the full logits and samples the same token.

model.py needs no change: attention reads its head counts from the weights' shapes (view with
-1) and setup_cache sizes each rank's KV cache from its slice of wk.
"""

import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join torchrun's process group if there is one: NCCL on GPUs, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), world_size, dev


def shard_linear_(linear: nn.Linear, dim: int, rank: int, world_size: int):
    """Keep this rank's slice of a Linear's weight: dim 0 splits the outputs, dim 1 the inputs."""
    weight = linear.weight
    if weight.size(dim) % world_size:
        raise ValueError(f"a weight of shape {tuple(weight.shape)} does not split evenly over "
                         f"{world_size} ranks along dim {dim}")
    # A view of the memory-mapped file: only this slice is read when the weights move to the GPU.
    shard = weight.chunk(world_size, dim=dim)[rank]
    linear.weight = nn.Parameter(shard, requires_grad=False)
    linear.out_features, linear.in_features = shard.shape


def all_reduce_output(module, inputs, output):
    """Forward hook: a rank's wo (w2) saw only its heads (hidden units); sum the parts over ranks."""
    # The functional all-reduce, unlike dist.all_reduce, traces into a compiled decode step.
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def apply_tp(model: nn.Module, rank: int, world_size: int):
    """Shard every block of a Transformer in place over world_size ranks; add the two all-reduces."""
    args = model.args
    for name, n in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads),
                    ("the feed-forward width", args.hidden_dim)):
        if n % world_size:
            raise ValueError(f"{name} ({n}) does not divide over {world_size} ranks")
    # Contiguous slices keep grouped-query attention intact: rank r's query heads are exactly the
    # ones served by rank r's kv heads, since both are the r-th 1/world_size of their heads.
    for layer in model.layers:
        attention, ffn = layer.attention, layer.feed_forward
        for linear in (attention.wq, attention.wk, attention.wv, ffn.w1, ffn.w3):
            shard_linear_(linear, 0, rank, world_size)
        for linear in (attention.wo, ffn.w2):
            shard_linear_(linear, 1, rank, world_size)
        attention.register_forward_hook(all_reduce_output)
        ffn.register_forward_hook(all_reduce_output)


def agree(tokens: torch.Tensor) -> torch.Tensor:
    """Every rank takes rank 0's tokens (B,), so no rank can stop or branch alone and hang the rest.

    The all-reduced logits are identical on every rank and so is the seeded noise, so this only
    turns an assumption into a guarantee; one tiny broadcast per token next to 2 all-reduces a layer.
    """
    if dist.is_initialized():
        dist.broadcast(tokens, src=0)
    return tokens


def from_rank0(obj):
    """Rank 0's Python object on every rank (a line typed into the chat, the prompts still to do)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
