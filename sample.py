"""
Answer prompts with a fine-tuned model, decoding as LIMA did: nucleus sampling (p 0.9) at
temperature 0.7, repetition penalty 1.2, at most 2048 tokens in all, stopping at EOT.

--checkpoint is a training checkpoint (out/demo/epoch-15, read straight from its shards) or a
directory holding params.json, model.pth and tokenizer.model: written by convert.py, or exported
from a training checkpoint once, which loads much faster at 65B:
    python checkpoint.py export out/lima-65b/epoch-07 out/lima-e7

After the CPU demo (python train.py):
    python sample.py --checkpoint out/demo/epoch-15 --prompt "How do I make a good cup of tea?"

One answer, streamed as it is written (CPU):
    python sample.py --checkpoint out/lima-e7 --prompt "Write a haiku about the sea."
The same on a GPU, in bf16, with the decode step compiled (the first answer waits for the compiler;
on the CPU too, where batch 1 decodes 1.4-3.6x faster compiled: worth it for a file or a long chat):
    python sample.py --checkpoint out/lima-e7 --prompt "Write a haiku about the sea." --compile
A conversation (line editing and history; a line of \"\"\" begins and ends a message of many lines):
/reset starts a new one, /quit (or Ctrl-D) ends it:
    python sample.py --checkpoint out/lima-e7 --chat
Every prompt of a file (LIMA's test.jsonl layout, or .txt with one prompt per line), --batch_size rows
decoded together, each taking the next prompt as soon as its answer ends (continuous batching);
each answer is written when done, and is the same whatever the batch (its draws are keyed by the
prompt's id); resumable (prompts already answered in --out are skipped):
    python sample.py --checkpoint out/lima-e7 --prompts lima/test.jsonl --out answers.jsonl
LLaMA-65B does not fit one GPU: split every block over 8 (tensor parallelism, see tp.py):
    torchrun --nproc_per_node 8 sample.py --checkpoint ckpt/lima-65b \\
        --prompts lima/test.jsonl --out answers.jsonl --compile
Greedy decoding; top-k; another seed:
    python sample.py ... --temperature 0        python sample.py ... --top_k 50 --seed 1
Every option, with its default:
    python sample.py --help
"""

import sys
from dataclasses import dataclass, fields, replace
from typing import Annotated, Literal

from cli import Range, check_device, huge_pages_for_tensors, parse_config


@dataclass
class Settings:
    # LIMA's decoding (section 4.1 of the paper); eval.py passes these to generate() too.
    temperature: Annotated[float, Range(ge=0)] = 0.7  # 0: greedy (always the likeliest token)
    top_p: Annotated[float, Range(gt=0, le=1)] = 0.9  # nucleus sampling: draw from the likeliest tokens holding this mass; 1: off
    top_k: Annotated[int, Range(ge=0)] = 0  # draw only from the k likeliest tokens; 0: off
    repetition_penalty: Annotated[float, Range(gt=0)] = 1.2  # Keskar et al. 2019; 1: off
    # The paper penalises "previously generated tokens". Counting the prompt as well would
    # penalise the question's own words, which an answer must be free to repeat, and the EOT
    # that ends every user turn, which would push answers to run on.
    penalize_prompt: bool = False  # count the prompt's tokens as seen too
    max_len: Annotated[int, Range(ge=1)] = 2048  # tokens of a conversation, prompt + answer, in all (and never more than the model's max_seq_len)
    seed: Annotated[int, Range(ge=0, lt=2**32)] = 0  # with the prompt's id, it keys each answer's draws: the same answer whatever the batch
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPU; on CPU 1.4-3.6x faster at batch 1, by the CPU and model); each new cache length compiles once (seconds to a minute)


@dataclass
class Config(Settings):
    checkpoint: str = ""  # a training checkpoint (out/RUN/epoch-NN) or a converted directory (see above)
    prompt: str = ""  # answer this one prompt
    chat: bool = False  # a multi-turn conversation in the terminal
    prompts: str = ""  # answer every prompt of this file (.jsonl as LIMA's, or one per line)...
    out: str = ""  # ...appending {id, prompt, history, answer, stop} lines to this jsonl file
    batch_size: Annotated[int, Range(ge=1)] = 8  # rows decoded together with --prompts (continuous batching)
    device: str = "auto"  # where the model runs: auto (cuda if there is one, else cpu), cpu, cuda or cuda:N
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # the weights' dtype; auto: bf16 on GPU, fp32 on CPU


def check_modes(cfg: Config):
    """A --checkpoint, exactly one of --prompt, --chat, --prompts (with its --out), and a --device
    torch can name: refused before minutes of loading, none silently ignored."""
    if not cfg.checkpoint:
        raise ValueError("--checkpoint DIR is required (see --help)")
    modes = [f"--{name}" for name in ("prompt", "chat", "prompts") if getattr(cfg, name)]
    if not modes:
        raise ValueError("nothing to do: give --prompt TEXT, --chat, or --prompts FILE --out FILE")
    if len(modes) > 1:
        raise ValueError(f"{' and '.join(modes)} are given: choose one")
    if cfg.out and not cfg.prompts:
        raise ValueError(f"--out {cfg.out} is where --prompts writes its answers: give --prompts FILE too")
    if cfg.prompts and not cfg.out:
        raise ValueError("--prompts needs --out FILE.jsonl for the answers")
    check_device(cfg.device)


# The command line is read before torch is imported (a second or two), so that --help and a
# mistyped option answer at once: all of the above needs only the standard library.
if __name__ == "__main__":
    try:
        check_modes(parse_config(Config, sys.argv[1:])[0])
    except ValueError as e:
        sys.exit(f"error: {e}")
    huge_pages_for_tensors()  # before torch is imported: see cli.py

import functools
import json
import weakref
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import tp
from data import DataError, Tokenizer, load_conversations
from model import CacheSlots, Transformer, resolve_device, resolve_dtype

try:
    import readline  # importing it gives input() line editing and history: --chat's prompt
except ImportError:  # Python without GNU readline or libedit (Windows)
    readline = None

STOP_CHECK_EVERY = 8  # decode steps between looks for finished rows (each look waits for the device)


# ---- one decoding step, in small pure functions: logits (B, V) -> the next token (B,) ----

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens seen (B, V bool) less likely: a positive logit / penalty, a negative one * penalty.

    Keskar et al. 2019 as commonly implemented (CTRL, Hugging Face). Dividing a negative logit
    would raise it, so those are multiplied. `seen` is a set, not a count: once per token.
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Below 1 sharpens the distribution, above 1 flattens it."""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th); the rest become -inf."""
    kth = logits.topk(min(k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


TOP_P_CANDIDATES = 256  # on the CPU, the likeliest tokens top_p_filter sorts before it sorts them all


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus (Holtzman et al. 2019): keep the fewest likeliest tokens whose probabilities sum to >= p.

    Tokens tied with the least likely one kept are kept too, so the nucleus never depends on
    how a sort happens to order equal probabilities.

    Only the nucleus needs sorting. On the CPU, a sort of 32,001 probabilities is a third of a
    small model's decode step (1.6 ms), and the TOP_P_CANDIDATES likeliest, from topk, take
    0.1 ms: when they hold mass p in every row the nucleus is among them and the result is the
    same as sorting everything; otherwise (a flat distribution) everything is sorted. Compiled,
    that `if` on a value is torch.cond, which keeps both branches inside the graph (eager
    torch.cond would run dynamo on every call). On a GPU the sort is cheap and the check would
    make the host wait for every step, so it sorts.
    """
    probs = logits.softmax(dim=-1)
    k = min(TOP_P_CANDIDATES, probs.size(-1))
    if probs.device.type == "cpu" and k < probs.size(-1):
        top = probs.topk(k, dim=-1).values  # (B, k), descending
        held = (top.sum(dim=-1) >= p).all()  # the nucleus of every row is among the candidates

        def among_candidates(probs, top):
            return nucleus_cutoff(top, p)

        def among_all(probs, top):
            return nucleus_cutoff(probs.sort(dim=-1, descending=True).values, p)  # (B, V) sorted

        if torch.compiler.is_compiling():
            cutoff = torch.cond(held, among_candidates, among_all, (probs, top))
        else:
            cutoff = among_candidates(probs, top) if held else among_all(probs, top)
    else:
        cutoff = nucleus_cutoff(probs.sort(dim=-1, descending=True).values, p)
    return logits.masked_fill(probs < cutoff, float("-inf"))


def nucleus_cutoff(sorted_probs: torch.Tensor, p: float) -> torch.Tensor:
    """The smallest probability the nucleus keeps (B, 1), from each row's likeliest first (B, n)."""
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the strictly likelier tokens
    n_keep = (mass_before < p).sum(dim=-1, keepdim=True)  # (B, 1), at least 1
    return sorted_probs.gather(-1, n_keep - 1)


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row of probs (B, V) -> (B,), given a uniform u (B, 1) in [0, 1) per row.

    Inverse transform: the first token whose cumulative probability exceeds u * total. One
    uniform per row instead of an exponential per token (gpt-fast's race of exponential clocks),
    which on the CPU cost a tenth of a decode step, and no device sync (torch.multinomial would
    wait for the GPU). A token of probability 0 never exceeds its predecessor's cumulative sum,
    so a token outside the nucleus is never drawn.
    """
    cdf = probs.cumsum(dim=-1)  # (B, V), non-decreasing
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_(max=probs.size(-1) - 1)


def pcg_hash(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (PCG's output function, O'Neill 2014) of int64 tensors holding 32 bits."""
    state = (x * 747796405 + 2891336453) & 0xFFFFFFFF
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & 0xFFFFFFFF
    return (word >> 22) ^ word


def uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """A uniform in [0, 1) per row (B, 1), a pure function of the row's (key, step) (B,) each.

    Counter-based, not a generator's stream: an answer's draws are its own, whatever else is in
    the batch, in whichever slot and after whichever prompts, so a rerun or a resumed run
    reproduces it. Integer ops only: every backend and torch.compile take them.
    """
    return (pcg_hash(pcg_hash(keys) ^ steps) / 2**32).float()[:, None]


def next_token(logits: torch.Tensor, seen: torch.Tensor, s: Settings, u: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) -> next tokens (B,): penalty, then greedy or temperature, top-k, top-p, draw."""
    logits = apply_repetition_penalty(logits.float(), seen, s.repetition_penalty)
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits, s.temperature)
    if s.top_k > 0:
        logits = top_k_filter(logits, s.top_k)
    if s.top_p < 1:
        logits = top_p_filter(logits, s.top_p)
    return sample_from(logits.softmax(dim=-1), u)


def answer_key(seed: int, prompt_id) -> int:
    """The sampling stream of one answer: (seed, the prompt's id), as 32 bits."""
    return zlib.crc32(f"{seed}\0{prompt_id}".encode())


# ---- decoding with a static KV cache: continuous batching over a fixed number of rows ----

def decode_step(model: Transformer, token, positions, length: int, seen, keys, steps, s: Settings):
    """token (B,) of every cache row at its position (B,) -> the next token (B,)."""
    at = CacheSlots(rows=None, positions=positions[:, None], length=length)
    logits = model.forward_cached(token[:, None], at)[:, -1]  # (B, V)
    return next_token(logits, seen, s, uniforms(keys, steps))


@functools.cache
def compiled_decode_step(device_type: str):
    """decode_step compiled once per process (lazily: torch.compile costs seconds to import).

    The shapes change only with the length read from the cache, which comes in powers of two
    (filled_length), so a few graphs serve a whole run. On a GPU, CUDA graphs ("reduce-overhead")
    replay each as a single launch: at batch 1 a step would otherwise be bound by hundreds of
    kernel launches, not by reading the weights. On the CPU, inductor fuses the small ops,
    batch 1's matrix-vector products become loops of its own (cpu_matvec_as_loops), and the
    code that calls the ~100 kernels of a step is C++ (cpp_wrapper), not Python: 0.2-0.5 ms of a
    100m model's 18 ms step, for a few seconds more compiling each graph.
    """
    if device_type == "cuda":
        return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    options = {}
    if device_type == "cpu":
        cpu_matvec_as_loops()
        options["cpp_wrapper"] = True
    return torch.compile(decode_step, fullgraph=True, dynamic=False, options=options)  # a graph per length


compiled_for = None  # a weak reference to the model the compiled graphs were traced with


def compiled_step(model: Transformer):
    """The compiled decode step for this model. Graphs traced for another model are dropped first:
    dynamo keeps at most 8 per function (its recompile_limit), and a process that answers with
    several models (a benchmark, a notebook) would reach it after two."""
    global compiled_for
    if compiled_for is not None and compiled_for() is not model:
        torch.compiler.reset()
    compiled_for = weakref.ref(model)
    return compiled_decode_step(model.tok_embeddings.weight.device.type)


def cpu_matvec_as_loops():
    """Have inductor write a one-row matmul (batch 1's every weight) as a multiply-and-sum loop.

    The BLAS that torch ships reads a weight matrix at a fraction of the memory bandwidth for a
    single row (MKL's sgemv, 2 cores of an AMD EPYC: 15 GB/s, where a sum reads 67; of a Xeon:
    75-80% of a sum's), and a decode step at batch 1 is nothing but such products. Inductor's
    decompose_mm_pass (off by default) rewrites them as a broadcast multiply and a sum, which it
    fuses into one vectorised loop over the weight (36-39 GB/s on the EPYC; on the Xeon 93-97% of
    a sum's in a 100m model's layers); its CPU default stops at 2048 rows and columns, so
    the limit is lifted to take the output layer (32,001 rows) too. Wider batches keep the BLAS
    (the pass takes one row only). A private knob, set for the rest of the process: if a torch
    lacks it, the step compiles without it, only slower.
    """
    try:
        from torch._inductor import config
        from torch._inductor.fx_passes import decompose_mem_bound_mm as pass_
        config.post_grad_fusion_options.setdefault("decompose_mm_pass", {})
        pass_.cpu_max_other_dimension_decomposition = 1 << 62  # read at import: set on the module
    except (ImportError, AttributeError):
        pass


def filled_length(longest: int, size: int, compiled: bool) -> int:
    """How many leading cache slots a step reads: at least longest (every row's position + 1).

    Rounded up so that the compiled step sees few shapes: to a power of two when compiled (a
    graph each), to a multiple of 64 otherwise; never past the cache's size.
    """
    bucket = 1 << max(6, (longest - 1).bit_length()) if compiled else -(-longest // 64) * 64
    return min(bucket, size)


def ensure_cache(model: Transformer, batch_size: int, length: int):
    """A KV cache of batch_size rows and >= length slots, reused if there is one (same buffers,
    so a compiled step keeps its graph)."""
    cache = model.layers[0].attention.kv_cache
    if cache is None or cache.k_cache.size(0) != batch_size or cache.k_cache.size(2) < length:
        model.setup_cache(batch_size, length)


def token_limit(model: Transformer, s: Settings) -> int:
    """Prompt + answer tokens allowed: s.max_len, but no more than the model was trained on."""
    return min(s.max_len, model.args.max_seq_len)


@torch.no_grad()
def decode(model: Transformer, prompts: list[list[int]], s: Settings, eot_id: int, slots: int | None = None,
           keys: list | None = None, on_token=None, limits: list[int] | None = None):
    """Answer tokenized prompts, yielding (index, answer) as each finishes: continuous batching.

    `slots` rows of the KV cache decode together (default: every prompt at once). When a row
    finishes (EOT, or s.max_len in all) the next prompt is prefilled into that row at once, so
    no row waits for the longest answer of a batch. Each row sits at its own position, and a step
    reads only the filled part of the cache. An answer depends only on its prompt, s and its key
    (keys[i], default i: the sampling stream is a function of (s.seed, key, step)), never on the
    other prompts or on slots. limits[i], if given, caps answer i's tokens below what s.max_len
    leaves it. on_token, if given, is called with each step's tokens (B,), for
    streaming one prompt (with tensor parallelism give one on every rank or on none: it sets how
    often they look for finished rows). Raises ValueError if a prompt leaves no room for an answer.
    """
    device = model.tok_embeddings.weight.device
    total = token_limit(model, s)
    for i, p in enumerate(prompts):
        if not 0 < len(p) < total:
            raise ValueError(f"prompt {i} is {len(p)} tokens: with at most {total} in all, "
                             f"no room is left for an answer")
    B = min(slots or len(prompts), len(prompts))
    ensure_cache(model, B, total)
    S = model.layers[0].attention.kv_cache.k_cache.size(2)
    V = model.args.vocab_size
    keys = [answer_key(s.seed, k) for k in (keys if keys is not None else range(len(prompts)))]
    step = compiled_step(model) if s.compile else decode_step
    # Per row, on the device: the last token, its position, the answer so far, its sampling key,
    # tokens written, the answer's budget, the penalty's set, and whether the row is done.
    token = torch.full((B,), eot_id, device=device)
    positions = torch.zeros(B, dtype=torch.long, device=device)
    answer = torch.full((B, total), eot_id, device=device)
    row_keys = torch.zeros(B, dtype=torch.long, device=device)
    written = torch.zeros(B, dtype=torch.long, device=device)
    budget = torch.zeros(B, dtype=torch.long, device=device)
    seen = torch.zeros(B, V, dtype=torch.bool, device=device)
    done = torch.ones(B, dtype=torch.bool, device=device)
    # On the host: which prompt each row holds, and a bound on its position (it stops moving
    # once done), for the length of cache a step must read.
    holds, reach = [None] * B, [0] * B
    waiting = list(range(len(prompts)))[::-1]  # popped from the end: in order

    def admit(free: list[int]):
        """Prefill the next prompts into the free cache rows, in one forward, and draw their first
        tokens. Shorter prompts are padded on the right: a pad's slot lies past its row's prompt,
        where the row's own steps write before any token reads it (forward_cached's mask)."""
        pairs = [(b, waiting.pop()) for b in free[:len(waiting)]]
        if not pairs:  # nothing to answer (every prompt of a resumed file is done)
            return
        b_rows = torch.tensor([b for b, _ in pairs], device=device)
        lens = [len(prompts[i]) for _, i in pairs]
        p = torch.full((len(pairs), max(lens)), eot_id, device=device)  # (k, n)
        for r, (_, i) in enumerate(pairs):
            p[r, :lens[r]] = torch.tensor(prompts[i], device=device)
        at = CacheSlots(rows=b_rows, positions=torch.arange(p.size(1), device=device).expand_as(p),
                        length=filled_length(p.size(1), S, s.compile))
        last = torch.tensor(lens, device=device) - 1
        logits = model.forward_cached(p, at, last)[:, 0]  # (k, V)
        seen[b_rows] = False
        if s.penalize_prompt:
            for r, (b, i) in enumerate(pairs):
                seen[b, p[r, :lens[r]]] = True
        row_keys[b_rows] = torch.tensor([keys[i] for _, i in pairs], device=device)
        step_0 = torch.zeros(len(pairs), dtype=torch.long, device=device)  # the first draw of each answer
        first = tp.agree(next_token(logits, seen[b_rows], s, uniforms(row_keys[b_rows], step_0)))
        for r, (b, i) in enumerate(pairs):
            token[b], positions[b], written[b] = first[r], lens[r], 1
            budget[b] = min(total - lens[r], limits[i]) if limits else total - lens[r]
            answer[b, 0] = first[r]
            seen[b, first[r]] = True
            done[b] = (first[r] == eot_id) | (budget[b] <= 1)
            holds[b], reach[b] = i, lens[r] + 1

    admit(list(range(B)))
    if on_token is not None:
        on_token(token)
    rows = torch.arange(B, device=device)
    t = 0
    while True:
        # Look for finished rows now and then: each look waits for the device, and between looks
        # the host runs ahead queueing steps (streaming waits for every token anyway).
        if t % STOP_CHECK_EVERY == 0 or on_token is not None:
            finished = [b for b, d in enumerate(done.tolist()) if d and holds[b] is not None]
            for b in finished:
                yield holds[b], answer[b, :written[b]].tolist()
                holds[b], reach[b] = None, 1  # an idle row decodes on in place, unread
            if finished and waiting:
                admit(finished)
            if all(h is None for h in holds):
                return
        length = filled_length(max(reach), S, s.compile)
        # clone: a CUDA graph's output is overwritten by its next replay
        nxt = step(model, token, positions, length, seen, row_keys, written, s).clone()
        live = ~done
        token = tp.agree(torch.where(live, nxt, token))
        at = written.clamp(max=total - 1)
        answer[rows, at] = torch.where(live, token, answer[rows, at])
        seen[rows, token] |= live
        positions += live
        written += live
        done |= (token == eot_id) | (written >= budget)
        reach = [r + 1 if h is not None else r for r, h in zip(reach, holds)]
        if on_token is not None:
            on_token(token)
        t += 1


def generate(model: Transformer, prompts: list[list[int]], s: Settings, eot_id: int, slots: int | None = None,
             keys: list | None = None, on_token=None, limits: list[int] | None = None) -> list[list[int]]:
    """decode()'s answers, in the prompts' order: each ends with EOT or stops at its limit."""
    answers = [None] * len(prompts)
    for i, ids in decode(model, prompts, s, eot_id, slots, keys, on_token, limits):
        answers[i] = ids
    return answers


# ---- the three modes ----

class Streamer:
    """An on_token callback for batch 1 that prints the answer as it grows (if show: on rank 0)."""

    def __init__(self, tok: Tokenizer, show: bool):
        self.tok, self.show, self.ids, self.shown = tok, show, [], ""

    def __call__(self, tokens: torch.Tensor):
        if self.show and tokens[0].item() != self.tok.eot_id:
            self.ids.append(tokens[0].item())
            text = self.tok.decode(self.ids)
            # A character split over byte tokens decodes as U+FFFD until its last byte arrives.
            if not text.endswith("\ufffd"):
                self.write(text)

    def write(self, text: str):
        print(text[len(self.shown):], end="", flush=True)
        self.shown = text

    def finish(self):
        """Print what was held back (a character whose last byte never came)."""
        if self.show:
            self.write(self.tok.decode(self.ids))


def answer_one(model, tok, prompt: str, s: Settings, rank: int):
    """--prompt: print one answer as it is written."""
    stream = Streamer(tok, show=rank == 0)
    ids = generate(model, [tok.encode_dialog([prompt])], s, tok.eot_id, on_token=stream)[0]
    stream.finish()
    if rank == 0:
        print()
        if ids[-1] != tok.eot_id:
            print(f"(stopped at the {token_limit(model, s)}-token limit)", file=sys.stderr)


def chat(model, tok, s: Settings, rank: int):
    """--chat: a conversation kept in LIMA's format; /reset starts over, /quit or Ctrl-D ends.

    Ctrl-C while an answer is being written stops it there (what was written stays the answer);
    Ctrl-C at the prompt ends the chat. In one process only: under tensor parallelism each rank
    gets the signal at its own moment, so there Ctrl-C ends the program.
    """
    say = print if rank == 0 else (lambda *a, **k: None)
    total = token_limit(model, s)
    say("A new conversation. /reset starts another, /quit (or Ctrl-D, or Ctrl-C) ends; "
        "Ctrl-C while an answer is written stops it; a line of \"\"\" begins and ends a message of many lines.")
    turns = []
    while True:
        say()
        line = tp.from_rank0(read_message() if rank == 0 else None)
        if line is None or line.strip() == "/quit":
            return
        if line.strip() == "/reset":
            turns = []
            say("(a new conversation)")
            continue
        if not line.strip():
            continue
        alone = len(tok.encode_dialog([line]))
        if alone >= total:
            say(f"(that message is {alone} tokens, over the {total}-token limit: not sent)")
            continue
        turns.append(line)
        ids, dropped = tok.encode_dialog(turns), 0
        # Keep at least half the window for the answer by forgetting the oldest exchanges.
        while len(ids) > total // 2 and len(turns) > 1:
            turns, dropped = turns[2:], dropped + 1
            ids = tok.encode_dialog(turns)
        if dropped:
            say(f"(forgot the oldest {dropped} exchange(s) to stay within {total} tokens)")
        say("\nlima> ", end="", flush=True)
        stream = Streamer(tok, show=rank == 0)
        try:
            answer = generate(model, [ids], replace(s, seed=s.seed + len(turns)), tok.eot_id,
                              on_token=stream)[0]  # a seed per turn, or each would draw the same noise
        except KeyboardInterrupt:
            if dist.is_initialized() and dist.get_world_size() > 1:
                raise
            answer = stream.ids
            say("\n(stopped by Ctrl-C)", end="")
        else:
            stream.finish()
            if answer[-1] != tok.eot_id:
                say(f"\n(stopped at the {total}-token limit)", end="")
        turns.append(tok.decode([t for t in answer if t != tok.eot_id]))
        say()


MANY_LINES = '"""'  # a line of its own that begins, and one that ends, a message of many lines
# Without readline a terminal hands over a line in its canonical mode, which keeps 4,095 characters
# of it on Linux (1,023 on macOS) and drops the rest without a word.
TTY_LINE_LIMIT = 1023 if sys.platform == "darwin" else 4095


def read_message() -> str | None:
    """The next message typed at the prompt: a line, or the lines between two lines of \"\"\" (a
    paste of many lines); None for Ctrl-D or Ctrl-C. A line that may have been cut by the terminal
    is not sent (an empty message) and said so."""
    line = read_line("you> ")
    lines = [line]
    if line is not None and line.strip() == MANY_LINES:
        lines = []
        while (line := read_line("... ")) is not None and line.strip() != MANY_LINES:
            lines.append(line)
        if line is None:
            return None
    if line is None:
        return None
    if any(len(one) >= TTY_LINE_LIMIT for one in lines) and cut_by_the_terminal():
        print(f"(not sent: a line reached the terminal's limit of {TTY_LINE_LIMIT:,} characters, and what "
              f"followed it was dropped; break the text into shorter lines between two lines of {MANY_LINES})")
        return ""
    return "\n".join(lines)


def cut_by_the_terminal() -> bool:
    """Whether input() reads from a terminal in its canonical mode (readline reads key by key, and a
    pipe has no line limit)."""
    return sys.stdin.isatty() and not (readline is not None and sys.stdout.isatty())


def read_line(prompt: str) -> str | None:
    """A line typed at the prompt, with readline's editing and history where there is readline;
    None for Ctrl-D or Ctrl-C (then the shell's prompt starts on a line of its own)."""
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        print()
        return None


def read_prompts(path) -> list[dict]:
    """{id, prompt, history} per prompt of a .jsonl in LIMA's layout, or of a text file (one a line).

    A conversation that ends with an answer (a dev or training file) is asked its last question
    again: the answer is dropped. ids count the prompts from 1, unless a jsonl line has an "id".
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    if path.suffix != ".jsonl":
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise DataError(f"{path}: empty file, no prompts (one a line)")
        return [dict(id=n, prompt=line, history=[]) for n, line in enumerate(lines, 1)]
    items, seen = [], {}
    line_numbers = [n for n, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.strip()]  # as read
    for n, (record, line) in enumerate(zip(load_conversations(path, require_answer=False), line_numbers), 1):
        turns = record["conversations"]
        turns = turns if len(turns) % 2 else turns[:-1]
        item_id = record.get("id", n)
        if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
            raise DataError(f'{path}:{line}: "id" must be a string or an integer, not {item_id!r}')
        if str(item_id) in seen:  # answers are matched, and a run resumed, by id
            raise DataError(f"{path}:{line}: id {item_id} again (first on line {seen[str(item_id)]}); "
                            f"every prompt needs an id of its own")
        seen[str(item_id)] = line
        items.append(dict(id=item_id, prompt=turns[-1], history=turns[:-1]))
    return items


def answer_file(model, tok, cfg: Config, s: Settings, rank: int):
    """--prompts FILE --out FILE: answer with continuous batching, appending each answer as it finishes."""
    if not cfg.out:
        raise ValueError("--prompts needs --out FILE.jsonl for the answers")
    out = Path(cfg.out)
    answered = set()
    if out.is_file():
        for n, line in enumerate(out.read_text().splitlines(), 1):
            try:
                answered.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{out}:{n}: not an answer line (cut short by a crash?); "
                                f"delete it and run again") from None
    # Every rank reads the same files before its first collective, so all agree on what is left.
    items = [it for it in read_prompts(cfg.prompts) if str(it["id"]) not in answered]
    total = token_limit(model, s)
    for it in items:
        it["ids"] = tok.encode_dialog(it["history"] + [it["prompt"]])
        if len(it["ids"]) >= total:
            raise ValueError(f"{cfg.prompts}: prompt {it['id']} is {len(it['ids'])} tokens, leaving no "
                             f"room for an answer within {total}; shorten it or raise --max_len")
    if rank == 0:
        print(f"{len(answered)} prompts already answered in {out}; {len(items)} to go", file=sys.stderr)
        out.parent.mkdir(parents=True, exist_ok=True)
    with interrupted_note(f"{out}: holds every answer finished so far; the same command answers the rest"), \
            tqdm(total=len(items), unit="prompt", disable=rank != 0) as bar:
        # Continuous batching over --batch_size rows; each answer is written as soon as it is done.
        # Its sampling stream is keyed by the prompt's id: the same answer whatever the batch,
        # the order of the file, or how many were answered before a resume.
        finished = decode(model, [it["ids"] for it in items], s, tok.eot_id, slots=cfg.batch_size,
                          keys=[it["id"] for it in items])
        for i, ids in finished:
            it = items[i]
            if rank == 0:
                stop = "eot" if ids[-1] == tok.eot_id else "length"
                row = dict(id=it["id"], prompt=it["prompt"], history=it["history"],
                           answer=tok.decode([t for t in ids if t != tok.eot_id]), stop=stop)
                with out.open("a") as f:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            bar.update(1)


@contextmanager
def interrupted_note(note: str):
    """On Ctrl-C, exit (status 130) with a line saying what was saved, not a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\nstopped by Ctrl-C. {note}", file=sys.stderr)
        sys.exit(130)


# ---- command line ----

def main(argv: list[str]):
    try:
        cfg, _ = parse_config(Config, argv)
        check_modes(cfg)  # before anything is loaded
        if cfg.prompts:
            read_prompts(cfg.prompts)  # readable, not empty, ids unique
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        rank, world_size, device = tp.init_distributed(device)
        model, tok = checkpoint.load_model(cfg.checkpoint)  # memory-mapped on the CPU: nothing read yet
        if world_size > 1:
            tp.apply_tp(model, rank, world_size)  # each rank keeps 1/world_size of every block
        model.to_device(device, dtype)  # only now are the weights (this rank's) read
        if cfg.max_len > model.args.max_seq_len and rank == 0:
            print(f"note: --max_len {cfg.max_len} is capped at the model's max_seq_len "
                  f"{model.args.max_seq_len}", file=sys.stderr)
        s = Settings(**{f.name: getattr(cfg, f.name) for f in fields(Settings)})
        if cfg.chat:
            chat(model, tok, s, rank)
        elif cfg.prompts:
            answer_file(model, tok, cfg, s, rank)
        else:
            answer_one(model, tok, cfg.prompt, s, rank)
        if dist.is_initialized():
            dist.barrier()  # no rank may tear down the process group while another still talks
    except (DataError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")  # one line, exit status 1
    except KeyboardInterrupt:  # loading, or --prompt's answer: nothing to save
        print("\nstopped by Ctrl-C", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
