"""
Training speed on the CPU in trained tokens per second (targets that are not IGNORE: the answers),
train.py's own path against Hugging Face transformers' LlamaForCausalLM, side by side in one run.

    pip install -r bench/requirements.txt            # transformers: for this comparison only
    python bench/bench_train.py                      # tiny shape, every arm, 2 timed steps
    python bench/bench_train.py --models 100m --steps 1 --arms ours-none,ours-full,hf-b4,hf-b1,hf-packed,ours2-none
    python bench/bench_train.py --profile true       # where a micro-step's time goes, ours and HF
    python bench/bench_train.py --help

Both sides: the same shape (bench/common.py MODELS), the same weights (ours copied into HF's model,
q/k rows permuted as convert.py does; logits compared before timing), float32, the same global
batches of 32 examples (data.Batches, epoch 0, steps 0 .. --steps-1 of the seeded order), the same
loss (summed cross-entropy over answer tokens, divided by the global count of trained tokens: ours
by train.loss_sum, which forms the logits a chunk at a time; HF's from its full logits by
F.cross_entropy, as LlamaForCausalLM's own loss does), a gradient norm, and an AdamW step.
Residual dropout is 0 on our side, as HF's LLaMA has none. Before the timed steps each arm runs its largest micro-step of the first batch once,
untimed (allocation, first-call costs); every arm is a fresh process, so its peak resident memory (VmHWM) is its own.

Arms:
    ours-none, ours-full   train.py's path: build_model (meta device, activation checkpointing off
                           or full, FSDP2 on a process group of one), data.py's packed rows of at
                           most 4,096 tokens with per-conversation attention, run_micro_steps.
    ours2-none, ours2-full the same on 2 processes (torchrun, gloo), same global batch. This machine
                           has 2 cores: the two ranks share them (one thread each) instead of adding any.
    hf-bN                  the usual way: the batch in random order, micro-batches of N examples
                           padded to the longest, attention_mask, gradient accumulation to 32,
                           attn_implementation="sdpa"; hf-bN-ckpt adds HF's gradient checkpointing.
    hf-b1                  one example per micro-batch: no padding, no mask.
    hf-packed              HF's padding-free input: the same packed rows as ours, position_ids
                           restarting at 0 in each conversation and no attention_mask, from which
                           transformers (masking_utils.find_packed_sequence_indices) builds a
                           block-diagonal causal mask for SDPA. The check below shows it attends
                           within each conversation only; without position_ids it would silently
                           attend across them.

The data: shared/data/lima/train.jsonl with Meta's tokenizer when both are there (read in place,
never copied); else --synthetic: 1,029 conversations with lognormal lengths fitted to that set
(median 488, mean 713 tokens), clipped to 29 .. 3,921 and trimmed at 2,048, random token ids, the
first 9.1% of each conversation's targets masked as prompt (90.9% of LIMA's positions are trained).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import train  # noqa: E402
from cli import parse_config  # noqa: E402
from common import (LIMA_DATA, LLAMA_TOKENIZER, MODELS, OthersCPU, hf_llama, machine,  # noqa: E402
                    markdown, peak_rss_gb, record, wait_quiet)
from data import IGNORE, Batches, Tokenizer, collate, load_dataset  # noqa: E402


@dataclass
class BenchConfig:
    models: str = "tiny"  # comma-separated names from bench/common.py MODELS: tiny, 100m
    arms: str = "ours-none,ours-full,ours2-none,ours2-full,hf-b4,hf-b8,hf-b4-ckpt,hf-b1,hf-packed"  # see above
    steps: int = 2  # timed optimizer steps per arm (epoch 0, steps 0, 1, ...)
    global_batch: int = 32  # examples per optimizer step: LIMA's for 65B
    max_len: int = 2048  # LIMA's trimming
    max_tokens: int = 4096  # our packed row, train.py's default
    data: str = str(LIMA_DATA)
    tokenizer: str = str(LLAMA_TOKENIZER)
    synthetic: bool = False  # use the synthetic set even if the real one is there
    check: bool = True  # compare logits (ours, HF padded, HF packed) before timing
    profile: bool = False  # only profile one micro-step of ours and of hf-b4, and print the top ops
    max_others: float = 0.05  # rerun an arm once if other processes took more of the CPUs than this
    results: str = "bench/results.md"  # relative to the repository; the table is appended; "" to skip
    worker: str = ""  # internal: run one arm in this process and write its result to --out
    out: str = ""  # internal


# ---- the data ----

def examples(cfg: BenchConfig) -> tuple[list[dict], str]:
    """Tokenized training examples (data.py's format), and where they came from."""
    if not cfg.synthetic and Path(cfg.data).is_file() and Path(cfg.tokenizer).is_file():
        ds = load_dataset(cfg.data, Tokenizer(cfg.tokenizer), cfg.max_len, verbose=False)
        return ds.examples, f"{cfg.data} with {cfg.tokenizer}"
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(488), 0.87, 1029), 29, 3921).astype(int)
    out = []
    for n in np.minimum(lengths, cfg.max_len + 1) - 1:  # tokens = ids[:-1]
        tokens = rng.integers(3, 32000, n).tolist()
        prompt = int(0.091 * n)
        targets = [IGNORE] * prompt + tokens[prompt + 1:] + [2]
        out.append(dict(tokens=tokens, targets=targets, n_trained=n - prompt, n_dropped=0))
    return out, "synthetic LIMA-like lengths (see the docstring)"


def padded(exs: list[dict], idxs: list[int]) -> dict:
    """The usual micro-batch: right-padded to the longest, with an attention_mask."""
    longest = max(len(exs[i]["tokens"]) for i in idxs)
    tokens = torch.zeros(len(idxs), longest, dtype=torch.long)
    targets = torch.full((len(idxs), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(idxs), longest, dtype=torch.long)
    for r, i in enumerate(idxs):
        n = len(exs[i]["tokens"])
        tokens[r, :n], targets[r, :n], mask[r, :n] = torch.tensor(exs[i]["tokens"]), torch.tensor(exs[i]["targets"]), 1
    return dict(tokens=tokens, targets=targets, mask=mask)


# ---- one arm, in its own process ----

def train_config(cfg: BenchConfig, ac: str) -> train.TrainConfig:
    return train.TrainConfig(init="", ac=ac, max_len=cfg.max_len, max_tokens=cfg.max_tokens,
                             global_batch=cfg.global_batch, resid_dropout=0.0, dtype="fp32")


def run_ours(cfg: BenchConfig, args, exs, ac: str) -> dict:
    """train.py's step, as in train.train: packing, micro-steps, all-reduce, grad norm, AdamW."""
    rank, world_size, device = train.setup_distributed()
    tcfg = train_config(cfg, ac)
    model = train.build_model(tcfg, args, device)
    optimizer = train.build_optimizer(model, tcfg)
    batches = Batches([len(e["tokens"]) for e in exs], cfg.global_batch, world_size, cfg.max_tokens)
    model.train()
    warm = batches.rows(0, 0)[rank][:1]  # the largest row of the first batch: allocates the most
    train.run_micro_steps(model, exs, warm, 1, device, world_size)
    optimizer.zero_grad(set_to_none=True)
    times, trained, positions = [], 0, 0
    for step in range(cfg.steps):
        dist_barrier()
        t0 = time.perf_counter()
        idxs = batches.global_batch_indices(0, step)
        packing = batches.rows(0, step)
        n_global = sum(exs[i]["n_trained"] for i in idxs)
        loss = train.run_micro_steps(model, exs, packing[rank], n_global, device, world_size)
        torch.distributed.all_reduce(loss)
        loss = loss.item() / n_global
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        trained += n_global
        positions += sum(len(exs[i]["tokens"]) for i in idxs)
    result = dict(times=times, trained=trained, positions=positions, computed=positions, loss=loss,
                  micro_steps=len(packing[rank]), rank=rank, peak_rss_gb=peak_rss_gb())
    torch.distributed.destroy_process_group()
    return result


def dist_barrier():
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def hf_micro_batches(cfg: BenchConfig, arm: str, exs, batches: Batches, step: int) -> list[dict]:
    """The HF arm's micro-batches of one global batch: padded (hf-bN) or packed (hf-packed)."""
    if arm == "hf-packed":
        return [dict(collate(exs, row), packed=True) for row in batches.rows(0, step)[0]]
    b = int(arm.split("-")[1][1:])
    idxs = batches.global_batch_indices(0, step)
    order = np.random.default_rng([1, step]).permutation(idxs).tolist()  # the usual random order
    return [padded(exs, order[j:j + b]) for j in range(0, len(order), b)]


def hf_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """HF's way to the summed loss: cross-entropy of the whole (B, T, V) logits, in float32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def hf_forward(model, mb: dict) -> torch.Tensor:
    """Logits of one micro-batch. use_cache=False: with the config's default (True, in training
    too) the model builds a KV cache it never needs, and with a cache transformers skips the
    detection of packed rows, so a packed row attends across its conversations (see run_check)."""
    if mb.get("packed"):  # no attention_mask: transformers infers the packing from position_ids
        return model(input_ids=mb["tokens"], position_ids=mb["positions"], use_cache=False).logits
    return model(input_ids=mb["tokens"], attention_mask=mb["mask"], use_cache=False).logits


def our_weights(cfg: BenchConfig, args) -> dict:
    """The weights ours-none starts from (train.build_model's seeded init), whole, in our names."""
    _, _, device = train.setup_distributed()
    model = train.build_model(train_config(cfg, "none"), args, device)
    state = {k: v.full_tensor() for k, v in model.state_dict().items()}
    torch.distributed.destroy_process_group()
    return state


def run_hf(cfg: BenchConfig, args, exs, arm: str) -> dict:
    """HF's step: micro-batches, the same summed loss over the global count, grad norm, AdamW."""
    model = hf_llama(args, our_weights(cfg, args))
    if arm.endswith("-ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        arm = arm.removesuffix("-ckpt")
    model.train()
    tcfg = train_config(cfg, "none")
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": tcfg.weight_decay},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
    batches = Batches([len(e["tokens"]) for e in exs], cfg.global_batch, 1, cfg.max_tokens)
    warm = max(hf_micro_batches(cfg, arm, exs, batches, 0), key=lambda mb: mb["tokens"].numel())
    hf_loss_sum(hf_forward(model, warm), warm["targets"]).backward()  # the largest: allocates the most
    optimizer.zero_grad(set_to_none=True)
    times, trained, positions, computed = [], 0, 0, 0
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        idxs = batches.global_batch_indices(0, step)
        n_global = sum(exs[i]["n_trained"] for i in idxs)
        total = torch.zeros(())
        mbs = hf_micro_batches(cfg, arm, exs, batches, step)
        for mb in mbs:
            loss = hf_loss_sum(hf_forward(model, mb), mb["targets"])
            (loss / n_global).backward()
            total += loss.detach()
            computed += mb["tokens"].numel()
        loss = total.item() / n_global
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        trained += n_global
        positions += sum(len(exs[i]["tokens"]) for i in idxs)
    return dict(times=times, trained=trained, positions=positions, computed=computed, loss=loss,
                micro_steps=len(mbs), rank=0, peak_rss_gb=peak_rss_gb())


@torch.no_grad()
def run_check(cfg: BenchConfig, args, exs) -> dict:
    """Max |logit difference| between ours (train.py's model) and HF's three ways of feeding it."""
    rank, world_size, device = train.setup_distributed()
    ours = train.build_model(train_config(cfg, "none"), args, device).eval()
    hf = hf_llama(args, {k: v.full_tensor() for k, v in ours.state_dict().items()}).eval()
    batches = Batches([len(e["tokens"]) for e in exs], cfg.global_batch, 1, cfg.max_tokens)
    row = min(batches.rows(0, 0)[0], key=len)[:4]  # a few conversations, to keep it quick
    packed = collate(exs, row)
    ref = ours(packed["tokens"], packed["positions"], packed["doc_lens"])[0]  # (L, V)
    alone = torch.cat([hf(torch.tensor([exs[i]["tokens"]])).logits[0] for i in row])
    pad = padded(exs, row)
    hf_pad = hf(input_ids=pad["tokens"], attention_mask=pad["mask"]).logits
    hf_pad = torch.cat([hf_pad[r, :len(exs[i]["tokens"])] for r, i in enumerate(row)])
    hf_packed = hf_forward(hf, dict(packed, packed=True))[0]
    # The same call with the config's use_cache (True): a cache turns off the packing detection.
    hf_default = hf(input_ids=packed["tokens"], position_ids=packed["positions"]).logits[0]
    torch.distributed.destroy_process_group()
    diff = lambda a: (a - ref).abs().max().item()  # noqa: E731
    return dict(lengths=[len(exs[i]["tokens"]) for i in row], scale=ref.abs().max().item(),
                hf_alone=diff(alone), hf_padded=diff(hf_pad), hf_packed=diff(hf_packed), hf_default=diff(hf_default))


def run_profile(cfg: BenchConfig, args, exs) -> dict:
    """Self CPU time by op over one micro-step of ours (the first packed row) and of hf-b4."""
    from torch.profiler import ProfilerActivity, profile
    rank, world_size, device = train.setup_distributed()
    model = train.build_model(train_config(cfg, "none"), args, device)
    batches = Batches([len(e["tokens"]) for e in exs], cfg.global_batch, 1, cfg.max_tokens)
    idxs = batches.global_batch_indices(0, 0)
    n = sum(exs[i]["n_trained"] for i in idxs)
    rows = batches.rows(0, 0)[0][:1]
    train.run_micro_steps(model, exs, rows, n, device, 1)  # warm-up
    out = {}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train.run_micro_steps(model, exs, rows, n, device, 1)
    out["ours"] = top_ops(prof, sum(len(exs[i]["tokens"]) for i in rows[0]))
    torch.distributed.destroy_process_group()
    hf = hf_llama(args, our_weights(cfg, args)).train()
    mb = hf_micro_batches(cfg, "hf-b4", exs, batches, 0)[0]
    hf_loss_sum(hf_forward(hf, mb), mb["targets"]).backward()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (hf_loss_sum(hf_forward(hf, mb), mb["targets"]) / n).backward()
    out["hf-b4"] = top_ops(prof, int(mb["mask"].sum()))
    return out


def top_ops(prof, real_tokens: int, k: int = 8) -> dict:
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return dict(tokens=real_tokens, total_s=total / 1e6,
                ops=[(e.key, e.self_cpu_time_total / 1e6, e.count) for e in events[:k]])


def worker(cfg: BenchConfig):
    args = MODELS[cfg.models]
    exs, _ = examples(cfg)
    if cfg.worker == "check":
        result = run_check(cfg, args, exs)
    elif cfg.worker == "profile":
        result = run_profile(cfg, args, exs)
    elif cfg.worker.startswith("ours"):
        result = run_ours(cfg, args, exs, cfg.worker.split("-")[1])
    else:
        result = run_hf(cfg, args, exs, cfg.worker)
    Path(f"{cfg.out}.{result.get('rank', 0)}").write_text(json.dumps(result))


# ---- the orchestrator: one process per arm, the table ----

def spawn(cfg: BenchConfig, model: str, arm: str) -> tuple[list[dict], float]:
    """Run one arm in a fresh process (2 under torchrun for ours2-*); its results, others' CPU share."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result"
        argv = [a for k, v in asdict(cfg).items() if k not in ("worker", "out", "models", "arms", "results")
                for a in (f"--{k}", str(v))]
        argv += ["--models", model, "--worker", arm.replace("ours2", "ours"), "--out", str(out)]
        script = [str(ROOT / "bench/bench_train.py"), *argv]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]
               if arm.startswith("ours2") else [sys.executable, *script])
        env = {**os.environ, "MASTER_PORT": str(29500 + os.getpid() % 20000)}
        with OthersCPU() as others:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{model} {arm} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
        results = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("result.*"))]
    return results, others.share


def measure(cfg: BenchConfig, model: str, arm: str) -> dict:
    results, others = spawn(cfg, model, arm)
    if others > cfg.max_others:  # someone else used the CPUs: once more, after waiting for quiet
        print(f"  {model} {arm}: other processes took {others:.0%} of the CPUs; waiting, then rerunning",
              file=sys.stderr)
        wait_idle()
        results, others = spawn(cfg, model, arm)
    r = results[0]
    seconds = sum(r["times"])
    return dict(model=model, arm=arm, trained_tok_s=r["trained"] / seconds, s_step=statistics.median(r["times"]),
                padding=1 - r["positions"] / r["computed"], micro_steps=r["micro_steps"], loss=r["loss"],
                rss=max(x["peak_rss_gb"] for x in results), others=others)


def wait_idle(max_wait_s: float = 300) -> float:
    """Wait until other processes use under 10% of the CPUs over 5 s (we are idle meanwhile)."""
    from common import busy_cpu_s
    t0 = time.time()
    while True:
        b0 = busy_cpu_s()
        time.sleep(5)
        share = (busy_cpu_s() - b0) / (5 * os.cpu_count())
        if share < 0.1 or time.time() - t0 > max_wait_s:
            return share


def main(argv):
    cfg = parse_config(BenchConfig, argv)[0]
    if cfg.worker:
        return worker(cfg)
    models, arms = cfg.models.split(","), cfg.arms.split(",")
    _, source = examples(cfg)
    notes = []
    wait_idle()
    load_before = wait_quiet()  # the 1-minute load average too, which still counts a run just ended
    if cfg.check or cfg.profile:
        for model in models:
            kind = "profile" if cfg.profile else "check"
            (r,), others = spawn(cfg, model, kind)
            if cfg.profile:
                for side, p in r.items():
                    notes.append(f"{model}, {side}: one micro-step of {p['tokens']} real tokens, {p['total_s']:.2f} s "
                                 f"of self CPU time; top ops: " + ", ".join(
                                     f"{name} {s / p['total_s']:.0%} ({n})" for name, s, n in p["ops"]))
                continue
            notes.append(
                f"{model}: max |logit difference| against ours on a packed row of {len(r['lengths'])} "
                f"conversations ({'+'.join(map(str, r['lengths']))} tokens; logits up to {r['scale']:.2f}): "
                f"HF one at a time {r['hf_alone']:.1e}, HF padded with attention_mask {r['hf_padded']:.1e}, "
                f"HF packed with position_ids and use_cache=False {r['hf_packed']:.1e}; the same packed "
                f"call with the config's default use_cache=True {r['hf_default']:.1e}: transformers skips "
                f"its packed-row detection when a cache exists (masking_utils._preprocess_mask_arguments), "
                f"so the row attends across its conversations, silently (wrong).")
            if max(r["hf_alone"], r["hf_padded"], r["hf_packed"]) > 1e-3:
                raise SystemExit("\n".join(notes) + "\nlogits disagree: not timing")
    rows = []
    if not cfg.profile:
        for model in models:
            for arm in arms:
                rows.append(measure(cfg, model, arm))
                print(rows[-1], file=sys.stderr)
    header = ["model", "arm", "trained tok/s", "s/step (median)", "padding", "micro-steps/step", "loss",
              "peak RSS GB/rank", "x HF usual (b4)", "others' CPU"]
    table = []
    for r in rows:
        usual = next((u for u in rows if u["model"] == r["model"] and u["arm"] == "hf-b4"), None)
        table.append([r["model"], r["arm"], f"{r['trained_tok_s']:,.0f}", f"{r['s_step']:.1f}", f"{r['padding']:.0%}",
                      r["micro_steps"], f"{r['loss']:.4f}", f"{r['rss']:.2f}",
                      f"{r['trained_tok_s'] / usual['trained_tok_s']:.2f}" if usual else "-", f"{r['others']:.0%}"])
    title = (f"## {datetime.now():%Y-%m-%d %H:%M} train{' (profile)' if cfg.profile else ''}: "
             f"{machine(load_before)}, transformers {transformers_version()}, fp32, {source}")
    notes.insert(0, f"Global batch {cfg.global_batch}, {cfg.steps} timed step(s) per arm (epoch 0 from step 0) after "
                    f"one untimed micro-step (the largest of the first batch); packed rows of at most {cfg.max_tokens} tokens; texts trimmed at "
                    f"{cfg.max_len}. padding: share of computed positions that are padding. loss: the last "
                    f"step's (the same weights and batches give the same loss). others' CPU: share of the "
                    f"machine used by other processes during the arm.")
    command = f"    python bench/bench_train.py {' '.join(argv)}".rstrip()
    text = "\n".join([title, "", command, "", *(markdown(header, table) + [""] if rows else []), *notes])
    record(text, cfg.results)


def transformers_version() -> str:
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return "(not installed)"


if __name__ == "__main__":
    main(sys.argv[1:])
