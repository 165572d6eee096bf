"""data.py: token ids and label masks, packing that leaves every loss unchanged, the epoch order,
and a one-line error for every kind of bad input. Only the project's own files are read."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
from data import (EOT_TEXT, IGNORE, Batches, DataError, Tokenizer, collate, least_paid, load_conversations,
                  load_dataset, pack_batch, packing_cost, tokenize_conversation)

ROOT = Path(__file__).resolve().parents[1]
TRAIN, DEV = ROOT / "data/demo/train.jsonl", ROOT / "data/demo/dev.jsonl"
sys.path.insert(0, str(ROOT / "data"))
import make_demo  # noqa: E402  (data/make_demo.py: the script that writes the demo's files)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(ROOT / "data/tokenizer.model")


# ---- the tokenizer ----

def test_eot_is_a_new_id_after_the_base_vocabulary(tok):
    assert (tok.n_base, tok.bos_id, tok.eos_id) == (1024, 1, 2)  # Meta's special ids
    assert tok.eot_id == tok.n_base and tok.vocab_size == tok.n_base + 1
    assert tok.eot_id != tok.eos_id
    assert tok.eot_id not in tok.encode(f"a literal {EOT_TEXT} in a text is just text")


@pytest.mark.parametrize("text", ["How do I make a good cup of tea?", "Line one.\nLine two:\n\n- 3 × 4 = 12 °C",
                                  "  leading spaces, trailing  ", "émigré naïve Ω 🙂", "\tx"])
def test_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(text) + [tok.eot_id] + tok.encode("Answer.") + [tok.eot_id]
    assert tok.decode(ids) == text + EOT_TEXT + "Answer." + EOT_TEXT
    assert tok.decode([tok.bos_id] + ids) == tok.decode(ids)  # BOS writes nothing


def test_encode_dialog_ends_with_the_users_eot(tok):
    u1, a1, u2 = "Hi there.", "Hello! How can I help?", "Tell me a joke."
    E = tok.eot_id
    expected = [tok.bos_id] + tok.encode(u1) + [E] + tok.encode(a1) + [E] + tok.encode(u2) + [E]
    assert tok.encode_dialog([u1, a1, u2]) == expected
    with pytest.raises(ValueError):
        tok.encode_dialog([u1, a1])  # a prompt ends with the user, the model answers


# ---- tokens and labels ----

def expected_pair(tok, turns, train_on_prompt=False):
    """The definition, written out: s = BOS u1 EOT a1 EOT ...; predict s[t+1] from s[:t+1]."""
    s, trained = [tok.bos_id], [False]
    for n, turn in enumerate(turns):
        ids = tok.encode(turn) + [tok.eot_id]
        s += ids
        trained += [n % 2 == 1 or train_on_prompt] * len(ids)
    return s[:-1], [s[t + 1] if trained[t + 1] else IGNORE for t in range(len(s) - 1)]


def test_single_turn_ids_and_mask(tok):
    u, a = "What is 2 + 2?", "2 + 2 = 4."
    tokens, targets, trimmed = tokenize_conversation(tok, [u, a])
    nu, na, E = len(tok.encode(u)), len(tok.encode(a)), tok.eot_id
    # tokens: BOS u EOT a; targets: nothing for BOS's and u's successors, then a and its EOT
    assert tokens == [tok.bos_id] + tok.encode(u) + [E] + tok.encode(a)
    assert targets == [IGNORE] * (nu + 1) + tok.encode(a) + [E]
    assert len(tokens) == len(targets) == nu + na + 2 and not trimmed
    assert (tokens, targets) == expected_pair(tok, [u, a])


def test_multi_turn_ids_and_mask(tok):
    turns = ["Name a prime.", "7 is prime.", "And an even one?", "2 is the only even prime."]
    tokens, targets, trimmed = tokenize_conversation(tok, turns)
    assert (tokens, targets) == expected_pair(tok, turns) and not trimmed
    E = tok.eot_id
    n = [len(tok.encode(t)) for t in turns]
    eot_positions = [i for i, t in enumerate(tokens) if t == E]  # the last EOT is only a target
    assert eot_positions == [n[0] + 1, n[0] + n[1] + 2, n[0] + n[1] + n[2] + 3]
    trained_eots = [i for i, t in enumerate(targets) if t == E]  # each answer's EOT, never a user's
    assert trained_eots == [eot_positions[1] - 1, len(targets) - 1]
    assert sum(t != IGNORE for t in targets) == n[1] + n[3] + 2


def test_train_on_prompt_keeps_every_target(tok):
    turns = ["Name a prime.", "7 is prime.", "And an even one?", "2."]
    tokens, targets, _ = tokenize_conversation(tok, turns, train_on_prompt=True)
    assert targets == tokens[1:] + [tok.eot_id] and IGNORE not in targets
    assert (tokens, targets) == expected_pair(tok, turns, train_on_prompt=True)


def test_trimming_at_the_limit(tok):
    turns = ["Count to five.", "One, two, three, four, five."]
    full_tokens, full_targets = expected_pair(tok, turns)
    T = len(full_tokens)
    assert tokenize_conversation(tok, turns, max_len=T) == (full_tokens, full_targets, False)  # fits exactly
    for max_len in (T - 1, T - 5, 3):
        tokens, targets, trimmed = tokenize_conversation(tok, turns, max_len=max_len)
        assert trimmed and len(tokens) == len(targets) == max_len
        assert tokens == full_tokens[:max_len] and targets == full_targets[:max_len]


def test_trimming_is_reported(tok, tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    rows = [["Short?", "Yes."], ["Tell me a long story. " * 20, "Once upon a time. " * 40], ["Hi " * 80, "Hello."]]
    path.write_text("".join(json.dumps({"conversations": r, "source": "test"}) + "\n" for r in rows))
    ds = load_dataset(path, tok, max_len=40, verbose=True)
    dropped = sum(len(expected_pair(tok, r)[0]) - 40 for r in rows[1:])
    assert capsys.readouterr().out.strip() == (f"{path}: trimmed 2 of 3 conversations to 40 tokens "
                                               f"({dropped:,} tokens dropped); 2 have no answer token left")
    assert [e["n_dropped"] > 0 for e in ds.examples] == [False, True, True]
    assert [len(e["tokens"]) for e in ds.examples][1:] == [40, 40]


def test_the_demo_data_is_what_make_demo_writes(tok):
    """data/demo/*.jsonl are data/make_demo.py's output, and the dev set really is held out: no
    fine-tuning conversation names a dev person, and pretraining states every dev fact."""
    texts = make_demo.make_texts()
    for name in ("pretrain", "train", "dev"):
        assert load_conversations(ROOT / f"data/demo/{name}.jsonl", allow_text=True) == texts[name]
    train, dev, pretrain = texts["train"], texts["dev"], [r["text"] for r in texts["pretrain"]]
    assert len(train) == 144 and sum(len(c["conversations"]) > 2 for c in train) == 48 and len(dev) == 48
    taught = " ".join(turn for c in train for turn in c["conversations"])
    for r in dev:
        assert r["name"] not in taught
        assert r["conversations"][1].startswith(r["name"]) and r["value"] in r["conversations"][1]
        about = [t for t in pretrain if r["name"] in t]
        assert len(about) == make_demo.BIOS_PER_PERSON and all(r["value"] in t for t in about)
    ds = load_dataset(TRAIN, tok, verbose=False)
    assert all(e["n_trained"] > 0 and e["n_dropped"] == 0 for e in ds.examples)
    for c, e in zip(ds.conversations, ds.examples):
        assert tok.decode(e["tokens"] + [e["targets"][-1]]) == EOT_TEXT.join(c["conversations"]) + EOT_TEXT


def test_the_demo_tokenizer_is_what_make_demo_learns():
    """data/tokenizer.model (and the base's copy) is sentencepiece's, learnt again here from the texts."""
    learnt = make_demo.make_tokenizer(make_demo.tokenizer_texts(make_demo.make_texts()))
    assert learnt == (ROOT / "data/tokenizer.model").read_bytes() == (ROOT / "data/base/tokenizer.model").read_bytes()


def test_plain_text_records_train_every_token(tok, tmp_path):
    """{"text": ...} is pretraining: BOS text EOS, every next token a target, trimmed like a conversation."""
    path = tmp_path / "mixed.jsonl"
    records = [{"text": "Ada Brevik works as a potter."}, {"conversations": ["Hi?", "Hello."]}, {"text": "x " * 100}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = load_dataset(path, tok, max_len=40, verbose=False)
    ids = [tok.bos_id] + tok.encode(records[0]["text"]) + [tok.eos_id]
    assert ds.examples[0]["tokens"] == ids[:-1] and ds.examples[0]["targets"] == ids[1:]
    assert ds.examples[1]["targets"][:len(tok.encode("Hi?")) + 1] == [IGNORE] * (len(tok.encode("Hi?")) + 1)
    assert len(ds.examples[2]["tokens"]) == 40 and ds.examples[2]["n_dropped"] == len(tok.encode("x " * 100)) + 2 - 41
    with pytest.raises(DataError, match=r'mixed.jsonl:1: a "text" record \(plain text, for pretraining\) where a '
                                        r'conversation is needed'):
        load_conversations(path, require_answer=False)  # a prompt file for sample.py or eval.py
    path.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match=r'mixed.jsonl:1: "text" is empty'):
        load_dataset(path, tok, verbose=False)


# ---- packing: the same losses as one conversation at a time ----

class TinyCausalLM(torch.nn.Module):
    """One attention layer that sees only earlier tokens of the same conversation (doc_lens),
    at positions counted from the conversation's start: all a packed row needs of a model.
    It builds the block-diagonal causal mask that model.py avoids building."""

    def __init__(self, vocab_size, dim=16, max_pos=512):
        super().__init__()
        self.tok_emb = torch.nn.Embedding(vocab_size, dim)
        self.pos_emb = torch.nn.Embedding(max_pos, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, vocab_size)

    def forward(self, tokens, positions, doc_lens, doc_mask=True):
        x = self.tok_emb(tokens) + self.pos_emb(positions)  # (1, L, D)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (1, L, D)
        L = tokens.size(1)
        mask = torch.ones(L, L, dtype=torch.bool).tril()[None]  # (1, L, L): causal
        if doc_mask:
            doc_ids = torch.repeat_interleave(torch.arange(len(doc_lens)), torch.tensor(doc_lens))[None]
            mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
        att = (q @ k.transpose(1, 2) / math.sqrt(q.size(-1))).masked_fill(~mask, float("-inf"))
        return self.out(x + att.softmax(-1) @ v)  # (1, L, V)


def token_losses(model, batch, **kw):
    logits = model(batch["tokens"], batch["positions"], batch["doc_lens"], **kw)
    return F.cross_entropy(logits[0], batch["targets"][0], ignore_index=IGNORE, reduction="none")  # (L,)


def test_packed_losses_equal_one_at_a_time(tok):
    examples = load_dataset(TRAIN, tok, max_len=120, verbose=False).examples[:12]
    lengths = [len(e["tokens"]) for e in examples]
    torch.manual_seed(0)
    model = TinyCausalLM(tok.vocab_size).double()
    alone = [token_losses(model, collate(examples, [i])) for i in range(len(examples))]
    packing = pack_batch(lengths, world_size=2, max_tokens=300)
    assert sorted(i for rows in packing for row in rows for i in row) == list(range(len(examples)))
    assert max(len(row) for rows in packing for row in rows) > 1  # something really is packed
    for row in (row for rows in packing for row in rows):
        batch = collate(examples, row)
        packed = token_losses(model, batch)
        torch.testing.assert_close(packed, torch.cat([alone[i] for i in row]), rtol=1e-12, atol=1e-12)
        if len(row) > 1:  # without the document mask, later conversations would see earlier ones
            assert not torch.allclose(token_losses(model, batch, doc_mask=False), packed)
    # The loss over the global batch, summed and divided by its trained tokens, is the same too.
    n_trained = sum(e["n_trained"] for e in examples)
    packed_loss = sum(token_losses(model, collate(examples, row)).sum() for rows in packing for row in rows)
    torch.testing.assert_close(packed_loss / n_trained, torch.cat(alone).sum() / n_trained)


def test_collate_layout():
    examples = [dict(tokens=[5, 6, 7], targets=[IGNORE, 7, 8]), dict(tokens=[9, 10], targets=[10, 11])]
    batch = collate(examples, [1, 0])
    assert batch["tokens"].tolist() == [[9, 10, 5, 6, 7]] and batch["tokens"].dtype == torch.int64
    assert batch["targets"].tolist() == [[10, 11, IGNORE, 7, 8]]
    assert batch["positions"].tolist() == [[0, 1, 0, 1, 2]]
    assert batch["doc_lens"] == [2, 3]


def test_an_empty_row_runs_and_trains_nothing(tok):
    batch = collate([], [])
    assert batch["tokens"].shape == (1, 1) and batch["targets"].tolist() == [[IGNORE]] and batch["doc_lens"] == [1]
    model = TinyCausalLM(tok.vocab_size)
    loss = token_losses(model, batch).sum()
    loss.backward()
    assert loss.item() == 0 and all(p.grad is None or not p.grad.any() for p in model.parameters())


# ---- packing the batches into rows ----

def lima_like_lengths(n, seed):
    """Lengths shaped like LIMA's with Meta's tokenizer: median ~490, long tail, trimmed at 2048."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(490), 0.85, n), 20, 2048).astype(int).tolist()


@pytest.mark.parametrize("world_size", [1, 2, 8, 16])
def test_packing_is_complete_lockstep_and_fits(world_size):
    for seed in range(10):
        lengths = lima_like_lengths(32, seed)
        packing = pack_batch(lengths, world_size, max_tokens=4096)
        assert len(packing) == world_size
        assert len({len(rows) for rows in packing}) == 1  # every rank runs the same number of micro-steps
        assert sorted(i for rows in packing for row in rows for i in row) == list(range(32))
        assert all(sum(lengths[i] for i in row) <= 4096 for rows in packing for row in rows)
        assert packing == pack_batch(list(lengths), world_size, 4096)  # a pure function: every rank agrees


def test_packing_wastes_little_beyond_the_floor():
    # On 8 ranks a LIMA-sized batch fits one row per rank; the waste is the ranks' imbalance.
    real = paid = floor = 0
    for seed in range(20):
        lengths = lima_like_lengths(32, seed)
        r, p = packing_cost(pack_batch(lengths, 8, 4096), lengths)
        real, paid, floor = real + r, paid + p, floor + least_paid(lengths, 8)
    assert 1 - real / paid < 0.03 and paid / floor < 1.01


def test_packing_with_fewer_examples_than_ranks():
    packing = pack_batch([300, 200, 100], world_size=8, max_tokens=512)
    assert [len(rows) for rows in packing] == [1] * 8
    assert sum(not rows[0] for rows in packing) == 5  # five ranks get a stand-in row (see collate)
    assert packing_cost(packing, [300, 200, 100]) == (600, 8 * 300)


def test_packing_rejects_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="max_tokens"):
        pack_batch([100, 5000], 2, 4096)


# ---- the epoch order ----

def test_every_rank_sees_the_same_order_and_each_example_once():
    lengths = lima_like_lengths(101, seed=1)
    world_size = 4
    for epoch in range(3):
        seen = []
        for step in range(Batches(lengths, 32, world_size, seed=7).steps_per_epoch):
            # Each rank builds its own Batches (in its own process) and keeps packing[rank].
            mine = [Batches(lengths, 32, world_size, 4096, seed=7).rows(epoch, step)[rank] for rank in range(world_size)]
            assert len({len(rows) for rows in mine}) == 1
            idxs = Batches(lengths, 32, world_size, 4096, seed=7).global_batch_indices(epoch, step)
            assert sorted(i for rows in mine for row in rows for i in row) == sorted(idxs)
            seen += idxs
        assert sorted(seen) == list(range(101))  # 4 steps: 32, 32, 32 and the last 5 kept
    b = Batches(lengths, 32, world_size, seed=7)
    assert b.steps_per_epoch == 4 and len(b.global_batch_indices(0, 3)) == 5
    assert b.global_batch_indices(0, 0) != b.global_batch_indices(1, 0)  # a new shuffle each epoch
    assert b.global_batch_indices(0, 0) != Batches(lengths, 32, world_size, seed=8).global_batch_indices(0, 0)


def test_order_is_the_same_in_another_process():
    """No hidden state (a hash seed, a global RNG) leaks into the order or the packing."""
    lengths = lima_like_lengths(101, seed=1)
    code = ("import json, sys; from data import Batches; "
            "b = Batches(json.loads(sys.argv[1]), 32, 4, 4096, seed=7); "
            "print(json.dumps([b.rows(e, s) for e in range(2) for s in range(b.steps_per_epoch)]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(lengths)], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    torch.manual_seed(99)
    np.random.seed(99)  # the global RNGs must not matter
    b = Batches(lengths, 32, 4, 4096, seed=7)
    assert json.loads(out.stdout) == [b.rows(e, s) for e in range(2) for s in range(b.steps_per_epoch)]


def test_resume_mid_epoch_replays_exactly():
    lengths = lima_like_lengths(101, seed=2)
    first = Batches(lengths, 16, 2, seed=3)
    run = [(e, s, first.rows(e, s)) for e in range(3) for s in range(first.steps_per_epoch)]
    stop = 9  # stopped after 9 steps: epoch 1, step 2 is next
    epoch, step = divmod(stop, first.steps_per_epoch)
    resumed = Batches(lengths, 16, 2, seed=3)  # a new process: nothing carried over but (epoch, step)
    rest = []
    while epoch < 3:
        rest.append((epoch, step, resumed.rows(epoch, step)))
        epoch, step = divmod(epoch * resumed.steps_per_epoch + step + 1, resumed.steps_per_epoch)
    assert rest == run[stop:]
    # Resumed on another number of ranks, the same examples make up each optimizer step.
    wider = Batches(lengths, 16, 8, seed=3)
    assert all(wider.global_batch_indices(e, s) == first.global_batch_indices(e, s) for e, s, _ in run)


# ---- bad input: one line naming file and line, never a traceback ----

BAD = [
    (b'{"conversations": ["q", "a"]}\n{"conversations": ["q", "a"\n', ":2: invalid JSON"),
    (b'["q", "a"]\n', ":1: expected a JSON object, got an array"),
    (b'{"source": "x"}\n', ':1: missing "conversations"'),
    (b'{"conversations": {"q": "a"}}\n', ':1: "conversations" must be a list of strings, got an object'),
    (b'{"conversations": "q"}\n', ':1: "conversations" must be a list of strings, got a string'),
    (b'{"conversations": []}\n', ':1: "conversations" is empty'),
    (b'{"conversations": ["q", 4]}\n', ':1: "conversations"[1] (assistant) must be a string, got a number'),
    (b'{"conversations": [null, "a"]}\n', ':1: "conversations"[0] (user) must be a string, got null'),
    (b'{"conversations": ["q", " \\n "]}\n', ':1: "conversations"[1] (assistant) is empty'),
    (b'\n{"conversations": ["q", "a", "q2"]}\n', ":2: ends with a user turn (3 turns)"),
    (b'{"conversations": ["caf\xe9", "a"]}\n', ":1: invalid UTF-8 (byte 0xe9 at column 24)"),
    (b'{"conversations": ["\\ud800", "a"]}\n', ':1: "conversations"[0] (user) holds an unpaired surrogate'),
    (b'{"conversations": ["q", "a"], "source": 3}\n', ':1: "source" must be a string, got a number'),
    (b"", ": empty file, no conversations"),
    (b"\n  \n", ": empty file, no conversations"),
]


@pytest.mark.parametrize("content,message", BAD, ids=[m.split(": ", 1)[-1][:30] for _, m in BAD])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert str(e.value).startswith(f"{path}{message}") and "\n" not in str(e.value)


def test_prompts_may_end_with_a_user_turn(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"conversations": ["Hi?"]}\n{"conversations": ["q", "a", "q2"], "id": 7}\n')
    records = load_conversations(path, require_answer=False)
    assert [r["conversations"] for r in records] == [["Hi?"], ["q", "a", "q2"]] and records[1]["id"] == 7
    assert load_conversations(TRAIN)[0]["source"] == "demo"  # other fields are kept


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        load_conversations(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no such tokenizer"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")


def test_cli_summary_and_errors(tmp_path, capsys):
    data.main(["--data", str(TRAIN), "--tokenizer", str(ROOT / "data/tokenizer.model"), "--world_size", "8"])
    out = capsys.readouterr().out
    for expected in ["144 conversations (48 multi-turn)", "trimmed 0 of 144 conversations to 2048 tokens",
                     "length in tokens: min", "global batches of 32 on 8 rank(s)", "waste"]:
        assert expected in out
    data.main(["--data", str(ROOT / "data/demo/pretrain.jsonl"), "--world_size", "1"])
    assert "0 conversations (0 multi-turn), 0 turns; 3840 plain texts; sources: demo-facts 3840" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": ["q", "a"]}\n{"conversations": ["only a question"]}\n')
    with pytest.raises(SystemExit) as e:
        data.main(["--data", str(bad), "--tokenizer", str(ROOT / "data/tokenizer.model")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {bad}:2: ends with a user turn")
