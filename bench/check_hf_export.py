"""
    python bench/check_hf_export.py
    python bench/check_hf_export.py --help

Checks convert.py --to_hf against Hugging Face transformers in the benchmark environment (pip install
-r bench/requirements.txt), for the project's tokenizer (data/tokenizer.model) and Meta's LLaMA
tokenizer where this machine has it (bench/common.py's path). A tiny random model with LIMA's EOT
row is exported, then read back in a child process where sentencepiece, protobuf and tiktoken
cannot be imported, so that transformers can only use tokenizer.json as written:
    load        AutoTokenizer and AutoModelForCausalLM load the export, and which class reads it
    ids         the ids of every text are sentencepiece's (with BOS): the texts on which HF's Llama
                tokenizers drift (tests/test_convert.py's) and real text, the demo conversations
                and, with Meta's tokenizer, every turn of LIMA's training set when present
    decode      decode(ids, skip_special_tokens=True) is sentencepiece's decode of the same ids
    greedy      HF's generate(do_sample=False) from the prompt written as text ("...<EOT>", read
                with split_special_tokens=False) writes sample.py's greedy answer, token for token.
                Greedy here is the argmax at every step, repetition penalty 1 on both sides: HF's
                penalty counts the prompt as seen, sample.py's (by default) does not.
The table is appended to bench/results.md; the exit status is 1 if anything disagrees.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path

import sentencepiece
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import convert  # noqa: E402
from checkpoint import load_model  # noqa: E402
from cli import parse_config  # noqa: E402
from common import LIMA_DATA, LLAMA_TOKENIZER, machine, markdown, record  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from sample import Settings, generate  # noqa: E402


@dataclass
class CheckConfig:
    prompt: str = "How do I make a good cup of tea?"  # the greedy answer's prompt
    new_tokens: int = 48  # greedy tokens compared (the answer stops earlier at EOT)
    results: str = "bench/results.md"  # relative to the repository; the table is appended; "" to skip


# tests/test_convert.py's DRIFT_CASES and SPACE_RUNS: spaces that lead or run, indentation, the
# special tokens' names as text, characters outside the vocabulary, digits, nothing at all.
DRIFT_CASES = [" hello", "a  b   c", "def f():\n    return 1\n\tx", "<s>", "</s>", "<unk>", "<EOT>",
               "x<s>y</s>z", "hot tea<EOT>", "naïve café, Ωμέγα, 日本語 🙂 𝄞 \U0001fae0", "1234567 + 3.14159",
               "", "\n", "a\n\nb\n", " ", "   ", "  both ends  ", "tab\tand\r\nCRLF"] + \
              [f"a{' ' * k}b" for k in range(1, 41)] + [" " * k for k in range(1, 41)]

# Run in a process where these cannot be imported (sys.modules[name] = None makes an import fail
# and transformers' availability checks say no): whatever it needs, it has to find in the export.
HF_SIDE = """
import json, sys
for name in ("sentencepiece", "google.protobuf", "tiktoken"):
    sys.modules[name] = None
import torch, transformers
request = json.load(sys.stdin)
tok = transformers.AutoTokenizer.from_pretrained(request["dir"])
model = transformers.AutoModelForCausalLM.from_pretrained(request["dir"], dtype=torch.float32).eval()
ids = [tok(text)["input_ids"] for text in request["texts"]]
prompt = tok(request["prompt"], split_special_tokens=False)["input_ids"]
out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                     do_sample=False, max_new_tokens=request["new_tokens"])
json.dump(dict(tokenizer=type(tok).__name__, model=type(model).__name__, ids=ids, prompt=prompt,
               decoded=[tok.decode(i, skip_special_tokens=True) for i in ids],
               answer=out[0, len(prompt):].tolist()), sys.stdout)
"""


def conversation_turns(path: Path) -> list[str]:
    """Every turn of every conversation of a LIMA-format jsonl file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [turn for line in lines for turn in json.loads(line)["conversations"]]


def write_tiny(tokenizer: Path, src: Path):
    """A tiny random LLaMA with an EOT row, in this project's format (what convert.py --to_hf reads)."""
    n = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    args = ModelArgs.from_name("tiny", vocab_size=n + 1)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    src.mkdir()
    params = asdict(args)
    params.pop("resid_dropout")  # a training setting, as convert.py leaves it out
    (src / "params.json").write_text(json.dumps(params))
    torch.save(model.state_dict(), src / "model.pth")
    (src / "tokenizer.model").write_bytes(tokenizer.read_bytes())


def check(label: str, tokenizer: Path, texts: dict[str, list[str]], cfg: CheckConfig) -> tuple[list, list, bool]:
    """One tokenizer: the table's rows (one per set of texts), notes, and whether everything agreed."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    with tempfile.TemporaryDirectory() as tmp:
        src, hf = Path(tmp) / "lima", Path(tmp) / "hf"
        write_tiny(tokenizer, src)
        t0 = time.perf_counter()
        convert.to_hf(src, hf)
        export_s = time.perf_counter() - t0
        size_mb = (hf / "tokenizer.json").stat().st_size / 1e6
        model, tok = load_model(src)
        prompt = tok.encode_dialog([cfg.prompt])  # BOS, the prompt, EOT: what sample.py --prompt answers
        greedy = Settings(temperature=0, repetition_penalty=1.0, max_len=len(prompt) + cfg.new_tokens)
        ours = generate(model, [prompt], greedy, tok.eot_id)[0]
        request = dict(dir=str(hf), texts=[text for group in texts.values() for text in group],
                       prompt=cfg.prompt + convert.EOT, new_tokens=cfg.new_tokens)
        t0 = time.perf_counter()
        child = subprocess.run([sys.executable, "-c", HF_SIDE], input=json.dumps(request), capture_output=True,
                               text=True)
        hf_s = time.perf_counter() - t0
    if child.returncode:
        raise SystemExit(f"{tokenizer}: transformers could not use the export:\n{child.stderr[-3000:]}")
    got = json.loads(child.stdout)
    rows, at, agreed = [], 0, True
    for name, group in texts.items():
        ids, decoded = got["ids"][at:at + len(group)], got["decoded"][at:at + len(group)]
        at += len(group)
        want = [[sp.bos_id()] + sp.encode(text) for text in group]
        wrong = [sum(a != b for a, b in zip(ids, want)), sum(d != sp.decode(w) for d, w in zip(decoded, want))]
        agreed &= not any(wrong)
        rows.append([label, name, f"{len(group):,}", f"{sum(map(len, want)):,}", *wrong,
                     sum(d != text for d, text in zip(decoded, group)),
                     sum(sp.decode(w) != text for w, text in zip(want, group))])
    same_prompt, same_answer = got["prompt"] == prompt, got["answer"] == ours
    agreed &= same_prompt and same_answer
    ending = "ends with EOT" if ours[-1] == tok.eot_id else "no EOT"
    notes = [f"{label}: the tiny preset, random, {model.num_params() / 1e6:.1f}M parameters, fp32, exported and "
             f"loaded by {got['tokenizer']} and {got['model']} with sentencepiece, protobuf and tiktoken "
             f"unimportable; export {export_s:.1f} s (tokenizer.json {size_mb:.1f} MB), the HF process {hf_s:.1f} s. "
             f"The prompt written as text ({cfg.prompt!r} + {convert.EOT!r}) gives sample.py's prompt ids: "
             f"{'yes' if same_prompt else 'NO'}; greedy answer of {len(ours)} tokens ({ending}): HF's equals "
             f"sample.py's token for token: {'yes' if same_answer else 'NO'}."]
    return rows, notes, agreed


def main(argv):
    cfg = parse_config(CheckConfig, argv)[0]
    load_before = os.getloadavg()[0]
    demo_turns = conversation_turns(ROOT / "data/demo/train.jsonl") + conversation_turns(ROOT / "data/demo/dev.jsonl")
    runs = [("data/tokenizer.model", ROOT / "data/tokenizer.model",
             {"drift cases": DRIFT_CASES, "data/demo turns": demo_turns})]
    if LLAMA_TOKENIZER.is_file():
        real = {"LIMA train turns": conversation_turns(LIMA_DATA)} if LIMA_DATA.is_file() else \
            {"data/demo turns": demo_turns}
        runs.append(("Meta's LLaMA", LLAMA_TOKENIZER, {"drift cases": DRIFT_CASES, **real}))
    rows, notes, agreed = [], [], True
    for label, tokenizer, texts in runs:
        r, n, ok = check(label, tokenizer, texts, cfg)
        rows, notes, agreed = rows + r, notes + n, agreed and ok
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("transformers", "tokenizers", "sentencepiece"))
    title = f"## {datetime.now():%Y-%m-%d %H:%M} HF export: {machine(load_before)}, {versions}"
    header = ["tokenizer", "texts", "how many", "tokens", "ids differ", "decode differs from sentencepiece's",
              "decode differs from the text", "(sentencepiece's decode differs from the text)"]
    command = f"    python bench/check_hf_export.py {' '.join(argv)}".rstrip()
    text = "\n".join([title, "", command, "", *markdown(header, rows), "", *notes])
    record(text, cfg.results)
    if not agreed:
        sys.exit("the export disagrees with sentencepiece or sample.py: see above")


if __name__ == "__main__":
    main(sys.argv[1:])
