"""
LIMA's data: conversations in jsonl, a tokenizer with an end-of-turn token, prompt masking, and
packed batches balanced over data-parallel ranks.

Summarise a file (conversations, tokens, trimming, lengths, and the waste of packing it into rows):
    python data.py --data data/demo/train.jsonl --tokenizer data/tokenizer.model --world_size 8
The real set as the 65B run sees it (Meta's tokenizer, 16 GPUs):
    python data.py --data lima/train.jsonl --tokenizer ckpt/llama-65b/tokenizer.model --world_size 16
Remake the demo's tokenizer (data/tokenizer.model) from data/demo/train.jsonl:
    python data/make_tokenizer.py

The format is LIMA's: one JSON object per line, {"conversations": [user, assistant, user, ...],
"source": "..."}. Training conversations end with an answer; a prompt file for generation may end
with a user turn. A conversation becomes BOS u1 EOT a1 EOT u2 EOT a2 EOT ..., and only the
answers (each with its closing EOT) are trained. A training file may also hold plain text,
{"text": "..."}: pretraining, as the demo's base model learns (data/make_demo.py). It becomes
BOS text EOS, every token trained, as in LLaMA's pretraining; no EOT, which only fine-tuning uses.
"""

import sys

from cli import Parser, at_least, fail


def build_parser() -> Parser:
    p = Parser(prog="data.py", description=__doc__.strip())
    p.add_argument("--data", default="data/demo/train.jsonl", help="a jsonl file in LIMA's format")
    p.add_argument("--tokenizer", default="data/tokenizer.model", help="the sentencepiece model to count tokens with")
    p.add_argument("--max_len", type=at_least(1), default=2048, help="longer conversations are trimmed, as in training")
    p.add_argument("--train_on_prompt", choices=["true", "false"], default="false",
                   help="count the prompts' tokens as trained too")
    p.add_argument("--world_size", type=at_least(1), default=8, help="data-parallel ranks to pack the batches for")
    p.add_argument("--global_batch", type=at_least(1), default=32, help="conversations per optimizer step")
    p.add_argument("--max_tokens", type=at_least(1), default=4096, help="tokens in one packed row per rank")
    p.add_argument("--seed", type=int, default=0, help="the shuffle of the epoch planned")
    return p


# The command line is read before torch is imported (a second or two), so that --help and a
# mistyped option answer at once: all of the above needs only the standard library.
if __name__ == "__main__":
    build_parser().parse_args(sys.argv[1:])

import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from tqdm import tqdm

IGNORE = -100  # a target that is not trained: F.cross_entropy's default ignore_index
EOT_TEXT = "<EOT>"  # how decode() writes the end-of-turn id
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true/false", type(None): "null"}


class DataError(Exception):
    """Bad input: the message is one line naming the file and line, for the CLI to print as is."""


# ---- the tokenizer ----

class Tokenizer:
    """sentencepiece plus LIMA's end-of-turn token (EOT), one new id after the base vocabulary.

    LIMA ends every utterance with a new EOT token rather than the existing EOS: the pretrained
    model already knows EOS as "end of document", and the paper keeps the two meanings apart.
    """

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such tokenizer file")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
        self.n_base = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.eot_id = self.n_base  # the first id past the base vocabulary: the model grows one row
        self.vocab_size = self.n_base + 1

    def encode(self, text: str) -> list[int]:
        """Ids of text, with no BOS and no EOT."""
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        """Text of ids, EOT written as EOT_TEXT, so decode(encode(a) + [eot_id]) == a + EOT_TEXT."""
        # sentencepiece cannot decode an id past its vocabulary, so the ids between EOTs are
        # decoded run by run. Each run also drops the leading space that encode() prefixed to its
        # utterance, so every utterance round-trips on its own.
        parts, run = [], []
        for i in ids:
            if i == self.eot_id:
                parts += [self.sp.decode(run), EOT_TEXT]
                run = []
            else:
                run.append(i)
        return "".join(parts + [self.sp.decode(run)])

    def encode_conversation(self, turns: list[str]) -> tuple[list[int], list[bool]]:
        """BOS u1 EOT a1 EOT ...: the ids, and for each id whether it belongs to an answer."""
        ids, in_answer = [self.bos_id], [False]
        for n, pieces in enumerate(self.sp.encode(list(turns))):  # one batched call
            ids += pieces + [self.eot_id]
            in_answer += [n % 2 == 1] * (len(pieces) + 1)  # odd turns are the assistant's
        return ids, in_answer

    def encode_dialog(self, turns: list[str]) -> list[int]:
        """A prompt for generation: BOS u1 EOT a1 EOT ... uN EOT; the model writes aN and its EOT."""
        if len(turns) % 2 == 0:
            raise ValueError(f"a prompt ends with a user turn; got {len(turns)} turns")
        return self.encode_conversation(turns)[0]


# ---- reading LIMA's jsonl ----

def load_conversations(path, require_answer=True, allow_text=False) -> list[dict]:
    """Read and check a LIMA jsonl file; any problem is a DataError naming the file and line.

    allow_text: plain-text records ({"text": ...}) are accepted too (training files only)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:  # missing, a directory, no permission
        raise DataError(f"{path}: {e.strerror or e}") from None
    records = []
    for n, line in enumerate(raw.split(b"\n"), 1):  # bytes, so bad UTF-8 is found line by line
        if line.strip():  # blank lines hold no conversation (a trailing newline, say)
            records.append(check_record(line, f"{path}:{n}", require_answer, allow_text))
    if not records:
        raise DataError(f"{path}: empty file, no conversations")
    return records


def check_record(line: bytes, where: str, require_answer: bool, allow_text: bool = False) -> dict:
    """One parsed and checked line: {"conversations": [str, ...], "source": str, ...}, or with
    allow_text {"text": str, ...}."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: invalid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {JSON_TYPES[type(record)]}")
    if "text" in record and "conversations" not in record:
        if not allow_text:
            raise DataError(f'{where}: a "text" record (plain text, for pretraining) where a conversation '
                            f'is needed: "conversations": [user, assistant, ...]')
        check_text(record["text"], where, '"text"')
        return record
    if "conversations" not in record:
        raise DataError(f'{where}: missing "conversations"')
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise DataError(f'{where}: "conversations" must be a list of strings, got {JSON_TYPES[type(turns)]}')
    if not turns:
        raise DataError(f'{where}: "conversations" is empty')
    for n, turn in enumerate(turns):
        field = f'"conversations"[{n}] ({"user" if n % 2 == 0 else "assistant"})'
        check_text(turn, where, field)
    if require_answer and len(turns) % 2 == 1:
        raise DataError(f"{where}: ends with a user turn ({len(turns)} turns); a training "
                        f"conversation must end with the assistant's answer")
    if not isinstance(record.get("source", ""), str):
        raise DataError(f'{where}: "source" must be a string, got {JSON_TYPES[type(record["source"])]}')
    return record


def check_text(text, where: str, field: str):
    if not isinstance(text, str):
        raise DataError(f"{where}: {field} must be a string, got {JSON_TYPES[type(text)]}")
    if not text.strip():
        raise DataError(f"{where}: {field} is empty")
    try:
        text.encode("utf-8")  # fails on a lone surrogate like "\ud800": valid JSON, but not text
    except UnicodeEncodeError:
        raise DataError(f"{where}: {field} holds an unpaired surrogate escape, not text") from None


# ---- tokens and labels ----

def tokenize_conversation(tok: Tokenizer, turns: list[str], max_len: int = 2048,
                          train_on_prompt: bool = False) -> tuple[list[int], list[int], bool]:
    """(tokens, targets, trimmed): a conversation as next-token pairs, prompts masked in targets.

    With s = BOS u1 EOT a1 EOT ..., tokens = s[:-1] and targets[t] = s[t+1] where s[t+1] is an
    answer token or the EOT closing an answer, else IGNORE (every target with train_on_prompt).
    The targets are shifted here, not in the loss, so that conversations can be packed end to end
    with no label crossing from one into the next. A conversation longer than max_len keeps its
    first max_len + 1 tokens, which gives max_len pairs.
    """
    ids, in_answer = tok.encode_conversation(turns)
    trimmed = len(ids) > max_len + 1
    ids, in_answer = ids[:max_len + 1], in_answer[:max_len + 1]
    targets = [t if train_on_prompt or answer else IGNORE for t, answer in zip(ids[1:], in_answer[1:])]
    return ids[:-1], targets, trimmed


def tokenize_text(tok: Tokenizer, text: str, max_len: int = 2048) -> tuple[list[int], list[int], bool]:
    """(tokens, targets, trimmed) for plain text: BOS text EOS, every next token trained."""
    ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    trimmed = len(ids) > max_len + 1
    ids = ids[:max_len + 1]
    return ids[:-1], ids[1:], trimmed


def tokenize_record(tok: Tokenizer, record: dict, max_len: int = 2048, train_on_prompt: bool = False):
    """A training record, conversation or plain text, as (tokens, targets, trimmed, untrimmed length)."""
    if "conversations" in record:
        turns = record["conversations"]
        tokens, targets, trimmed = tokenize_conversation(tok, turns, max_len, train_on_prompt)
        return tokens, targets, trimmed, len(tok.encode_conversation(turns)[0]) - 1 if trimmed else len(tokens)
    tokens, targets, trimmed = tokenize_text(tok, record["text"], max_len)
    return tokens, targets, trimmed, len(tok.encode(record["text"])) + 1 if trimmed else len(tokens)


@dataclass
class Dataset:
    """A tokenized file: conversations as read, and one example per conversation, in file order."""
    path: str
    max_len: int
    conversations: list[dict]
    examples: list[dict]  # tokens, targets, n_trained (targets kept), n_dropped (lost to trimming)

    def report(self) -> str:
        """The trimming, in one line: it changes what is trained, so it is never silent."""
        trimmed = [e for e in self.examples if e["n_dropped"]]
        line = (f"{self.path}: trimmed {len(trimmed)} of {len(self.examples)} conversations to "
                f"{self.max_len} tokens ({sum(e['n_dropped'] for e in trimmed):,} tokens dropped)")
        n_empty = sum(e["n_trained"] == 0 for e in self.examples)
        if n_empty:  # the prompt alone filled max_len: the example costs compute and trains nothing
            line += f"; {n_empty} have no answer token left"
        return line


def load_dataset(path, tok: Tokenizer, max_len: int = 2048, train_on_prompt: bool = False,
                 verbose: bool = True) -> Dataset:
    """Read, check and tokenize a training file once; prints the trimming report if verbose."""
    conversations = load_conversations(path, allow_text=True)
    examples = []
    for record in tqdm(conversations, desc=f"tokenizing {path}", unit="record", disable=not verbose, leave=False):
        tokens, targets, trimmed, n_full = tokenize_record(tok, record, max_len, train_on_prompt)
        examples.append(dict(tokens=tokens, targets=targets, n_trained=sum(t != IGNORE for t in targets),
                             n_dropped=n_full - len(tokens)))
    dataset = Dataset(str(path), max_len, conversations, examples)
    if not any(e["n_trained"] for e in examples):  # the loss would be divided by zero tokens
        raise DataError(f"{path}: every answer is trimmed away at --max_len {max_len} (the prompts fill it): "
                        f"nothing to train on; raise --max_len")
    if verbose:
        print(dataset.report())
        no_source = sum("source" not in c for c in conversations)
        if no_source:  # LIMA's records name where they come from; the ablations select by it
            print(f'{path}: {no_source} of {len(conversations)} conversations have no "source"')
    return dataset


# ---- batches: packed rows, the same number of micro-steps on every rank ----
#
# LIMA's conversations run from a few dozen tokens to 2,048, so padding a random micro-batch to
# its longest row wastes a third to a half of the compute, and ranks given unequal work wait for
# the slowest at every collective. Here nothing is padded: a rank's micro-step is one row of
# whole conversations laid end to end (B=1), kept apart by attending within each conversation
# only (model.packed_attention), and the rows of a global batch are spread so that all ranks
# carry similar loads.

def pack_batch(lengths: list[int], world_size: int, max_tokens: int) -> list[list[list[int]]]:
    """Share out one global batch: rows[rank][micro_step] = indices into lengths packed in that row.

    Every rank gets the same number k of micro-steps, as FSDP ranks must run forward and backward
    in lockstep. k is the smallest count for which longest-first placement into the least loaded
    of world_size * k rows of max_tokens succeeds: few, long rows balance best and all-gather the
    weights least often. The rows are then sorted by size and step j takes rows j*W .. j*W+W-1,
    so that rows of similar size wait for each other. A row may be empty (fewer examples than
    ranks): collate() turns it into a row that trains nothing.
    """
    if lengths and max(lengths) > max_tokens:
        raise ValueError(f"a {max(lengths)}-token example does not fit in a row of --max_tokens {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))  # ties by index: same on every rank
    k = max(1, math.ceil(sum(lengths) / (world_size * max_tokens)))
    while (rows := place_longest_first(order, lengths, world_size * k, max_tokens)) is None:
        k += 1  # ends by k = ceil(n / world_size) at the latest: then every example has a row of its own
    even_out(rows, lengths)
    rows.sort(key=lambda row: -sum(lengths[i] for i in row))  # stable: deterministic
    return [[rows[step * world_size + rank] for step in range(k)] for rank in range(world_size)]


def place_longest_first(order: list[int], lengths: list[int], n_rows: int, max_tokens: int):
    """Put each example, longest first, into the least loaded row; None if one does not fit."""
    rows, loads = [[] for _ in range(n_rows)], [0] * n_rows
    for i in order:
        r = min(range(n_rows), key=loads.__getitem__)  # the first of the least loaded
        if loads[r] + lengths[i] > max_tokens:
            return None
        rows[r].append(i)
        loads[r] += lengths[i]
    return rows


def even_out(rows: list[list[int]], lengths: list[int]):
    """Swap examples between rows, in place, until no single swap brings two rows closer in load.

    Longest-first placement can leave a row up to a whole example above the mean: on LIMA's
    batches of 32 over 8 ranks it wastes 2.5%, and 0.7% after this. For each pair of rows this
    takes the swap (or move)
    that best halves their gap; it moves 0 < d < gap tokens to the lighter row, so neither row
    passes the heavier one's load (or max_tokens), the sum of squared loads falls, and it ends.
    """
    loads = [sum(lengths[i] for i in row) for row in rows]
    improved = True
    while improved:
        improved = False
        for i, j in itertools.permutations(range(len(rows)), 2):
            gap = loads[i] - loads[j]
            if gap <= 1:
                continue
            # d: tokens moved from row i to row j by sending a there and b (None: nothing) back
            d, a, b = min(((lengths[a] - (lengths[b] if b is not None else 0), a, b)
                           for a in rows[i] for b in rows[j] + [None]), key=lambda c: abs(gap - 2 * c[0]))
            if 0 < d < gap:
                rows[i].remove(a)
                rows[j].append(a)
                if b is not None:
                    rows[j].remove(b)
                    rows[i].append(b)
                loads[i], loads[j] = loads[i] - d, loads[j] + d
                improved = True


def packing_cost(packing: list[list[list[int]]], lengths: list[int]) -> tuple[int, int]:
    """(real tokens, tokens paid for): at every micro-step each rank waits for the longest row.

    The waste of a packing is 1 - real / paid. With no padding it is purely that lockstep wait.
    """
    world_size, n_steps = len(packing), len(packing[0])
    real = sum(lengths[i] for rows in packing for row in rows for i in row)
    paid = sum(world_size * max(max(sum(lengths[i] for i in rows[step]), 1) for rows in packing)
               for step in range(n_steps))  # an empty row still runs its 1-token stand-in
    return real, paid


def collate(examples: list[dict], idxs: list[int]) -> dict:
    """One packed row: tokens, targets, positions each (1, L) int64, and doc_lens.

    positions restart at 0 for each conversation (RoPE sees every conversation as if alone);
    doc_lens, the conversations' lengths in order (a list of ints, summing to L), tell the model
    where each one ends, so that attention stays inside it.
    """
    if not idxs:
        # A rank with no example at this micro-step still runs forward and backward with the
        # others; with every target IGNORE its loss and gradient are zero.
        row = dict(tokens=[0], targets=[IGNORE], positions=[0])
    else:
        row = dict(tokens=[], targets=[], positions=[])
        for i in idxs:
            n = len(examples[i]["tokens"])
            row["tokens"] += examples[i]["tokens"]
            row["targets"] += examples[i]["targets"]
            row["positions"] += range(n)
    batch = {k: torch.tensor([v], dtype=torch.int64) for k, v in row.items()}  # (1, L)
    batch["doc_lens"] = [len(examples[i]["tokens"]) for i in idxs] or [1]
    return batch


class Batches:
    """The training order: a seeded shuffle per epoch, cut into global batches, each planned.

    It holds no state: the order of epoch e is a pure function of (seed, e), the same on every
    rank with nothing to broadcast, and (epoch, step) is the whole position. Resuming at that
    position, even on a different number of ranks, replays exactly the same examples.
    """

    def __init__(self, lengths: list[int], global_batch: int = 32, world_size: int = 1,
                 max_tokens: int = 4096, seed: int = 0):
        if max(lengths) > max_tokens:
            raise ValueError(f"the longest example has {max(lengths)} tokens, more than --max_tokens "
                             f"{max_tokens}: raise --max_tokens or lower --max_len")
        self.lengths, self.global_batch, self.world_size = list(lengths), global_batch, world_size
        self.max_tokens, self.seed = max_tokens, seed
        self.steps_per_epoch = math.ceil(len(lengths) / global_batch)  # the last, smaller batch is kept

    def global_batch_indices(self, epoch: int, step: int) -> list[int]:
        """The examples of one optimizer step, over all ranks."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} of an epoch of {self.steps_per_epoch} steps")
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
        return order[step * self.global_batch:(step + 1) * self.global_batch].tolist()

    def rows(self, epoch: int, step: int) -> list[list[list[int]]]:
        """rows[rank][micro_step] = the example indices packed into that rank's row."""
        idxs = self.global_batch_indices(epoch, step)
        packing = pack_batch([self.lengths[i] for i in idxs], self.world_size, self.max_tokens)
        return [[[idxs[j] for j in row] for row in rows] for rows in packing]


# ---- python data.py: a summary of a file ----

def least_paid(lengths: list[int], world_size: int) -> int:
    """A floor on packing_cost's paid tokens for one batch, however it is packed: some rank runs the
    longest example, and the ranks between them run every token."""
    return world_size * max(max(lengths, default=1), math.ceil(sum(lengths) / world_size))


def summary(ds: Dataset, world_size: int, global_batch: int, max_tokens: int, seed: int) -> str:
    """Counts, trimming, the length distribution, and the waste of its packing over epoch 0."""
    turns = [len(c["conversations"]) for c in ds.conversations if "conversations" in c]
    n_texts = len(ds.conversations) - len(turns)
    sources = Counter(c.get("source", "(none)") for c in ds.conversations)
    full = np.array([len(e["tokens"]) + 1 + e["n_dropped"] for e in ds.examples])  # BOS ... last EOT
    positions = sum(len(e["tokens"]) for e in ds.examples)
    trained = sum(e["n_trained"] for e in ds.examples)
    stats = [("min", full.min()), ("p10", np.percentile(full, 10)), ("median", np.median(full)),
             ("mean", full.mean()), ("p90", np.percentile(full, 90)), ("max", full.max())]
    lines = [
        f"{ds.path}: {len(turns)} conversations ({sum(t > 2 for t in turns)} multi-turn), {sum(turns)} turns; "
        + (f"{n_texts} plain texts; " if n_texts else "") + "sources: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())),
        f"tokens: {full.sum():,} (BOS, then each utterance and its EOT); after trimming {positions:,} "
        f"training positions, {trained:,} of them trained ({trained / positions:.1%}: answers and their EOT)",
        ds.report(),
        "length in tokens: " + "  ".join(f"{k} {v:,.0f}" for k, v in stats)
        + f"; over {ds.max_len}: {(full - 1 > ds.max_len).sum()}",
    ]
    width = 64
    while full.max() / width > 16:  # at most 16 bars
        width *= 2
    counts = np.bincount(full // width)
    for b, n in enumerate(counts[full.min() // width:], full.min() // width):
        lines.append(f"  {b * width:5d}-{(b + 1) * width - 1:5d} | {'#' * math.ceil(50 * n / counts.max()):50s} {n}")

    lengths = [len(e["tokens"]) for e in ds.examples]
    batches = Batches(lengths, global_batch, world_size, max_tokens, seed)
    real = paid = floor = micro_steps = 0
    for step in range(batches.steps_per_epoch):
        rows = batches.rows(0, step)
        r, p = packing_cost(rows, lengths)
        real, paid, micro_steps = real + r, paid + p, micro_steps + len(rows[0])
        floor += least_paid([lengths[i] for i in batches.global_batch_indices(0, step)], world_size)
    lines += [f"batching, epoch 0: {batches.steps_per_epoch} global batches of {global_batch} on {world_size} "
              f"rank(s), rows of at most {max_tokens} tokens, {micro_steps / batches.steps_per_epoch:.2f} "
              f"micro-steps per rank per batch",
              f"  waste {1 - real / paid:.1%}: ranks waiting for each other in lockstep (nothing is padded); "
              f"the least any packing of the same batches can waste is {1 - real / floor:.1%}"]
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        ds = load_dataset(args.data, Tokenizer(args.tokenizer), args.max_len, args.train_on_prompt == "true",
                          verbose=False)
        print(summary(ds, args.world_size, args.global_batch, args.max_tokens, args.seed))
    except (DataError, ValueError) as e:
        fail(e)


if __name__ == "__main__":
    main()
