"""Run by tests under torchrun: one FSDP training step's gradients and memory, written by rank 0.

    torchrun --standalone --nproc_per_node 2 tests/fsdp_worker.py IN_DIR OUT.pt MAX_TOKENS AC [WEIGHTS [IN_BACKWARD]]

IN_DIR holds model.pth + params.json (the starting weights) and examples.pt (a list of
{"tokens", "targets"} dicts). OUT.pt receives the full gradients (gathered only here, for the
comparison; none when stepped in backward, which frees them), the global loss, and per-rank bytes
of parameters, gradients (in backward: the most held at any moment) and optimizer state.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from data import IGNORE, pack_batch  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402


def local_bytes(tensors) -> int:
    """Bytes this rank really holds: the local shard of each DTensor."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors' local parts (FSDP's reduce buffers)."""
    seen = {}
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class MeasuredStepInBackward(train.StepInBackward):
    """train.StepInBackward, noting the gradient bytes alive each time a gradient arrives."""
    most = 0

    def hook(self, p):
        self.most = max(self.most, storage_bytes(q.grad for q in self.params if q.grad is not None))
        super().hook(p)


def main(in_dir, out_file, max_tokens, ac, weights="fp32", in_backward="false"):
    rank, world_size, device = train.setup_distributed()
    in_dir = Path(in_dir)
    args = ModelArgs.from_params(in_dir / "params.json")
    with torch.device("meta"):
        model = Transformer(args)
    cfg = train.TrainConfig(ac=ac, max_tokens=int(max_tokens), weights=weights)
    if weights != "fp32":
        model.to(torch.bfloat16)
    train.apply_ac(model, cfg.ac)
    train.apply_fsdp(model, cfg, torch.float32)
    model.to_empty(device=device)
    model.init_buffers()
    train.load_pretrained_(model, in_dir)
    optimizer = train.build_optimizer(model, cfg)

    examples = torch.load(in_dir / "examples.pt", weights_only=True)
    packing = pack_batch([len(e["tokens"]) for e in examples], world_size, cfg.max_tokens)
    n_global = sum(sum(t != IGNORE for t in e["targets"]) for e in examples)
    if in_backward == "true":
        assert len(packing[rank]) == 1
        stepper = MeasuredStepInBackward(model, optimizer, device)
        stepper.params = list(model.parameters())
        loss = train.row_loss(model, examples, packing[rank][0], device)
        (loss * world_size / n_global).backward()  # steps every parameter, creating AdamW's state
        loss = loss.detach()
        grad_bytes = stepper.most
    else:
        loss = train.run_micro_steps(model, examples, packing[rank], n_global, device, world_size)
        grad_bytes = local_bytes(p.grad for p in model.parameters())
        optimizer.step()  # creates AdamW's state, so that its bytes can be counted
    torch.distributed.all_reduce(loss)
    sizes = torch.tensor([local_bytes(model.parameters()), grad_bytes,
                          local_bytes(t for s in optimizer.state.values() for t in s.values()
                                      if torch.is_tensor(t) and t.dim() > 0)])
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size)]
    torch.distributed.all_gather(all_sizes, sizes)
    grads = {name.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor()
             for name, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save(dict(grads=grads, loss=loss.item() / n_global, micro_steps=len(packing[0]),
                        bytes=torch.stack(all_sizes)), out_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
    train.shutdown_distributed()  # once main's model and mesh are gone (a gloo abort at exit otherwise)
