"""
A from-scratch LLaMA (LLaMA-1 and LLaMA-2) in one file, with Meta's names and numerics.

    python -c "from model import *; m = Transformer(ModelArgs.from_name('tiny', vocab_size=1000)); print(m.num_params())"

Parameter and module names are exactly Meta's (tok_embeddings, layers.{i}.attention.wq, ...,
feed_forward.w1/w2/w3, attention_norm, ffn_norm, norm, output), so loading one of Meta's
checkpoints is a key map, not a translation. Nothing distributed lives here: train.py applies
activation checkpointing and FSDP from outside, sample.py applies tensor parallelism from outside.
The loss lives in train.py too: the model maps tokens to logits, or to the final hidden states
that the loss turns into logits chunk by chunk (Transformer.hidden).

Dimension legend used in the shape comments:
    B  batch size                 T   tokens in this call
    D  model width (dim)          V   vocabulary size
    H  query heads                Hkv key/value heads (H / Hkv queries share one kv head: GQA)
    hd head dim (D / H)           S   key/value length (the KV cache's length when decoding)
"""

import json
import math
import pickle
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    # Field names are those of Meta's params.json, so that file loads as it is.
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many kv heads as query heads (plain multi-head)
    vocab_size: int = -1  # Meta writes -1: the tokenizer decides
    multiple_of: int = 256  # the feed-forward width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Not in Meta's params.json:
    max_seq_len: int = 2048  # longest sequence the RoPE table and the KV cache cover
    resid_dropout: float = 0.0  # residual dropout of the top layer; the bottom layer gets 0

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in SIZE_ARGS:  # a size of zero or less builds no model (n_heads 0 divides by zero)
            if not is_integer(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        if not is_integer(self.vocab_size) or not (self.vocab_size >= 1 or self.vocab_size == -1):
            raise ValueError(f"vocab_size must be a positive integer or -1 (the tokenizer decides), "
                             f"not {self.vocab_size!r}")
        for name, low, high in NUMBER_ARGS:
            value = getattr(self, name)
            if value is None and name in OPTIONAL_ARGS:
                continue
            if not is_number(value) or not (value > low if high is None else low <= value <= high):
                raise ValueError(f"{name} must be a number " + (f"greater than {low:g}" if high is None else
                                 f"in [{low:g}, {high:g}]") + f", not {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads {self.n_heads} does not divide dim {self.dim}: every head has "
                             f"dim / n_heads channels")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads {self.n_kv_heads} does not divide n_heads {self.n_heads}: "
                             f"each kv head serves the same number of query heads")
        if self.head_dim % 2:
            raise ValueError(f"the head dim, dim {self.dim} / n_heads {self.n_heads} = {self.head_dim}, "
                             f"is odd: RoPE rotates pairs of channels")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Meta's SwiGLU width: 2/3 of 4*dim (same FLOPs as a 4*dim GELU MLP), scaled, rounded up."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelArgs":
        """A preset from CONFIGS, with fields overridden (vocab_size, say)."""
        if name not in CONFIGS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(CONFIGS)}")
        return cls(**{**CONFIGS[name], **overrides})

    @classmethod
    def from_params(cls, path, **overrides) -> "ModelArgs":
        """Read a Meta params.json (or ours, which adds max_seq_len, resid_dropout)."""
        try:
            params = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(params, dict):
            raise ValueError(f"{path}: expected a JSON object of the model's parameters (dim, n_layers, "
                             f"n_heads, ...), not {type(params).__name__} {str(params)[:40]}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; expected some of "
                             f"{', '.join(sorted(known))}")
        missing = [name for name in REQUIRED_ARGS if name not in params]
        if missing:  # the defaults are LLaMA-7B's: a file without its shape is not a model's
            raise ValueError(f"{path}: no {', '.join(missing)}; a params.json gives at least "
                             f"{', '.join(REQUIRED_ARGS)}")
        try:  # __post_init__ checks every value: its type, its range, the heads
            return cls(**{**params, **overrides})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


OPTIONAL_ARGS = ("n_kv_heads", "ffn_dim_multiplier")  # may be null in a params.json
REQUIRED_ARGS = ("dim", "n_layers", "n_heads")  # in every params.json Meta and convert.py write
SIZE_ARGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len")  # positive integers
NUMBER_ARGS = (("ffn_dim_multiplier", 0, None), ("norm_eps", 0, None), ("rope_theta", 0, None),
               ("resid_dropout", 0, 1))  # (name, low, high): > low, or in [low, high]


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is not a size


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Meta's released shapes. Counts at vocab 32,000 (checked in tests/test_model.py):
# llama-7b 6,738,415,616   llama-13b 13,015,864,320   llama-33b 32,528,943,616
# llama-65b 65,285,660,672   llama2-70b 68,976,648,192
CONFIGS = {
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-6),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-6),
    "llama-33b": dict(dim=6656, n_layers=60, n_heads=52, norm_eps=1e-6),
    "llama-65b": dict(dim=8192, n_layers=80, n_heads=64, norm_eps=1e-6),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, max_seq_len=4096),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, max_seq_len=4096),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                       multiple_of=4096, max_seq_len=4096),
    # The CPU demo and the tests: small enough to train in minutes on two cores, and with
    # fewer kv heads than query heads so that grouped-query attention is always exercised.
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=32, max_seq_len=1024),
}


# The dtypes by the names every script's --dtype takes (each script offers those that make sense
# for it: train.py computes in fp32 or bf16, an export writes fp32 or bf16).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """--device: cpu, cuda or cuda:N; auto is the GPU if there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device) -> torch.dtype:
    """--dtype: a name of DTYPES, or auto: bf16 on a GPU (its tensor cores' format), fp32 on the CPU
    (where most CPUs have no bf16 arithmetic: it would be slower and less precise)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name}: not a dtype here; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 and fp16 go up, float64 stays): for norms and rotations."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 whatever the input dtype (as Meta does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # In bf16 the mean of squares over 8192 channels would lose most of its precision.
        xf = upcast(x)
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight

    def init_weights(self):
        nn.init.ones_(self.weight)


# Rotary embeddings, Meta's convention: the head dimension is read as hd/2 *adjacent pairs*
# (x[2i], x[2i+1]) and pair i at position p is rotated by the angle p * theta^(-2i/hd). Meta's
# code does this with complex numbers; here it is the same rotation in real arithmetic, which
# torch.compile and every backend handle. Hugging Face instead rotates the halves (x[i],
# x[i+hd/2]) and permutes the rows of wq and wk to compensate: convert.py undoes that
# permutation, so Meta's weights load here unpermuted.
def precompute_freqs_cis(head_dim: int, end: int, theta: float) -> torch.Tensor:
    """cos and sin of every (position, pair) angle: (end, hd/2, 2), float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(end, dtype=torch.float32), inv_freq)  # (end, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # (end, hd/2, 2)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, T, H, hd) by freqs_cis (T or B,T, hd/2, 2)."""
    B, T, H, hd = x.shape
    xp = upcast(x).reshape(B, T, H, hd // 2, 2)  # (B, T, H, hd/2, 2): the pairs
    fc = freqs_cis.view(-1, T, 1, hd // 2, 2)  # (1 or B, T, 1, hd/2, 2): broadcast over heads
    cos, sin = fc[..., 0], fc[..., 1]
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)  # (B, T, H, hd/2, 2)
    return out.flatten(3).type_as(x)  # (B, T, H, hd)


class KVCache(nn.Module):
    """Preallocated keys and values for decoding: static shapes, so the decode step compiles."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, Hkv, S, hd)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, at: "CacheSlots", k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, hd) of the cache rows at.rows at their positions at.positions
        (B, T); return those rows' first at.length slots, (B, Hkv, length, hd) each."""
        rows = at.rows if at.rows is not None else torch.arange(k.size(0), device=k.device)
        self.k_cache[rows[:, None], :, at.positions] = k.transpose(1, 2)  # indexed: (B, T, Hkv, hd)
        self.v_cache[rows[:, None], :, at.positions] = v.transpose(1, 2)
        if at.rows is None:  # every row, in order: a view, nothing copied
            return self.k_cache[:, :, :at.length], self.v_cache[:, :, :at.length]
        return self.k_cache[at.rows, :, :at.length], self.v_cache[at.rows, :, :at.length]


@dataclass
class CacheSlots:
    """Where a forward_cached call reads and writes the KV cache: rows (B,) of the cache (None:
    all of them, in order), each token's position (B, T), and how many leading slots attention
    reads (the filled part: every row's positions are below it)."""
    rows: torch.Tensor | None
    positions: torch.Tensor
    length: int


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None  # set by Transformer.setup_cache, for generation only

    def forward(self, x, freqs_cis, mask=None, at=None, doc_lens=None):
        """x (B, T, D) -> (B, T, D). Causal attention over x itself unless given a mask (the KV
        cache's) or doc_lens (a packed row of conversations: causal within each one)."""
        B, T, _ = x.shape
        # Head counts come from the weights' shapes (-1), not from args, so that tensor
        # parallelism can hand each rank a slice of the heads without touching this code.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, hd)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, hd)
        if self.kv_cache is not None and at is not None:
            k, v = self.kv_cache.update(at, k, v)  # (B, Hkv, length, hd)
        # Grouped-query attention: each kv head serves H/Hkv query heads. SDPA does the
        # grouping itself (enable_gqa) instead of materialising repeated keys and values.
        if doc_lens is not None and len(doc_lens) > 1:
            y = packed_attention(q, k, v, doc_lens)  # (1, H, T, hd)
        elif T == 1 and mask is not None and x.device.type == "cpu":
            y = one_token_attention(q, k, v, mask)  # (B, H, 1, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=q.size(1) != k.size(1))  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*hd)
        return self.wo(y)

    def init_weights(self, out_std: float):
        for w in (self.wq, self.wk, self.wv):
            nn.init.normal_(w.weight, std=0.02)
        nn.init.normal_(self.wo.weight, std=out_std)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down projection, back to the residual
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up projection

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, out_std: float):
        nn.init.normal_(self.w1.weight, std=0.02)
        nn.init.normal_(self.w3.weight, std=0.02)
        nn.init.normal_(self.w2.weight, std=out_std)


def resid_dropout_rate(layer_id: int, n_layers: int, top: float) -> float:
    """LIMA's residual dropout: 0 at the bottom layer rising linearly to `top` at the last.

    LIMA (section 2) found dropout on the residual connections helps when fine-tuning on only
    1,000 examples; lower layers hold general features and get little, upper layers most.
    """
    return top * layer_id / max(n_layers - 1, 1)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        # Dropout on each branch's output before it joins the residual stream; nn.Dropout
        # is the identity in eval mode, so generation is deterministic.
        self.resid_dropout = nn.Dropout(resid_dropout_rate(layer_id, args.n_layers, args.resid_dropout))

    def forward(self, x, freqs_cis, mask=None, at=None, doc_lens=None):
        h = x + self.resid_dropout(self.attention(self.attention_norm(x), freqs_cis, mask, at, doc_lens))
        return h + self.resid_dropout(self.feed_forward(self.ffn_norm(h)))

    def init_weights(self, out_std: float):
        self.attention.init_weights(out_std)
        self.feed_forward.init_weights(out_std)
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size is unset (Meta's params.json says -1): "
                             "pass the tokenizer's vocabulary size")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Not a saved weight: recomputed by init_buffers() after the model leaves the meta device.
        self.register_buffer("freqs_cis", precompute_freqs_cis(args.head_dim, args.max_seq_len,
                                                               args.rope_theta), persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                doc_lens: list[int] | None = None) -> torch.Tensor:
        """Scoring: tokens (B, T) -> logits (B, T, V), causal attention."""
        return self.output(self.hidden(tokens, positions, doc_lens))  # (B, T, V)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
               doc_lens: list[int] | None = None) -> torch.Tensor:
        """Everything but the output projection: tokens (B, T) -> final normed states (B, T, D).

        Training stops here: train.py's loss applies self.output itself, a chunk of positions at
        a time, so that the (T, V) logits of a long row never exist at once.
        For a row that packs several conversations (B = 1), positions (1, T) restart at 0 in
        each one and doc_lens lists their lengths, so that attention stays inside each one.
        """
        T = tokens.size(1)
        freqs_cis = self.freqs_cis[:T] if positions is None else self.freqs_cis[positions]
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for layer in self.layers:
            h = layer(h, freqs_cis, doc_lens=doc_lens)
        return self.norm(h)  # (B, T, D)

    # ---- generation: a static KV cache, prefill then one token at a time ----

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None):
        """Allocate a KV cache in every layer (sized from the weights, so TP shards get theirs)."""
        max_seq_len = max_seq_len or self.args.max_seq_len
        w = self.layers[0].attention.wk.weight
        for layer in self.layers:
            n_kv_heads = layer.attention.wk.weight.size(0) // self.args.head_dim
            layer.attention.kv_cache = KVCache(batch_size, n_kv_heads, max_seq_len, self.args.head_dim,
                                               dtype or w.dtype, device or w.device)

    def forward_cached(self, tokens: torch.Tensor, at: CacheSlots, last: torch.Tensor | None = None) -> torch.Tensor:
        """Decoding: tokens (B, T) of cache rows at.rows at positions at.positions -> logits (B, T, V),
        or with last (B,) only each row's logits at index last[b]: (B, 1, V).

        Every row of the cache is a conversation of its own at its own position (continuous
        batching: a row that finishes takes the next prompt while the others go on). A token
        attends to its row's slots up to its own position, and only the first at.length slots
        are read at all: a step pays for the filled part of the cache, not for all of it. Slots
        past a row's position (a longer conversation that held the row before) are masked out.
        """
        slots = torch.arange(at.length, device=tokens.device)
        mask = slots[None, None, :] <= at.positions[:, :, None]  # (B, T, length): causal, per row
        freqs_cis = self.freqs_cis[at.positions]  # (B, T, hd/2, 2)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask[:, None], at)  # mask (B, 1, T, length): over heads
        if last is not None:  # a prefill needs the prediction after each prompt's last token only:
            h = h[torch.arange(h.size(0), device=h.device), last][:, None]  # (B, 1, D), not (B, T, V) logits
        return self.output(self.norm(h))

    # ---- initialisation, loading, vocabulary ----

    def init_buffers(self):
        """Fill the RoPE table (float32) on the device the parameters live on."""
        device = self.tok_embeddings.weight.device
        self.freqs_cis = precompute_freqs_cis(self.args.head_dim, self.args.max_seq_len,
                                              self.args.rope_theta).to(device)

    def to_device(self, device=None, dtype: torch.dtype | None = None) -> "Transformer":
        """Move (and cast) the weights, then recompute the RoPE table there: .to(dtype) casts the
        table too, and in bf16 its cosines and sines keep 8 bits: the table stays float32."""
        self.to(device=device, dtype=dtype)
        self.init_buffers()
        return self

    @torch.no_grad()
    def init_weights(self):
        """Random init for training from scratch; separate from __init__ so a model built on the
        meta device can be sharded first and then materialised (to_empty + init_weights).

        N(0, 0.02) everywhere, except the two projections that write into the residual stream
        (attention.wo, feed_forward.w2), chosen by role, which get 0.02 / sqrt(2 * n_layers)
        so the residual's variance does not grow with depth (GPT-2).
        """
        self.init_buffers()
        nn.init.normal_(self.tok_embeddings.weight, std=0.02)
        out_std = 0.02 / math.sqrt(2 * self.args.n_layers)
        for layer in self.layers:
            layer.init_weights(out_std)
        self.norm.init_weights()
        nn.init.normal_(self.output.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def grow_vocab(self, n_new: int):
        """Add n_new tokens (LIMA's EOT) as new rows of tok_embeddings and output."""
        self.tok_embeddings.weight = nn.Parameter(extend_vocab(self.tok_embeddings.weight, n_new))
        self.output.weight = nn.Parameter(extend_vocab(self.output.weight, n_new))
        self.tok_embeddings.num_embeddings = self.output.out_features = self.args.vocab_size = \
            self.tok_embeddings.weight.size(0)


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd dict of tensors (model.pth), memory-mapped, never unpickling anything else.

    weights_only=True refuses any class or function in the pickle (which a planted file would
    use to run code): refused here in one line, as is a truncated or foreign file.
    """
    try:
        tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:  # weights_only met a class or function: its pickle could run code
        raise ValueError(f"{path}: refused: it pickles objects other than tensors, and loading "
                         f"them could run code") from None
    except Exception as e:  # a truncated file loses its zip index first
        detail = str(e).partition("\n")[0]
        raise ValueError(f"{path}: unreadable, truncated or not a checkpoint ({detail})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{path}: holds no dict of tensors")
    return tensors


@torch.compiler.disable  # a loop over a varying number of conversations: run it eagerly
def packed_attention(q, k, v, doc_lens: list[int]) -> torch.Tensor:
    """Causal attention within each conversation of a packed row: (1, H, T, hd) -> (1, H, T, hd).

    One causal SDPA per conversation instead of one over the row with a (T, T) block-diagonal
    mask: the cost is the sum of len**2 rather than T**2 (a row of 4096 tokens holding six
    conversations does about 1/6 of the work), no mask is built, and each call can take the
    flash kernel, which does not accept an arbitrary mask.
    """
    gqa = q.size(1) != k.size(1)
    parts = zip(q.split(doc_lens, dim=2), k.split(doc_lens, dim=2), v.split(doc_lens, dim=2))
    return torch.cat([F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa)
                      for qd, kd, vd in parts], dim=2)


def one_token_attention(q, k, v, mask) -> torch.Tensor:
    """A decode step's attention, written out: q (B, H, 1, hd) over k, v (B, Hkv, S, hd) where
    mask (B, 1, 1, S) is True -> (B, H, 1, hd), what SDPA gives.

    For one query token it is two matrix-vector products per head. On the CPU, SDPA is a call
    torch.compile cannot look into; written as plain ops, inductor fuses them into the loops of
    the layer around them (a 100m model's compiled step: 0.5 ms of 18 faster, 12 calls fewer).
    """
    B, H, _, hd = q.shape
    g = q.view(B, k.size(1), H // k.size(1), hd)  # (B, Hkv, G, hd): the G query heads of each kv head
    scores = (g @ k.transpose(-1, -2)) * hd**-0.5  # (B, Hkv, G, S)
    scores = upcast(scores).masked_fill(~mask, float("-inf"))  # softmax in >= float32, as SDPA's
    return (scores.softmax(dim=-1).to(v.dtype) @ v).view(B, H, 1, hd)


def extend_vocab(weight: torch.Tensor, n_new: int) -> torch.Tensor:
    """Append n_new rows equal to the mean of the existing rows: (V, D) -> (V + n_new, D).

    A new token starts at the centroid of the vocabulary: its embedding looks like an average
    token to the layers above, and its output logit is the average logit, so it neither
    dominates the softmax before training (as a random row of large norm can) nor starts
    unreachably low (Hewitt 2021, "Initializing new word embeddings"). Mean in >= float32.
    """
    mean = upcast(weight).mean(dim=0, keepdim=True).to(weight.dtype)  # (1, D)
    return torch.cat([weight, mean.expand(n_new, -1)], dim=0)


def vocab_rows(state_dict: dict, source: str) -> int:
    """The vocabulary size of a state dict in Meta's names: the rows of its tok_embeddings."""
    if "tok_embeddings.weight" not in state_dict:
        raise ValueError(f"{source}: no tok_embeddings.weight; not a LLaMA in Meta's names")
    return state_dict["tok_embeddings.weight"].size(0)


def check_state_dict(model: nn.Module, state_dict: dict, source: str, config: str = "params.json"):
    """Raise one clear error naming the first missing, unexpected or misshapen key.

    The values only need a .shape (meta tensors will do); config names the file the model's shape
    came from, for the message.
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{source}: {len(missing)} missing key(s) {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}")
    for k, shape in expected.items():
        if state_dict[k].shape != shape:
            raise ValueError(f"{source}: {k} has shape {tuple(state_dict[k].shape)} but {config} "
                             f"implies {tuple(shape)}")
