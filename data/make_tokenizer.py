"""
Train the demo's small sentencepiece tokenizer on data/demo/train.jsonl; writes data/tokenizer.model.

    python data/make_tokenizer.py

The settings copy Meta's LLaMA tokenizer where they matter to data.py: BPE, unk 0, bos 1, eos 2,
no pad, digits split, text kept as it is (no normalisation), and byte fallback, so any UTF-8 text
encodes (newlines, for one, become the byte piece <0x0A>, as with Meta's). Only the vocabulary is
small: 40 conversations cannot support 32,000 pieces. One thread and no sampling of the input
make the file the same on every run, so it can be committed and re-made to check.
"""

import hashlib
import json
from pathlib import Path

import sentencepiece as spm

HERE = Path(__file__).resolve().parent
DATA = HERE / "demo" / "train.jsonl"  # dev.jsonl stays out: it is held out from everything
OUT = HERE / "tokenizer.model"
VOCAB_SIZE = 1024  # 3 special + 256 byte pieces + 765 learned pieces and characters


def sentences(path: Path):
    """Every non-empty line of every utterance: sentencepiece trains on lines, not documents."""
    for line in path.read_text(encoding="utf-8").splitlines():
        for turn in json.loads(line)["conversations"]:
            yield from (s for s in turn.split("\n") if s.strip())


def main():
    with open(OUT, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(DATA), model_writer=f,
            model_type="bpe", vocab_size=VOCAB_SIZE,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # Meta's ids; EOT is added by data.py
            byte_fallback=True, split_digits=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,  # deterministic
            minloglevel=2)
    digest = hashlib.md5(OUT.read_bytes()).hexdigest()
    print(f"wrote {OUT.relative_to(HERE.parent)}: {VOCAB_SIZE} pieces, md5 {digest}")


if __name__ == "__main__":
    main()
