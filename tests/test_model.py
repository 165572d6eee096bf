"""model.py against an independent reference: Meta's complex-number RoPE, explicit attention loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import (CacheSlots, ModelArgs, Transformer, apply_rotary_emb, extend_vocab, one_token_attention,
                   precompute_freqs_cis, resolve_device, resolve_dtype)

TINY = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=101, multiple_of=16,
            max_seq_len=64)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**TINY, **overrides}))
    model.init_weights()
    # float64 so the tolerances can be tight; what remains (~1e-7) is the RoPE table, which
    # model.py computes in float32 as Meta does.
    return model.double().eval()


# ---- the reference: Meta's llama/model.py, rewritten functionally and with explicit loops ----

def ref_rope(x, theta=10000.0, start=0):
    """Meta's complex RoPE: view adjacent pairs as complex numbers, multiply by e^{i p w}."""
    B, T, H, hd = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2)[: hd // 2].double() / hd)
    t = torch.arange(start, start + T).double()
    freqs_cis = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.outer(t, freqs))
    xc = torch.view_as_complex(x.double().reshape(B, T, H, hd // 2, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)


def ref_attention(attn, x, start=0):
    """One head and one query at a time: softmax(q.k / sqrt(hd)) over earlier keys, GQA by index."""
    B, T, D = x.shape
    hd = attn.head_dim
    q = ref_rope((x @ attn.wq.weight.T).view(B, T, -1, hd), start=start)
    k = ref_rope((x @ attn.wk.weight.T).view(B, T, -1, hd), start=start)
    v = (x @ attn.wv.weight.T).view(B, T, -1, hd)
    H, Hkv = q.size(2), k.size(2)
    out = torch.zeros(B, T, H, hd, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)  # query head h reads kv head h // n_rep (Meta's repeat_kv)
            for t in range(T):
                scores = torch.stack([q[b, t, h] @ k[b, s, kv] for s in range(t + 1)]) / math.sqrt(hd)
                out[b, t, h] = torch.softmax(scores, 0) @ v[b, : t + 1, kv]
    return out.reshape(B, T, H * hd) @ attn.wo.weight.T


def ref_rmsnorm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def ref_block(block, x, eps):
    h = x + ref_attention(block.attention, ref_rmsnorm(x, block.attention_norm.weight, eps))
    ff = block.feed_forward
    y = ref_rmsnorm(h, block.ffn_norm.weight, eps)
    return h + (F.silu(y @ ff.w1.weight.T) * (y @ ff.w3.weight.T)) @ ff.w2.weight.T


def ref_model(model, tokens):
    eps = model.args.norm_eps
    h = model.tok_embeddings.weight[tokens]
    for block in model.layers:
        h = ref_block(block, h, eps)
    return ref_rmsnorm(h, model.norm.weight, eps) @ model.output.weight.T


# ---- sizes ----

@pytest.mark.parametrize("name,count", [
    ("llama-7b", 6_738_415_616), ("llama-13b", 13_015_864_320), ("llama-33b", 32_528_943_616),
    ("llama-65b", 65_285_660_672), ("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320),
    ("llama2-70b", 68_976_648_192)])
def test_parameter_counts_on_meta_device(name, count):
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name(name, vocab_size=32000))
    assert model.num_params() == count
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing was allocated


def test_state_dict_keys_are_metas():
    model = Transformer(ModelArgs(**{**TINY, "n_layers": 1}))
    assert set(model.state_dict()) == {
        "tok_embeddings.weight", "norm.weight", "output.weight",
        "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
        "layers.0.attention.wv.weight", "layers.0.attention.wo.weight",
        "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
        "layers.0.feed_forward.w3.weight", "layers.0.attention_norm.weight",
        "layers.0.ffn_norm.weight"}


def test_params_json_from_meta(tmp_path):
    # llama-65b's params.json as Meta ships it.
    (tmp_path / "params.json").write_text(
        '{"dim": 8192, "multiple_of": 256, "n_heads": 64, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}')
    args = ModelArgs.from_params(tmp_path / "params.json", vocab_size=32000)
    assert (args.dim, args.n_layers, args.n_kv_heads, args.hidden_dim) == (8192, 80, 64, 22016)
    with pytest.raises(ValueError, match="vocab_size is unset"):
        Transformer(ModelArgs.from_params(tmp_path / "params.json"))
    (tmp_path / "params.json").write_text('{"dim": 64, "n_layer": 2}')
    with pytest.raises(ValueError, match="unknown key.*n_layer"):
        ModelArgs.from_params(tmp_path / "params.json")


# ---- parity with the reference ----

def test_rope_matches_metas_complex_rope():
    x = torch.randn(2, 9, 3, 16, dtype=torch.float64)
    ours = apply_rotary_emb(x, precompute_freqs_cis(16, 32, 10000.0)[:9].double())
    torch.testing.assert_close(ours, ref_rope(x), rtol=1e-6, atol=1e-6)
    # Per-row positions (packed rows) give the same rotation as the table slice.
    pos = torch.arange(4, 13).expand(2, 9)
    ours = apply_rotary_emb(x, precompute_freqs_cis(16, 32, 10000.0)[pos].double())
    torch.testing.assert_close(ours, ref_rope(x, start=4), rtol=1e-6, atol=1e-6)


def test_attention_with_gqa_matches_reference():
    model = tiny_model()
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    ours = model.layers[0].attention(x, model.freqs_cis[:7])
    torch.testing.assert_close(ours, ref_attention(model.layers[0].attention, x), rtol=1e-5, atol=1e-6)


def test_block_matches_reference():
    model = tiny_model()
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    ours = model.layers[1](x, model.freqs_cis[:7])
    torch.testing.assert_close(ours, ref_block(model.layers[1], x, model.args.norm_eps), rtol=1e-5, atol=1e-6)


def test_full_model_matches_reference():
    model = tiny_model()
    tokens = torch.randint(0, 101, (2, 11))
    torch.testing.assert_close(model(tokens), ref_model(model, tokens), rtol=1e-5, atol=1e-6)


def test_gqa_equals_multihead_with_repeated_kv_heads():
    """GQA with 2 kv heads == plain MHA (n_kv_heads = n_heads) whose kv weights repeat each head."""
    gqa = tiny_model(n_kv_heads=2)
    mha = Transformer(ModelArgs(**{**TINY, "n_kv_heads": 4})).double().eval()
    mha.init_buffers()
    sd = gqa.state_dict()
    hd = gqa.args.head_dim
    for i in range(TINY["n_layers"]):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            # (Hkv*hd, D) -> (Hkv, hd, D) -> each head twice, in Meta's repeat_kv order
            sd[key] = sd[key].view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    tokens = torch.randint(0, 101, (2, 9))
    torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-9, atol=1e-9)
    # and with n_kv_heads = n_heads the model is plain multi-head attention (the reference's loop)
    torch.testing.assert_close(mha(tokens), ref_model(mha, tokens), rtol=1e-5, atol=1e-6)


def test_packed_rows_equal_separate_rows():
    """Two conversations packed in one row (positions restart, doc ids differ) == run alone."""
    model = tiny_model()
    a, b = torch.randint(0, 101, (1, 5)), torch.randint(0, 101, (1, 8))
    packed = model(torch.cat([a, b], 1), positions=torch.cat([torch.arange(5), torch.arange(8)])[None],
                   doc_lens=[5, 8])
    torch.testing.assert_close(packed, torch.cat([model(a), model(b)], 1), rtol=1e-9, atol=1e-9)


# ---- generation path ----

def slots(positions, length, rows=None):
    return CacheSlots(rows=None if rows is None else torch.tensor(rows), positions=positions, length=length)


def test_kv_cache_decoding_equals_full_forward_step_by_step():
    model = tiny_model()
    tokens = torch.randint(0, 101, (2, 12))
    full = model(tokens)
    model.setup_cache(batch_size=2, max_seq_len=32)
    logits = [model.forward_cached(tokens[:, :5], slots(torch.arange(5).expand(2, 5), 32))]  # prefill
    for t in range(5, 12):  # then one token at a time, reading only the filled slots
        logits.append(model.forward_cached(tokens[:, t : t + 1], slots(torch.full((2, 1), t), t + 1)))
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-9, atol=1e-9)


def test_rows_at_their_own_positions_decode_like_alone_and_a_reused_row_keeps_no_stale_keys():
    """Continuous batching's cache: row 0 holds a long conversation, row 1 is refilled with a
    short one while row 0 goes on; each row's logits are those of its text alone, and the slots
    the long text left in row 1 beyond the short one's position are never seen."""
    model = tiny_model()
    long, short, other = torch.randint(1, 101, (1, 9)), torch.randint(1, 101, (1, 3)), torch.randint(1, 101, (1, 9))
    model.setup_cache(batch_size=2, max_seq_len=16)
    model.forward_cached(torch.cat([long, other]), slots(torch.arange(9).expand(2, 9), 16))  # both rows long
    out = model.forward_cached(short, slots(torch.arange(3)[None], 16, rows=[1]))  # row 1 reused: short
    torch.testing.assert_close(out[0], model(short)[0], rtol=1e-7, atol=1e-8)
    step = model.forward_cached(torch.tensor([[5], [6]]), slots(torch.tensor([[9], [3]]), 10))  # both on
    assert torch.isfinite(step).all()
    torch.testing.assert_close(step[0, 0], model(torch.cat([long, torch.tensor([[5]])], 1))[0, -1])
    torch.testing.assert_close(step[1, 0], model(torch.cat([short, torch.tensor([[6]])], 1))[0, -1])


def test_reading_the_filled_slots_equals_reading_the_whole_cache():
    model = tiny_model()
    tokens = torch.randint(0, 101, (2, 6))
    model.setup_cache(batch_size=2, max_seq_len=64)
    model.forward_cached(tokens, slots(torch.arange(6).expand(2, 6), 64))
    nxt = torch.tensor([[7], [8]])
    whole = model.forward_cached(nxt, slots(torch.full((2, 1), 6), 64))
    filled = model.forward_cached(nxt, slots(torch.full((2, 1), 6), 7))
    torch.testing.assert_close(filled, whole, rtol=1e-6, atol=1e-7)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_attention_equals_sdpa_with_grouped_heads_and_masked_slots(dtype):
    """The decode step's written-out attention (the CPU's T == 1 path) against SDPA: 8 query heads
    over 2 kv heads, rows at different positions, slots past each row's position masked out."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    mask = torch.arange(40)[None, None, None, :] <= torch.tensor([0, 17, 39])[:, None, None, None]  # (3, 1, 1, 40)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = one_token_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got[0].float(), v[0, [0, 0, 0, 0, 1, 1, 1, 1], :1].to(dtype).float())  # row 0 sees slot 0 only

# ---- LIMA's residual dropout ----

def test_dropout_rises_linearly_from_bottom_to_top():
    model = Transformer(ModelArgs(**{**TINY, "n_layers": 5, "resid_dropout": 0.3}))
    assert [layer.resid_dropout.p for layer in model.layers] == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3])


def test_dropout_active_in_train_mode_and_off_in_eval():
    model = tiny_model(resid_dropout=0.3)
    tokens = torch.randint(0, 101, (2, 10))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens), rtol=0, atol=0)
    torch.testing.assert_close(model(tokens), ref_model(model, tokens), rtol=1e-5, atol=1e-6)


def test_dropout_is_on_the_branches_before_they_join_the_residual():
    """At rate 1 (the top layer of resid_dropout=1.0) both branches drop out entirely: the block
    passes its input through unchanged. Dropout after the add would zero the stream instead."""
    model = tiny_model(resid_dropout=1.0).train()
    top = model.layers[-1]
    x = torch.randn(2, 10, model.args.dim, dtype=torch.float64)
    torch.testing.assert_close(top(x, model.freqs_cis[:10]), x, rtol=0, atol=0)
    assert not torch.equal(model.layers[-2](x, model.freqs_cis[:10]), x)  # below the top: rate < 1


# ---- initialisation and vocabulary ----

def test_residual_projections_get_the_scaled_init_by_role():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**TINY, "dim": 256, "n_heads": 4, "n_layers": 8, "multiple_of": 256}))
    model.init_weights()
    small = 0.02 / math.sqrt(16)
    for layer in model.layers:
        assert layer.feed_forward.w2.weight.std().item() == pytest.approx(small, rel=0.05)
        assert layer.attention.wo.weight.std().item() == pytest.approx(small, rel=0.05)
        assert layer.feed_forward.w3.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert layer.attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_meta_device_then_init_weights_gives_a_working_model():
    with torch.device("meta"):
        model = Transformer(ModelArgs(**TINY))
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(torch.randint(0, 101, (1, 6)))).all()


def test_grow_vocab_appends_mean_rows_and_keeps_old_logits():
    model = tiny_model()
    tokens = torch.randint(0, 101, (1, 6))
    before = model(tokens)
    emb = model.tok_embeddings.weight.clone()
    model.grow_vocab(1)
    assert model.tok_embeddings.weight.shape == (102, 64) and model.output.weight.shape == (102, 64)
    torch.testing.assert_close(model.tok_embeddings.weight[101], emb.mean(0))
    after = model(tokens)
    torch.testing.assert_close(after[..., :101], before, rtol=1e-12, atol=1e-12)
    # the new token's logit is the mean of the old logits (the output row is their mean)
    torch.testing.assert_close(after[..., 101], before.mean(-1), rtol=1e-9, atol=1e-9)
    assert model(torch.tensor([[101]])).shape == (1, 1, 102)


def test_extend_vocab_keeps_dtype():
    w = torch.randn(10, 4).bfloat16()
    out = extend_vocab(w, 2)
    assert out.dtype == torch.bfloat16 and out.shape == (12, 4)


# ---- compile ----

def test_torch_compile_runs():
    model = tiny_model().float()
    tokens = torch.randint(0, 101, (1, 8))
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-4, atol=1e-4)


# ---- devices and dtypes: one rule for every script ----

def test_dtype_names_resolve_in_one_place_and_auto_follows_the_device():
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert [resolve_dtype(name, "cpu") for name in ("fp32", "bf16", "fp16")] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match=r"^--dtype fp8: not a dtype here; choose auto, fp32, bf16, fp16$"):
        resolve_dtype("fp8", "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^--device cuda:1: no CUDA device is available here; use --device cpu$"):
            resolve_device("cuda:1")


def test_to_device_casts_the_weights_and_keeps_the_rope_table_float32():
    model = tiny_model().float()
    model.to_device("cpu", torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16 and model.freqs_cis.dtype == torch.float32
    assert torch.equal(model.freqs_cis, precompute_freqs_cis(16, 64, 10000.0))
