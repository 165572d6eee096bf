"""sample.py: each decoding step against hand-computed cases, seeded sampling against the intended
distribution, cached decoding against full recomputation, stopping, 2-rank tensor parallelism
against one process, and the command line's modes and errors."""

import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sample
from checkpoint import load_model
from data import Tokenizer
from model import ModelArgs, Transformer
from sample import (Settings, apply_repetition_penalty, decode, generate, next_token, top_k_filter, top_p_filter,
                    uniforms)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer.model"
GREEDY = Settings(temperature=0, max_len=48)
NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER)


def tiny_model(vocab_size: int, seed=0, max_seq_len=128) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                                  multiple_of=16, max_seq_len=max_seq_len))
    model.init_weights()
    # Random init gives near-uniform logits; sharpen them so that greedy choices have clear
    # winners and no near-tie can flip between two equally correct ways of computing them.
    with torch.no_grad():
        model.output.weight *= 30
    return model.eval()


def save_checkpoint(model: Transformer, path: Path) -> Path:
    """A converted directory as convert.py writes it: params.json, model.pth, tokenizer.model."""
    path.mkdir(parents=True)
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len")
    (path / "params.json").write_text(json.dumps({k: getattr(model.args, k) for k in keys}))
    torch.save(model.state_dict(), path / "model.pth")
    shutil.copy(TOKENIZER, path / "tokenizer.model")
    return path


def stopping_model(tok) -> Transformer:
    """A random model whose answers end with EOT after 20 tokens or so, like a fine-tuned one's."""
    model = tiny_model(tok.vocab_size)
    with torch.no_grad():
        # Every token's embedding carries a large constant feature that only EOT's output row
        # reads: after the final norm it is about 8, and the other logits are near 0, so EOT's
        # logit 8c at temperature 0.7 gives it a chance of about 1 in 20 at each step.
        model.tok_embeddings.weight[:, 0] = 8.0
        model.output.weight[:, 0] = 0.0
        model.output.weight[tok.eot_id, 0] = 0.7 / 8 * math.log(tok.vocab_size / 19)
    return model


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory):
    return save_checkpoint(stopping_model(tok), tmp_path_factory.mktemp("ckpt") / "tiny")


def prompts_for(tok, questions):
    return [tok.encode_dialog([q]) for q in questions]


QUESTIONS = ["Write a haiku about the sea.", "Why?", "Tell me how the wind and the light make waves at night."]


# ---- the decoding steps, by hand ----

def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5, -3.0, 0.0]]))
    # LIMA's 1.2: 2 / 1.2 and -1 * 1.2; a penalty of 1 changes nothing.
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.2), torch.tensor([[5 / 3, -1.2, 0.5, -3.0, 0.0]]))
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_top_p_keeps_the_smallest_nucleus_and_every_token_tied_at_its_edge():
    logits = torch.tensor([0.5, 0.2, 0.2, 0.1]).log().expand(4, 4)
    kept = top_p_filter(logits, 0.45) > NEG_INF
    assert kept[0].tolist() == [True, False, False, False]  # 0.5 alone covers 0.45
    kept = top_p_filter(logits, 0.6) > NEG_INF
    # 0.5 + 0.2 covers 0.6 with either 0.2; the two are tied, so both are kept.
    assert kept[0].tolist() == [True, True, True, False]
    assert (top_p_filter(logits, 0.75) > NEG_INF)[0].tolist() == [True, True, True, False]
    assert (top_p_filter(logits, 0.95) > NEG_INF)[0].tolist() == [True, True, True, True]


def test_top_p_works_row_by_row_and_respects_earlier_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, NEG_INF],  # probs .665 .245 .090 0
                           [0.0, 0.0, 0.0, 0.0]])  # uniform: all tied
    kept = top_p_filter(logits, 0.8) > NEG_INF
    assert kept.tolist() == [[True, True, False, False], [True, True, True, True]]
    # Kept logits are unchanged: the later softmax renormalises over the nucleus.
    assert torch.equal(top_p_filter(logits, 0.8)[0, :2], logits[0, :2])


def nucleus_by_full_sort(logits: torch.Tensor, p: float) -> torch.Tensor:
    """The definition, one row at a time over the whole sorted vocabulary: the likeliest tokens
    until their mass reaches p, and every token tied with the last one taken."""
    keep = torch.zeros(logits.shape, dtype=torch.bool)
    for b, row in enumerate(logits.softmax(-1)):
        values = row.sort(descending=True).values
        n = int((values.cumsum(0) - values < p).sum())
        keep[b] = row >= values[n - 1]
    return keep


@pytest.mark.parametrize("scale, wide", [(0.01, True), (0.5, True), (3.0, True), (10.0, False)])
def test_top_p_over_a_real_vocabulary_equals_the_full_sort(scale, wide):
    """top_p_filter looks among the likeliest TOP_P_CANDIDATES first on the CPU; whether the
    nucleus is inside them (peaked logits) or not (flat ones: it sorts everything), it keeps
    exactly what sorting all 32,001 keeps."""
    torch.manual_seed(0)
    logits = torch.randn(6, 32001) * scale
    logits[1, :5] = 100.0  # five tokens tied at the top hold nearly all the mass
    kept = top_p_filter(logits, 0.9) > NEG_INF
    assert torch.equal(kept, nucleus_by_full_sort(logits, 0.9))
    assert (kept.sum(-1).max() > sample.TOP_P_CANDIDATES) == wide  # both paths are taken
    assert kept[1].tolist()[:6] == [True] * 5 + [False]


def test_top_k_keeps_the_k_largest_and_ties_with_the_kth():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, -1.0]])
    assert (top_k_filter(logits, 2) > NEG_INF).tolist() == [[False, True, False, True, False]]
    assert (top_k_filter(logits, 3) > NEG_INF).tolist() == [[False, True, True, True, False]]
    assert (top_k_filter(logits, 9) > NEG_INF).all()


def test_seeded_sampling_matches_the_intended_distribution():
    """200,000 draws with LIMA's settings against the distribution worked out by hand."""
    logits = torch.tensor([1.5, 1.0, 0.5, -1.0, -3.0])
    seen = torch.tensor([False, True, False, True, False])
    # By hand: penalise the seen tokens (1 / 1.2, -1 * 1.2), divide by 0.7, softmax, then keep
    # the likeliest tokens until their mass reaches 0.9 and renormalise over them.
    z = [1.5, 1.0 / 1.2, 0.5, -1.0 * 1.2, -3.0]
    e = [math.exp(v / 0.7) for v in z]
    q = [v / sum(e) for v in e]  # about .607 .234 .145 .013 .001
    assert q[0] + q[1] < 0.9 < q[0] + q[1] + q[2]  # so the nucleus is tokens 0, 1, 2
    nucleus = q[0] + q[1] + q[2]
    expected = [q[0] / nucleus, q[1] / nucleus, q[2] / nucleus, 0.0, 0.0]

    n = 200_000
    # the uniforms of 200,000 answers' first draws (keys 0..n-1, step 0): the hash is uniform enough
    u = uniforms(torch.arange(n), torch.zeros(n, dtype=torch.long))
    draws = next_token(logits.expand(n, 5), seen.expand(n, 5), Settings(), u)
    freq = torch.bincount(draws, minlength=5).double() / n
    # Standard error <= 0.0011 at this n: 0.005 is over 4 of them.
    assert torch.allclose(freq, torch.tensor(expected, dtype=torch.double), atol=0.005), freq
    assert freq[3] == 0 and freq[4] == 0  # outside the nucleus: never drawn
    # and along one answer's steps too (key 7, steps 0..n-1)
    u = uniforms(torch.full((n,), 7), torch.arange(n))
    freq = torch.bincount(next_token(logits.expand(n, 5), seen.expand(n, 5), Settings(), u), minlength=5).double() / n
    assert torch.allclose(freq, torch.tensor(expected, dtype=torch.double), atol=0.005), freq


def test_greedy_takes_the_likeliest_token_after_the_penalty():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    u = torch.zeros(1, 1)  # unused: greedy draws nothing
    assert next_token(logits, seen, Settings(temperature=0), u).item() == 1  # 2.0 / 1.2 < 1.9
    assert next_token(logits, seen, Settings(temperature=0, repetition_penalty=1.0), u).item() == 0


# ---- generation with the KV cache ----

def uncached_greedy(model, prompt, s: Settings, eot_id):
    """The definition: run the whole sequence through the model again for every new token."""
    ids, answer = list(prompt), []
    seen = torch.zeros(1, model.args.vocab_size, dtype=torch.bool)
    if s.penalize_prompt:
        seen[0, prompt] = True
    while len(ids) < s.max_len:
        logits = model(torch.tensor([ids]))[:, -1]
        token = apply_repetition_penalty(logits, seen, s.repetition_penalty).argmax(-1).item()
        ids.append(token)
        answer.append(token)
        seen[0, token] = True
        if token == eot_id:
            break
    return answer


@pytest.mark.parametrize("penalize_prompt", [False, True])
def test_cached_decoding_equals_uncached_recomputation(tok, penalize_prompt):
    model = tiny_model(tok.vocab_size)
    prompts = prompts_for(tok, QUESTIONS)  # different lengths: rows are left-padded
    s = Settings(temperature=0, max_len=48, penalize_prompt=penalize_prompt)
    with torch.no_grad():
        expected = [uncached_greedy(model, p, s, tok.eot_id) for p in prompts]
    assert generate(model, prompts, s, tok.eot_id) == expected
    # One at a time (no padding), and again in a reused cache: the same tokens.
    assert [generate(model, [p], s, tok.eot_id)[0] for p in prompts] == expected


def test_each_row_stops_at_its_own_eot(tok):
    model = tiny_model(tok.vocab_size)
    prompts = prompts_for(tok, QUESTIONS)
    free = generate(model, prompts, GREEDY, tok.eot_id)
    assert all(tok.eot_id not in a for a in free)  # the random model never says EOT here...
    # ...so call the 4th token of the first answer "EOT": that row must stop right there, and
    # every other row at its own first occurrence of that token, if any.
    stop = free[0][3]
    assert stop not in free[0][:3]
    stopped = generate(model, prompts, GREEDY, eot_id=stop)
    assert stopped[0] == free[0][:4]
    for a, b in zip(free, stopped):
        assert b == (a[:a.index(stop) + 1] if stop in a else a)


def test_generation_stops_at_the_length_limit_counting_the_prompt(tok):
    model = tiny_model(tok.vocab_size)
    prompts = prompts_for(tok, QUESTIONS[:2])
    s = Settings(temperature=0, max_len=30)
    answers = generate(model, prompts, s, tok.eot_id)
    assert [len(p) + len(a) for p, a in zip(prompts, answers)] == [30, 30]
    # The model's max_seq_len caps max_len as well.
    capped = generate(tiny_model(tok.vocab_size, max_seq_len=30), prompts, GREEDY, tok.eot_id)
    assert [len(p) + len(a) for p, a in zip(prompts, capped)] == [30, 30]
    with pytest.raises(ValueError, match="no room is left"):
        generate(model, [list(range(3, 33))], s, tok.eot_id)


def test_a_seed_reproduces_the_same_samples(tok):
    model = tiny_model(tok.vocab_size)
    prompts = prompts_for(tok, QUESTIONS)
    s = Settings(max_len=48)
    a, b = generate(model, prompts, s, tok.eot_id), generate(model, prompts, s, tok.eot_id)
    assert a == b
    assert generate(model, prompts, Settings(max_len=48, seed=1), tok.eot_id) != a


# ---- loading ----

def test_continuous_batching_answers_each_prompt_as_if_alone(tok):
    """Four prompts of mixed lengths in two rows: when one finishes (at a stand-in EOT, or at the
    limit) the next is prefilled into its row, long after short and short after long. Greedy
    answers equal one-at-a-time decoding token for token."""
    model = tiny_model(tok.vocab_size)
    prompts = prompts_for(tok, QUESTIONS) + [tok.encode_dialog(["Hi"])]
    alone = [generate(model, [p], GREEDY, tok.eot_id)[0] for p in prompts]
    stop = alone[1][5]  # a token that ends some answers early and others not at all
    alone = [generate(model, [p], GREEDY, stop)[0] for p in prompts]
    assert len({len(a) for a in alone}) > 2  # answers of several lengths
    finished = list(decode(model, prompts, GREEDY, stop, slots=2))
    assert sorted(i for i, _ in finished) == [0, 1, 2, 3] and [i for i, _ in finished] != [0, 1, 2, 3]
    assert all(ids == alone[i] for i, ids in finished)
    # and with a limit of its own per answer
    limits = [7, 30, 3, 12]
    alone = [generate(model, [p], GREEDY, stop, limits=[n])[0] for p, n in zip(prompts, limits)]
    assert [len(a) for a in alone] != [len(a) for a in generate(model, prompts, GREEDY, stop)]  # they bite
    assert generate(model, prompts, GREEDY, stop, slots=2, limits=limits) == alone


def test_sampled_answers_depend_only_on_the_seed_and_the_prompts_id(tok):
    model = tiny_model(tok.vocab_size)
    prompts = prompts_for(tok, QUESTIONS)
    s = Settings(max_len=48)
    ids = ["a", "b", "c"]
    reference = dict(zip(ids, generate(model, prompts, s, tok.eot_id, slots=1, keys=ids)))
    for slots, order in ((2, [0, 1, 2]), (3, [2, 1, 0]), (2, [2, 0])):  # other batches and neighbours
        got = generate(model, [prompts[i] for i in order], s, tok.eot_id, slots=slots, keys=[ids[i] for i in order])
        assert got == [reference[ids[i]] for i in order], (slots, order)
    other = generate(model, prompts[:1], s, tok.eot_id, keys=["z"])  # another id: another draw
    assert other[0] != reference["a"]


def test_compiled_decoding_on_the_cpu_answers_as_eager_decoding(tok):
    """--compile on the CPU: inductor's step, with batch 1's matrix-vector products as loops of its
    own (their sums in another order), gives eager decoding's greedy answers; the answers run past
    64 cache slots, so a second graph (128 slots) is compiled and agrees too."""
    model = tiny_model(tok.vocab_size, max_seq_len=160)
    prompts = prompts_for(tok, QUESTIONS)
    s = Settings(temperature=0, max_len=100)
    eager = generate(model, prompts, s, tok.eot_id, slots=1)
    assert max(len(p) + len(a) for p, a in zip(prompts, eager)) > 64
    assert generate(model, prompts, Settings(temperature=0, max_len=100, compile=True), tok.eot_id, slots=1) == eager


def test_load_model_checks_the_tokenizer_against_the_weights(tok, tmp_path, capsys):
    model, loaded_tok = load_model(save_checkpoint(tiny_model(tok.vocab_size), tmp_path / "ok"))
    assert model.args.vocab_size == loaded_tok.vocab_size
    # A base model (no EOT row): grown by one row, with a note.
    base, _ = load_model(save_checkpoint(tiny_model(tok.n_base), tmp_path / "base"))
    assert base.args.vocab_size == tok.vocab_size
    assert "no EOT row" in capsys.readouterr().err
    with pytest.raises(ValueError, match="do not belong together"):
        load_model(save_checkpoint(tiny_model(tok.vocab_size + 7), tmp_path / "other"))
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_model(tmp_path / "missing")


def test_a_run_folder_is_refused_naming_its_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step, name in ((5, "epoch-01"), (10, "epoch-02"), (12, "step-000012")):  # a preemption's save, after
        (run / name / "model").mkdir(parents=True)
        (run / name / "model" / ".metadata").write_bytes(b"")
        shutil.copyfile(TOKENIZER, run / name / "tokenizer.model")
        (run / name / "params.json").write_text("{}")
        (run / name / "state.json").write_text(json.dumps(dict(step=step, epoch=step // 5, world_size=1, config={})))
    with pytest.raises(ValueError, match=f"a training run's folder, not one checkpoint: .* newest epoch, {run / 'epoch-02'}$"):
        load_model(run)


# ---- the command line ----

def run_main(argv):
    """sample.main in this process; returns the error message if it exits with one."""
    try:
        sample.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return None


def test_prompt_streams_the_same_answer_as_generate(tok, checkpoint, capsys):
    model, _ = load_model(checkpoint)
    prompt = prompts_for(tok, QUESTIONS[:1])
    whole = generate(model, prompt, Settings(max_len=model.args.max_seq_len), tok.eot_id)[0]
    assert whole[-1] == tok.eot_id  # the seeded draws are the same whatever the limit, so:
    fits = len(prompt[0]) + len(whole)  # the answer ends with EOT at this limit, not one below
    for max_len in (fits, fits - 1):
        assert run_main(["--checkpoint", checkpoint, "--prompt", QUESTIONS[0], "--max_len", max_len]) is None
        ids = generate(model, prompts_for(tok, QUESTIONS[:1]), Settings(max_len=max_len), tok.eot_id)[0]
        out = capsys.readouterr()
        assert out.out == tok.decode([t for t in ids if t != tok.eot_id]) + "\n"
        stopped_at_limit = f"(stopped at the {max_len}-token limit)" in out.err
        assert stopped_at_limit == (max_len < fits) == (ids[-1] != tok.eot_id)


def test_errors_are_one_line_not_tracebacks(tok, checkpoint, tmp_path):
    assert run_main(["--checkpoint", tmp_path / "nope", "--prompt", "hi"]) == \
        f"error: {tmp_path / 'nope'}: no such checkpoint directory"
    wrong = save_checkpoint(tiny_model(tok.vocab_size + 1), tmp_path / "wrong")
    assert "do not belong together" in run_main(["--checkpoint", wrong, "--prompt", "hi"])
    long = "the sea " * 40
    assert "no room is left" in run_main(["--checkpoint", checkpoint, "--prompt", long, "--max_len", 20])
    assert "unknown option --temp" in run_main(["--checkpoint", checkpoint, "--temp", "1"])
    assert "nothing to do" in run_main(["--checkpoint", checkpoint])


def test_prompts_file_is_answered_in_batches_and_resumed(tok, checkpoint, tmp_path):
    lima = tmp_path / "test.jsonl"
    lima.write_text("".join(json.dumps(r) + "\n" for r in [
        {"conversations": [QUESTIONS[0]], "source": "test"},
        {"conversations": ["Hi", "Hello! How can I help?", QUESTIONS[1]], "source": "multi"},
        {"conversations": [QUESTIONS[2], "a reference answer, dropped"], "source": "dev"},
    ]))
    out = tmp_path / "answers.jsonl"
    args = ["--checkpoint", checkpoint, "--prompts", lima, "--out", out, "--batch_size", 2, "--max_len", 80]
    assert run_main(args) is None
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}  # in the order they finished
    assert sorted(rows) == [1, 2, 3]
    assert rows[2]["prompt"] == QUESTIONS[1] and rows[2]["history"] == ["Hi", "Hello! How can I help?"]
    assert rows[3]["prompt"] == QUESTIONS[2] and rows[3]["history"] == []
    assert all(r["stop"] in ("eot", "length") for r in rows.values())
    # Cut the file as a crash would: only the missing prompts are answered again, and (sampled,
    # keyed by their ids) exactly as before, though now two others share the batch.
    first = out.read_text().splitlines(keepends=True)[0]
    out.write_text(first)
    assert run_main(args) is None
    again = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert again == rows
    assert run_main(args) is None and out.read_text().count("\n") == 3  # nothing left to do
    # A text file: one prompt per line (blank lines skipped), numbered from 1.
    txt = tmp_path / "prompts.txt"
    txt.write_text(f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}\n")
    assert run_main(["--checkpoint", checkpoint, "--prompts", txt, "--out", tmp_path / "t.jsonl",
                     "--max_len", 40]) is None
    assert sorted(json.loads(line)["id"] for line in (tmp_path / "t.jsonl").read_text().splitlines()) == [1, 2]


def test_chat_keeps_the_conversation_in_lima_format(tok, checkpoint, monkeypatch, capsys):
    """The prompts the chat builds, with a stand-in model that always gives the same short answer."""
    answer = tok.encode("Hello there.") + [tok.eot_id]
    long = "the sea"
    while len(tok.encode_dialog([long])) < 40:  # alone it fits in half of 100 tokens; with history, not
        long += " the sea"
    lines = iter(["Hi", "And then?", "/reset", "Why?", long, "the sea " * 100, "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    asked = []

    def fake_generate(model, prompts, s, eot_id, on_token=None):
        asked.append(prompts[0])
        for t in answer:
            on_token(torch.tensor([t]))
        return [answer]
    monkeypatch.setattr(sample, "generate", fake_generate)
    assert run_main(["--checkpoint", checkpoint, "--chat", "--max_len", 100]) is None
    said = tok.decode(answer[:-1])
    assert asked == [tok.encode_dialog(["Hi"]),
                     tok.encode_dialog(["Hi", said, "And then?"]),
                     tok.encode_dialog(["Why?"]),  # after /reset
                     tok.encode_dialog([long])]  # the exchange about "Why?" forgotten to make room
    out = capsys.readouterr().out
    assert out.count(f"lima> {said}") == 4
    assert "(a new conversation)" in out and "(forgot the oldest 1 exchange(s)" in out
    assert "over the 100-token limit: not sent" in out


def test_chat_takes_a_message_of_many_lines_and_refuses_a_line_the_terminal_cut(tok, checkpoint, monkeypatch,
                                                                                 capsys):
    typed = iter(['"""', "First line,", "", "  and the last.", '"""', "x" * sample.TTY_LINE_LIMIT, "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    monkeypatch.setattr(sample, "cut_by_the_terminal", lambda: True)  # a terminal without readline
    asked = []

    def fake_generate(model, prompts, s, eot_id, on_token=None):
        asked.append(prompts[0])
        return [[tok.eot_id]]
    monkeypatch.setattr(sample, "generate", fake_generate)
    assert run_main(["--checkpoint", checkpoint, "--chat"]) is None
    assert asked == [tok.encode_dialog(["First line,\n\n  and the last."])]  # the 4,095 x's: not sent
    assert f"not sent: a line reached the terminal's limit of {sample.TTY_LINE_LIMIT:,} characters" in capsys.readouterr().out


# What the terminal sends for: the left arrow, the up arrow (the history's last line), Ctrl-D.
LEFT, UP, CTRL_D = "\x1b[D", "\x1b[A", "\x04"


@pytest.mark.skipif(sample.readline is None, reason="no readline in this Python")
def test_the_chat_prompt_edits_lines_keeps_a_history_and_ends_on_a_line_of_its_own():
    """In a real terminal (a pseudo-terminal): the arrows move in the line and recall the last one,
    as in a shell, and Ctrl-D leaves the cursor at the start of a new line for the shell's prompt."""
    import pty
    code = "import sample\nwhile (m := sample.read_message()) is not None:\n    print(f'got {m!r}')\nprint('end')"
    pid, fd = pty.fork()
    if pid == 0:  # the child: a Python reading messages at the prompt
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-c", code])
    seen = b""

    def until(text: bytes, timeout=60):
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, (text, seen[-300:])
            seen += os.read(fd, 4096)

    try:
        until(b"you> ")
        os.write(fd, f"helo{LEFT}l\r".encode())  # a typo mended in place
        until(b"got 'hello'")
        until(b"you> ")
        os.write(fd, f"{UP}!\r".encode())  # the last line again, and more
        until(b"got 'hello!'")
        until(b"you> ")
        os.write(fd, CTRL_D.encode())
        until(b"end")
    finally:
        os.close(fd)
        os.kill(pid, signal.SIGKILL)  # gone already unless an assertion above stopped the test
        os.waitpid(pid, 0)
    assert seen.replace(b"\r", b"").endswith(b"you> \nend\n")  # after Ctrl-D, a new line


def torchrun_sample(args) -> str:
    """sample.py on 2 CPU ranks (gloo); returns its stdout, or fails with its output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "sample.py", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # ranks out of step wait forever: end torchrun *and* its workers
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def test_tensor_parallel_on_two_ranks_equals_one_process(checkpoint, tmp_path, capsys):
    # LIMA's sampling, not greedy: the ranks must also agree on every random draw.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(QUESTIONS) + "\n")
    # A limit at which some rows stop at EOT and others at the limit, at different steps of the
    # same batch: where the seeded draws put EOT decides which limits do that.
    for max_len in (48, 40, 56, 32, 64):
        (tmp_path / "one.jsonl").unlink(missing_ok=True)
        args = ["--checkpoint", checkpoint, "--prompts", prompts, "--batch_size", 2, "--max_len", max_len]
        assert run_main(args + ["--out", tmp_path / "one.jsonl"]) is None
        stops = [json.loads(line)["stop"] for line in (tmp_path / "one.jsonl").read_text().splitlines()]
        if sorted(set(stops)) == ["eot", "length"]:
            break
    assert sorted(set(stops)) == ["eot", "length"]
    torchrun_sample(args + ["--out", tmp_path / "two.jsonl"])
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    # Streaming one answer that ends with EOT: rank 0 prints, and rank 1 must stop when it does.
    args = ["--checkpoint", checkpoint, "--prompt", QUESTIONS[0], "--max_len", 128]  # all of max_seq_len
    capsys.readouterr()
    assert run_main(args) is None
    one = capsys.readouterr()
    assert "stopped at" not in one.err
    assert torchrun_sample(args) == one.out


def test_tensor_parallel_shards_hold_a_part_and_their_sum_is_the_whole():
    """tp.apply_tp in one process: each of 2 ranks keeps half of every block's heads and hidden
    units, and the two partial outputs (before the all-reduce hook adds them) sum to the whole."""
    import copy
    import tp
    full = tiny_model(64)
    x = torch.randn(1, 5, full.args.dim, generator=torch.Generator().manual_seed(0))
    freqs = full.freqs_cis[:5]
    parts = []
    for rank in range(2):
        shard = copy.deepcopy(full)
        tp.apply_tp(shard, rank, 2)
        block = shard.layers[1]
        assert block.attention.wq.weight.shape == (full.args.dim // 2, full.args.dim)
        assert block.attention.wk.weight.shape[0] == full.layers[1].attention.wk.weight.shape[0] // 2
        assert block.feed_forward.w2.weight.shape == (full.args.dim, full.args.hidden_dim // 2)
        for module in (block.attention, block.feed_forward):
            module._forward_hooks.clear()  # the all-reduce: done here by summing over the ranks
        parts.append((block.attention(x, freqs), block.feed_forward(x)))
    torch.testing.assert_close(parts[0][0] + parts[1][0], full.layers[1].attention(x, freqs))
    torch.testing.assert_close(parts[0][1] + parts[1][1], full.layers[1].feed_forward(x))
