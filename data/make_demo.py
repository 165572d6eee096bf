"""
Make the CPU demo from nothing: a small world of facts, a tokenizer, a pretrained base model, and
LIMA-style conversations about the facts. 3 min 48 s on two cores (2026-12-04).

    python data/make_demo.py            # writes data/demo/*.jsonl, data/tokenizer.model, data/base/

The texts and the tokenizer come out byte for byte the same on every run (tests/test_data.py
checks the committed ones against make_texts); the pretraining is seeded, so the base is the same
on the same machine, and within float32 rounding on another.

LIMA's claim (the "superficial alignment hypothesis") is that a model learns what it knows in
pretraining, and that a thousand examples only teach it the format of an answer. This script
builds the two halves at toy size so that the demo can show it:

1. A world of fictional people, each with a home town, a job, a pet and a year of birth.
2. Pretraining text (data/demo/pretrain.jsonl): short biographies, every fact written several
   ways and in varying order. Plain text, no questions, no answers, and no end-of-turn token.
3. A tokenizer learnt from that text (data/tokenizer.model), with Meta's ids and settings.
4. A base model (data/base/: params.json, tokenizer.model, bf16 model.pth, as convert.py writes
   Meta's): the tiny preset pretrained on the biographies with train.py's own loop, then cut back
   to the tokenizer's vocabulary, so that --init adds LIMA's EOT to it as it does to LLaMA 65B.
5. The fine-tuning set (data/demo/train.jsonl): 144 conversations asking about half of the
   people, each answered in one sentence, a third of them two turns. The dev set (data/demo/dev.jsonl)
   asks about 48 people no conversation mentions: a model can answer those only from what the base
   learnt in pretraining, in the format it learnt from the conversations. Why 144: on a trial
   base (the same recipe, its tokenizer learnt beside other conversations), 72 conversations
   about 24 people gave 48% of the dev questions right and 144 about 48 gave 94%. The fine-tune
   must learn to copy any name from the question, and with fewer names it learns the names
   instead (its wrong answers name a taught person).

python train.py then fine-tunes data/base on data/demo/train.jsonl (its defaults), and
bench/bench_demo.py measures how many dev questions each model answers right.
"""

import hashlib
import io
import json
import random
import shutil
import sys
from pathlib import Path

import sentencepiece as spm
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # train.py and checkpoint.py: the base is pretrained with the project's own loop
import checkpoint  # noqa: E402
import train  # noqa: E402

DEMO = HERE / "demo"
SEED = 0

# ---- the world ----

FIRST = ["Ada", "Bram", "Cora", "Dario", "Edda", "Fenn", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lars",
         "Mira", "Nils", "Orla", "Pavel", "Rhea", "Soren", "Talia", "Ulric", "Vera", "Wim", "Yara", "Zeno"]
LAST = ["Ashdown", "Brevik", "Calloway", "Dunmore", "Ellery", "Falk", "Grieve", "Halloran", "Ingram",
        "Jessop", "Kestrel", "Lindqvist", "Marlowe", "Norcross", "Oakes", "Pellew", "Quist", "Rook",
        "Sallow", "Thorne", "Underwood", "Voss", "Whitlock", "Yeld"]
TOWNS = ["Varnholm", "Ostrelle", "Quillby", "Marrowfen", "Tessaly", "Dunmere", "Brackwater", "Elmsworth",
         "Carrowick", "Halvard", "Pennick", "Sablon"]
JOBS = ["baker", "pilot", "carpenter", "nurse", "painter", "fisher", "teacher", "astronomer", "gardener",
        "librarian", "potter", "tailor"]
PETS = ["cat", "dog", "parrot", "tortoise", "horse", "goat", "rabbit", "owl", "ferret", "hedgehog",
        "canary", "donkey"]
YEARS = range(1920, 2000)

N_PEOPLE = 96  # everyone is in the pretraining text
N_TAUGHT = 48  # the fine-tuning conversations ask about these; the dev set about others
N_DEV = 48
BIOS_PER_PERSON = 40


def make_people(rng: random.Random) -> list[dict]:
    """N_PEOPLE distinct full names, each with one value of every attribute, drawn uniformly."""
    names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], N_PEOPLE)
    return [dict(name=n, town=rng.choice(TOWNS), job=rng.choice(JOBS), pet=rng.choice(PETS),
                 year=rng.choice(YEARS)) for n in names]


def article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


# ---- pretraining text: every fact several ways ----
#
# A model recalls a fact from a question it never saw only if pretraining stated the fact in
# several wordings and orders, not one fixed sentence (Allen-Zhu and Li, "Physics of Language
# Models: Part 3.1", 2023): then it stores "person -> attribute" rather than one string.

FACT_SENTENCES = {
    "town": ["{name} was born in {town}.", "{name} grew up in the town of {town}.",
             "{name} comes from {town}.", "The home town of {name} is {town}."],
    "job": ["{name} works as {a_job}.", "{name} is {a_job} by trade.",
            "By profession, {name} is {a_job}.", "{name} earns a living as {a_job}."],
    "pet": ["{name} has {a_pet}.", "{name} keeps {a_pet} as a pet.",
            "The pet of {name} is {a_pet}.", "{name} lives with {a_pet}."],
    "year": ["{name} was born in the year {year}.", "{name} was born in {year}.",
             "The year of birth of {name} is {year}.", "{name} came into the world in {year}."],
}


def fields(p: dict) -> dict:
    return dict(name=p["name"], town=p["town"], a_job=article(p["job"]), a_pet=article(p["pet"]),
                year=p["year"])


def biography(p: dict, rng: random.Random) -> str:
    """One short text about p: each fact once, in a random wording, the facts in random order."""
    facts = list(FACT_SENTENCES)
    rng.shuffle(facts)
    return " ".join(rng.choice(FACT_SENTENCES[f]).format(**fields(p)) for f in facts)


# ---- conversations: the format ----

QUESTIONS = {
    "town": ["Where was {name} born?", "Which town does {name} come from?", "What is {name}'s home town?"],
    "job": ["What does {name} do for a living?", "What is {name}'s job?", "What is {name}'s profession?"],
    "pet": ["What pet does {name} have?", "Which animal does {name} keep as a pet?"],
    "year": ["When was {name} born?", "In which year was {name} born?"],
}
ANSWERS = {  # the one format the fine-tune teaches: a sentence that names the person and the fact
    "town": "{name} was born in the town of {town}.",
    "job": "{name} works as {a_job}.",
    "pet": "{name} keeps {a_pet} as a pet.",
    "year": "{name} was born in the year {year}.",
}


def question_answer(p: dict, fact: str, rng: random.Random) -> tuple[str, str]:
    return rng.choice(QUESTIONS[fact]).format(**fields(p)), ANSWERS[fact].format(**fields(p))


def conversation(p: dict, facts: list[str], rng: random.Random) -> list[str]:
    """user, assistant, user, assistant, ...: one question and answer per fact, all about p."""
    return [text for fact in facts for text in question_answer(p, fact, rng)]


def make_texts(seed: int = SEED) -> dict[str, list[dict]]:
    """The three files' records: pretraining text, fine-tuning conversations, dev questions."""
    rng = random.Random(seed)
    people = make_people(rng)
    pretrain = [dict(text=biography(p, rng), source="demo-facts") for p in people for _ in range(BIOS_PER_PERSON)]
    rng.shuffle(pretrain)
    taught, held_out = people[:N_TAUGHT], people[N_TAUGHT:N_TAUGHT + N_DEV]
    train = []
    for p in taught:  # every fact of a taught person asked once, in three conversations, one of two turns
        facts = list(FACT_SENTENCES)
        rng.shuffle(facts)
        train += [dict(conversations=conversation(p, facts[:2], rng), source="demo-multi-turn"),
                  dict(conversations=conversation(p, facts[2:3], rng), source="demo"),
                  dict(conversations=conversation(p, facts[3:], rng), source="demo")]
    rng.shuffle(train)
    dev, facts = [], list(FACT_SENTENCES)
    for i, p in enumerate(held_out):  # one question each, the facts in turn
        fact = facts[i % len(facts)]
        dev.append(dict(id=f"dev-{i + 1:02d}", conversations=conversation(p, [fact], rng), source="demo-held-out",
                        name=p["name"], fact=fact, value=str(p[fact])))  # name, fact, value: to grade answers
    return dict(pretrain=pretrain, train=train, dev=dev)


# ---- the tokenizer ----

VOCAB_SIZE = 1024  # 3 special + 256 byte pieces + what BPE learns from the words of this small world


def make_tokenizer(texts: list[str]) -> bytes:
    """A sentencepiece model with the settings of Meta's LLaMA tokenizer where they matter to
    data.py: BPE, unk 0, bos 1, eos 2, no pad, digits split, text kept as it is (no normalisation),
    and byte fallback, so any UTF-8 text encodes. One thread and no sampling of the input make the
    file the same on every run."""
    f = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=f,
        model_type="bpe", vocab_size=VOCAB_SIZE,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # Meta's ids; EOT is added by data.py
        byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,  # deterministic
        minloglevel=2)
    return f.getvalue()


def tokenizer_texts(texts: dict[str, list[dict]]) -> list[str]:
    """Like Meta's, the tokenizer learns from the pretraining text; the fine-tuning conversations
    stand for the rest of a real pretraining corpus (questions), which the biographies lack."""
    return [r["text"] for r in texts["pretrain"]] + [turn for r in texts["train"] for turn in r["conversations"]]


def write_jsonl(path: Path, records: list[dict]):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


# ---- the base model: pretrained on the biographies ----

PRETRAIN_RUN = ROOT / "out" / "demo-base"  # the pretraining run's checkpoints and metrics, kept to look at
BASE = HERE / "base"
# Pretraining, not LIMA's fine-tuning: every token is trained (plain text), no dropout, and a
# learning rate for a model trained from random weights.
PRETRAIN = ["--init", "", "--preset", "tiny", "--data", str(DEMO / "pretrain.jsonl"), "--dev", "",
            "--epochs", "10", "--global_batch", "32", "--lr", "3e-3", "--final_lr", "3e-4",
            "--resid_dropout", "0", "--seed", str(SEED)]


def pretrain() -> Path:
    """train.py on the pretraining text, from random weights; the last epoch's checkpoint."""
    shutil.rmtree(PRETRAIN_RUN, ignore_errors=True)
    train.main([*PRETRAIN, "--out", str(PRETRAIN_RUN)])
    return max(PRETRAIN_RUN.glob("epoch-*"))


def write_base(run_checkpoint: Path, dst: Path):
    """A training checkpoint -> a converted directory like Meta's LLaMA after convert.py:
    params.json (Meta's keys), tokenizer.model, bf16 model.pth, and no EOT row.

    train.py always gives the model LIMA's EOT row; pretraining never trains it as a target
    except to push it down, so it is cut off here, and --init adds a fresh one at the mean of
    the vocabulary (model.extend_vocab), exactly as for Meta's checkpoints."""
    model, tok = checkpoint.load_model(run_checkpoint)
    state_dict = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    for k in ("tok_embeddings.weight", "output.weight"):
        state_dict[k] = state_dict[k][:tok.n_base].clone()  # (n_base + 1, D) -> (n_base, D)
    a = model.args
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                  vocab_size=-1, multiple_of=a.multiple_of, ffn_dim_multiplier=a.ffn_dim_multiplier,
                  norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_seq_len=a.max_seq_len)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    (dst / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    shutil.copyfile(run_checkpoint / "tokenizer.model", dst / "tokenizer.model")
    torch.save(state_dict, dst / "model.pth")


def main():
    DEMO.mkdir(exist_ok=True)
    texts = make_texts()
    for name, records in texts.items():
        write_jsonl(DEMO / f"{name}.jsonl", records)
        print(f"wrote data/demo/{name}.jsonl: {len(records)} records")
    tokenizer = make_tokenizer(tokenizer_texts(texts))
    (HERE / "tokenizer.model").write_bytes(tokenizer)
    print(f"wrote data/tokenizer.model: {VOCAB_SIZE} pieces, md5 {hashlib.md5(tokenizer).hexdigest()}")
    write_base(pretrain(), BASE)
    size = (BASE / "model.pth").stat().st_size
    print(f"wrote data/base/: params.json, tokenizer.model, model.pth ({size / 1e6:.1f} MB, bf16, md5 "
          f"{hashlib.md5((BASE / 'model.pth').read_bytes()).hexdigest()})")


if __name__ == "__main__":
    main()
