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
The same on a GPU, in bf16, with the decode step compiled (the first answer waits for the compiler):
    python sample.py --checkpoint out/lima-e7 --prompt "Write a haiku about the sea." --compile
A conversation: /reset starts a new one, /quit (or Ctrl-D) ends it:
    python sample.py --checkpoint out/lima-e7 --chat
Every prompt of a file (LIMA's test.jsonl layout, or .txt with one prompt per line), in batches,
resumable (prompts already answered in --out are skipped):
    python sample.py --checkpoint out/lima-e7 --prompts lima/test.jsonl --out answers.jsonl
LLaMA-65B does not fit one GPU: split every block over 8 (tensor parallelism, see tp.py):
    torchrun --nproc_per_node 8 sample.py --checkpoint ckpt/lima-65b \\
        --prompts lima/test.jsonl --out answers.jsonl --compile
Greedy decoding; top-k; another seed:
    python sample.py ... --temperature 0        python sample.py ... --top_k 50 --seed 1
Every option, with its default:
    python sample.py --help
"""

import functools
import json
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import tp
from cli import Range, parse_config
from data import DataError, Tokenizer, load_conversations
from model import Transformer, precompute_freqs_cis


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
    max_tokens: Annotated[int, Range(ge=1)] = 2048  # prompt + answer, in all (and never more than the model's max_seq_len)
    seed: int = 0  # generate() seeds torch with it (plus the batch or turn): same seed, prompts and batches, same answers
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPU; first call is slow)


@dataclass
class Config(Settings):
    checkpoint: str = ""  # params.json, model.pth, tokenizer.model (see above)
    prompt: str = ""  # answer this one prompt
    chat: bool = False  # a multi-turn conversation in the terminal
    prompts: str = ""  # answer every prompt of this file (.jsonl as LIMA's, or one per line)...
    out: str = ""  # ...appending {id, prompt, history, answer, stop} lines to this jsonl file
    batch_size: Annotated[int, Range(ge=1)] = 8  # prompts decoded together with --prompts
    device: str = "auto"  # auto: cuda if available, else cpu; or cpu, cuda, cuda:N
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STOP_CHECK_EVERY = 8  # decode steps between checks that every row is done (each check syncs)


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


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus (Holtzman et al. 2019): keep the fewest likeliest tokens whose probabilities sum to >= p.

    Tokens tied with the least likely one kept are kept too, so the nucleus never depends on
    how a sort happens to order equal probabilities.
    """
    probs = logits.softmax(dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values  # (B, V)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the strictly likelier tokens
    n_keep = (mass_before < p).sum(dim=-1, keepdim=True)  # (B, 1), at least 1
    cutoff = sorted_probs.gather(-1, n_keep - 1)  # (B, 1): the smallest probability kept
    return logits.masked_fill(probs < cutoff, float("-inf"))


def sample_from(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of probs (B, V) -> (B,), without a device sync.

    Inverse transform: the first token whose cumulative probability exceeds u ~ U(0, total).
    One uniform per row instead of an exponential per token (gpt-fast's race of exponential
    clocks), which on the CPU cost a tenth of a decode step; torch.multinomial would wait for
    the GPU. A token of probability 0 never exceeds its predecessor's cumulative sum, so a
    token outside the nucleus is never drawn; u < total, as rand() < 1 and total is about 1.
    """
    cdf = probs.cumsum(dim=-1)  # (B, V), non-decreasing
    u = torch.rand(probs.size(0), 1, device=probs.device) * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def next_token(logits: torch.Tensor, seen: torch.Tensor, s: Settings) -> torch.Tensor:
    """Logits (B, V) -> next tokens (B,): penalty, then greedy or temperature, top-k, top-p, draw."""
    logits = apply_repetition_penalty(logits.float(), seen, s.repetition_penalty)
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits, s.temperature)
    if s.top_k > 0:
        logits = top_k_filter(logits, s.top_k)
    if s.top_p < 1:
        logits = top_p_filter(logits, s.top_p)
    return sample_from(logits.softmax(dim=-1))


# ---- decoding with a static KV cache: prefill the prompts, then one token at a time ----

def decode_step(model: Transformer, token, input_pos, start, seen, s: Settings) -> torch.Tensor:
    """token (B, 1) written at cache slot input_pos (1,) -> the next token (B,)."""
    logits = model.forward_cached(token, input_pos, start)[:, -1]  # (B, V)
    return next_token(logits, seen, s)


@functools.cache
def compiled_decode_step():
    """decode_step compiled once per process (lazily: torch.compile costs seconds to import).

    Every step has the same shapes (the cache is preallocated), so one graph serves them all,
    and CUDA graphs ("reduce-overhead") replay it as a single launch: at batch 1 a step would
    otherwise be bound by hundreds of kernel launches, not by reading the weights.
    """
    return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)


def ensure_cache(model: Transformer, batch_size: int, length: int):
    """A KV cache of batch_size rows and >= length slots, reused if there is one (same buffers,
    so a compiled step keeps its graph); the RoPE table is lengthened to match if needed."""
    cache = model.layers[0].attention.kv_cache
    if cache is None or cache.k_cache.size(0) != batch_size or cache.k_cache.size(2) < length:
        model.setup_cache(batch_size, length)
    # Left padding shifts a short prompt right by up to the longest one, so slots can run past
    # max_seq_len; RoPE sees only position differences within a row, and those stay below it.
    if model.freqs_cis.size(0) < length:
        model.freqs_cis = precompute_freqs_cis(model.args.head_dim, length, model.args.rope_theta
                                               ).to(model.freqs_cis.device)


def token_limit(model: Transformer, s: Settings) -> int:
    """Prompt + answer tokens allowed: s.max_tokens, but no more than the model was trained on."""
    return min(s.max_tokens, model.args.max_seq_len)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], s: Settings, eot_id: int,
             on_token=None) -> list[list[int]]:
    """Answer a batch of tokenized prompts: each answer ends with EOT, or stops at s.max_tokens in all.

    Rows are left-padded to a common length, so that every row's next token goes to the same
    cache slot; rows that have finished keep decoding EOT, which is thrown away. on_token, if
    given, is called with each step's tokens (B,) (for streaming; with tensor parallelism give
    one on every rank or on none, as it sets how often they check for the end). Raises
    ValueError if a prompt leaves no room for an answer.
    """
    device = model.tok_embeddings.weight.device
    total = token_limit(model, s)
    lens = [len(p) for p in prompts]
    for i, n in enumerate(lens):
        if not 0 < n < total:
            raise ValueError(f"prompt {i} of the batch is {n} tokens: with at most {total} in all, "
                             f"no room is left for an answer")
    B, P, max_new = len(prompts), max(lens), total - min(lens)
    ensure_cache(model, B, P + max_new)
    tokens = torch.zeros(B, P, dtype=torch.long)  # (B, P), left-padded; pad slots are masked out
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = torch.tensor(p)
    tokens = tokens.to(device)
    start = torch.tensor([P - n for n in lens], device=device)  # (B,): where each row's text begins
    budget = torch.tensor([total - n for n in lens], device=device)  # (B,): answer tokens allowed
    seen = torch.zeros(B, model.args.vocab_size, dtype=torch.bool, device=device)  # for the penalty
    if s.penalize_prompt:
        for b, p in enumerate(prompts):
            seen[b, p] = True
    rows = torch.arange(B, device=device)
    out = torch.full((B, max_new), eot_id, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step = compiled_decode_step() if s.compile else decode_step

    torch.manual_seed(s.seed)
    logits = model.forward_cached(tokens, torch.arange(P, device=device), start)[:, -1]  # (B, V)
    token = next_token(logits, seen, s)
    input_pos = torch.tensor([P], device=device)  # (1,): the slot the next token is written to
    for t in range(max_new):
        token = tp.agree(torch.where(done, eot_id, token))
        out[:, t] = token
        seen[rows, token] = True
        done |= (token == eot_id) | (t + 1 >= budget)
        if on_token is not None:
            on_token(token)
        # done.all() waits for the device; between checks the host runs ahead queueing steps.
        # Streaming waits for every token anyway, so it checks every step.
        if t + 1 == max_new or ((on_token is not None or t % STOP_CHECK_EVERY == 0) and done.all()):
            break
        # clone: a CUDA graph's output is overwritten by its next replay
        token = step(model, token[:, None], input_pos, start, seen, s).clone()
        input_pos += 1
    answers = []
    for row, n in zip(out.tolist(), lens):
        row = row[:total - n]
        answers.append(row[:row.index(eot_id) + 1] if eot_id in row else row)
    return answers


# ---- loading ----

def load_model(path, device="cpu", dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer]:
    """A converted directory (params.json, model.pth, tokenizer.model) or a training
    checkpoint (out/RUN/epoch-NN) -> (model, tokenizer).

    The one place generation and evaluation read weights from. A converted model is loaded
    memory-mapped on the CPU in the file's dtype (nothing is read yet), checked against the
    tokenizer, then moved to device and dtype; with the defaults it stays mapped, which is what
    tensor parallelism wants before sharding. A training checkpoint is reassembled from its
    shards in this one process (checkpoint.load_model): fine for the demo and for reading a few
    epochs; for 65B, export it once (checkpoint.py export) and load the result.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.model; expected a directory written by "
                                f"convert.py, train.py or checkpoint.py export")
    if checkpoint.has_sharded_weights(path):
        model, tok = checkpoint.load_model(path)
    else:
        tok = Tokenizer(path / "tokenizer.model")
        model = Transformer.from_pretrained(path, "cpu")
    rows = model.args.vocab_size
    if rows == tok.n_base:
        # A base model, never fine-tuned: worth sampling as a baseline, so add the EOT row rather
        # than refuse. The row is the vocabulary's mean (model.extend_vocab), never trained.
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"note: {path} has no EOT row (a base model?): added one; its answers will rarely "
                  f"stop before the length limit", file=sys.stderr)
        model.grow_vocab(1)
    elif rows != tok.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tok.n_base} pieces + EOT = {tok.vocab_size} "
                         f"tokens but model.pth has {rows} embedding rows: they do not belong together")
    return to_device(model, device, dtype), tok


def to_device(model: Transformer, device, dtype: torch.dtype | None) -> Transformer:
    """Move (and cast) the weights; the RoPE table is recomputed there so it stays float32."""
    model.to(device=device, dtype=dtype)
    model.init_buffers()
    return model


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
        "Ctrl-C while an answer is written stops it.")
    turns = []
    while True:
        line = tp.from_rank0(read_line("\nyou> ") if rank == 0 else None)
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


def read_line(prompt: str) -> str | None:
    """A line typed at the prompt; None for Ctrl-D or Ctrl-C (then the shell's prompt starts on a
    line of its own)."""
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
    """--prompts FILE --out FILE: answer in batches, appending each batch's answers as it finishes."""
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
    items = [{**it, "n": n} for n, it in enumerate(read_prompts(cfg.prompts)) if str(it["id"]) not in answered]
    total = token_limit(model, s)
    for it in items:
        it["ids"] = tok.encode_dialog(it["history"] + [it["prompt"]])
        if len(it["ids"]) >= total:
            raise ValueError(f"{cfg.prompts}: prompt {it['id']} is {len(it['ids'])} tokens, leaving no "
                             f"room for an answer within {total}; shorten it or raise --max_tokens")
    if rank == 0:
        print(f"{len(answered)} prompts already answered in {out}; {len(items)} to go", file=sys.stderr)
        out.parent.mkdir(parents=True, exist_ok=True)
    with interrupted_note(f"{out}: holds every answer finished so far; the same command answers the rest"), \
            tqdm(total=len(items), unit="prompt", disable=rank != 0) as bar:
        for i in range(0, len(items), cfg.batch_size):
            batch = items[i:i + cfg.batch_size]
            # A seed of its own per batch, from its first prompt's place in the file: with one
            # seed for all, every batch would draw the same noise and their answers correlate.
            seeded = replace(s, seed=s.seed + batch[0]["n"])
            answers = generate(model, [it["ids"] for it in batch], seeded, tok.eot_id)
            if rank == 0:
                with out.open("a") as f:
                    for it, ids in zip(batch, answers):
                        stop = "eot" if ids[-1] == tok.eot_id else "length"
                        row = dict(id=it["id"], prompt=it["prompt"], history=it["history"],
                                   answer=tok.decode([t for t in ids if t != tok.eot_id]), stop=stop)
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
            bar.update(len(batch))


@contextmanager
def interrupted_note(note: str):
    """On Ctrl-C, exit (status 130) with a line saying what was saved, not a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\nstopped by Ctrl-C. {note}", file=sys.stderr)
        sys.exit(130)


# ---- command line ----

def check_modes(cfg: Config):
    """Exactly one of --prompt, --chat, --prompts (with its --out, and its prompts readable), and
    a --device torch can name: refused before minutes of loading, none silently ignored."""
    modes = [f"--{name}" for name in ("prompt", "chat", "prompts") if getattr(cfg, name)]
    if not modes:
        raise ValueError("nothing to do: give --prompt TEXT, --chat, or --prompts FILE --out FILE")
    if len(modes) > 1:
        raise ValueError(f"{' and '.join(modes)} are given: choose one")
    if cfg.out and not cfg.prompts:
        raise ValueError(f"--out {cfg.out} is where --prompts writes its answers: give --prompts FILE too")
    if cfg.prompts:
        if not cfg.out:
            raise ValueError("--prompts needs --out FILE.jsonl for the answers")
        read_prompts(cfg.prompts)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, not {cfg.device!r}")


def main(argv: list[str]):
    try:
        cfg, _ = parse_config(Config, argv)
        if not cfg.checkpoint:
            raise ValueError("--checkpoint DIR is required (see --help)")
        check_modes(cfg)  # before anything is loaded
        device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {cfg.device}: no CUDA device is available here; use --device cpu")
        auto_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else auto_dtype
        rank, world_size, device = tp.init_distributed(device)
        model, tok = load_model(cfg.checkpoint)  # memory-mapped on the CPU: nothing read yet
        if world_size > 1:
            tp.apply_tp(model, rank, world_size)  # each rank keeps 1/world_size of every block
        model = to_device(model, device, dtype)  # only now are the weights (this rank's) read
        if cfg.max_tokens > model.args.max_seq_len and rank == 0:
            print(f"note: --max_tokens {cfg.max_tokens} is capped at the model's max_seq_len "
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
