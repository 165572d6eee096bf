"""
What the benchmarks against Hugging Face transformers share: our weights in an HF LlamaForCausalLM,
a quiet machine to measure on, and a record of who else used the CPUs while we measured.

transformers is a benchmark-only dependency (bench/requirements.txt); the library never imports it:
    pip install -r bench/requirements.txt
"""

import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert import hf_name, permute_to_hf, rotated_heads  # noqa: E402
from model import ModelArgs  # noqa: E402

# The shapes compared (vocabulary: Meta's 32,000 pieces + EOT). "tiny" is the demo preset, whose
# 16M parameters are mostly the embedding and output; "100m" is bench_decode.py's.
MODELS = {
    "tiny": ModelArgs.from_name("tiny", vocab_size=32001, max_seq_len=4096),  # 19M
    "100m": ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32001, multiple_of=256, max_seq_len=4096),  # 134M
}
LIMA_DATA = Path("/work/shared/data/lima/train.jsonl")
LLAMA_TOKENIZER = Path("/work/shared/tokenizers/llama/tokenizer.model")


def hf_llama(args: ModelArgs, state_dict: dict, dtype=torch.float32):
    """An HF LlamaForCausalLM (attention by torch SDPA) holding exactly our weights.

    Names map by convert.hf_name; the rows of wq and wk are permuted (convert.permute_to_hf)
    because HF rotates the two halves of a head where Meta and model.py rotate adjacent pairs.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
        hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    hf_state = {}
    for k, w in state_dict.items():
        heads = rotated_heads(k, args)
        hf_state[hf_name(k)] = (w if heads is None else permute_to_hf(w, heads)).to(dtype).clone()
    missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"HF LLaMA: missing {missing[:3]}, unexpected {unexpected[:3]}")
    # Buffers (the rotary inverse frequencies) are not in the state dict: rebuild them on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


# ---- measuring honestly on a shared 2-core machine ----

def wait_quiet(limit: float = 0.7, max_wait_s: float = 300) -> float:
    """Wait (up to max_wait_s) until the 1-minute load average is below limit; return it."""
    t0 = time.time()
    while os.getloadavg()[0] > limit and time.time() - t0 < max_wait_s:
        time.sleep(10)
    return os.getloadavg()[0]


def busy_cpu_s() -> float:
    """CPU seconds spent by everything on the machine since boot (user + nice + system + ...)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and of its finished children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class OthersCPU:
    """CPU taken by other processes while a measurement ran, as a share of the whole machine.

    The load average lags by a minute and counts our own threads; this counts only the others:
    (all busy CPU time) - (ours), over (wall time x CPUs). A few percent is the kernel and noise.
    """

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), busy_cpu_s(), own_cpu_s()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        others = (busy_cpu_s() - self.busy0) - (own_cpu_s() - self.own0)
        self.share = max(others, 0.0) / (wall * os.cpu_count())


def read_bandwidth_gbs(gb: float = 2.0, repeats: int = 5) -> float:
    """The memory read bandwidth this process gets, in GB/s: the best of `repeats` sums over a
    float32 tensor of `gb` GB, far larger than any cache (a sum reads each byte once and its
    arithmetic is cheap, as a decode step's reads of the weights are)."""
    x = torch.ones(int(gb * 1e9 / 4))
    x.sum()  # the pages faulted in before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def cpu_name() -> str:
    """The CPU's model name (VMs of one kernel and platform string have run on AMD and Intel hosts)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def machine(load_before: float) -> str:
    """The header line every results table carries."""
    pages = "on" if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else "off"
    return (f"{platform.platform()}, {cpu_name()}, {torch.get_num_threads()} threads of {os.cpu_count()} CPUs, "
            f"huge pages for tensors {pages}, load {load_before:.2f} before and {os.getloadavg()[0]:.2f} after, "
            f"torch {torch.__version__}")


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM: anonymous and mapped file pages), in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def record(text: str, results: str):
    """Print a benchmark's table and append it to results (a path relative to the repository; "" to
    skip), as every benchmark keeps its figures: with the machine and the date in its title."""
    print(text)
    if results:
        with open(ROOT / results, "a") as f:  # others append to this file too: never overwrite
            f.write("\n" + text + "\n")


def markdown(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(v) for v in row) + " |" for row in rows)]
