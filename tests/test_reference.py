"""Reference model: equals transformers' MistralForCausalLM; KV-cache decode and layer-at-a-time equal the full
forward."""

import pytest
import torch

from quantkit.model.checkpoint import open_checkpoint
from quantkit.model.reference import KVCache, Transformer, sequence_inputs
from quantkit.testing import make_random_checkpoint

transformers = pytest.importorskip("transformers")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def hf_logits(path, tokens: torch.Tensor, attn: str = "sdpa") -> torch.Tensor:
    model = transformers.MistralForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn)
    with torch.no_grad():
        return model(tokens).logits


def prompts(vocab: int, lengths, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        t = torch.randint(3, vocab, (1, n), generator=gen)
        t[0, 0] = 1
        out.append(t)
    return out


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A random model with a small sliding window (16) so that a 48-token prompt crosses it."""
    return make_random_checkpoint(tmp_path_factory.mktemp("sw") / "m", sliding_window=16, seed=1, vocab=512,
                                  tokenizer=False)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("plain") / "m", seed=2)


def test_logits_match_transformers_short_prompts(plain):
    ref = Transformer.from_checkpoint(open_checkpoint(plain), torch.float32)
    for tokens in prompts(32000, [1, 7, 33]):
        with torch.no_grad():
            ours = ref(tokens)
        assert rel_err(ours, hf_logits(plain, tokens)) <= 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_match_transformers_beyond_sliding_window(windowed, attn):
    ckpt = open_checkpoint(windowed)
    assert ckpt.config.sliding_window == 16
    ref = Transformer.from_checkpoint(ckpt, torch.float32)
    (tokens,) = prompts(512, [48], seed=5)
    with torch.no_grad():
        ours = ref(tokens)
    theirs = hf_logits(windowed, tokens, attn)
    assert rel_err(ours, theirs) <= 1e-4
    # the window matters: without it the late positions differ
    ref.config.sliding_window = None
    try:
        with torch.no_grad():
            unwindowed = ref(tokens)
    finally:
        ref.config.sliding_window = 16
    assert rel_err(unwindowed[:, 16:], theirs[:, 16:]) > 1e-3
    assert rel_err(unwindowed[:, :16], theirs[:, :16]) <= 1e-4


def test_consolidated_layout_gives_same_logits(tmp_path, plain):
    cons = make_random_checkpoint(tmp_path / "c", layout="consolidated", seed=2)
    (tokens,) = prompts(32000, [20])
    with torch.no_grad():
        a = Transformer.from_checkpoint(open_checkpoint(plain), torch.float32)(tokens)
        b = Transformer.from_checkpoint(open_checkpoint(cons), torch.float32)(tokens)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fixture", ["plain", "windowed"])
def test_kv_cache_decode_equals_full_forward(fixture, request):
    path = request.getfixturevalue(fixture)
    model = Transformer.from_checkpoint(open_checkpoint(path), torch.float32)
    (tokens,) = prompts(model.config.vocab_size, [40], seed=9)
    with torch.no_grad():
        full = model(tokens)
        caches = model.setup_caches(1, 64)
        # module state: one static KVCache per layer, attached to its attention, not in the state dict
        assert [layer.self_attn.kv_cache for layer in model.model.layers] == caches
        assert all(isinstance(c, KVCache) and c.k.shape == (1, model.config.num_key_value_heads, 64,
                                                             model.config.head_dim) for c in caches)
        assert list(model.state_dict()) == open_checkpoint(path).tensor_names()
        pieces = [model(tokens[:, :10])]
        for pos in range(10, 30):
            pieces.append(model(tokens[:, pos:pos + 1], start_pos=pos))
        pieces.append(model(tokens[:, 30:], start_pos=30))
        with pytest.raises(ValueError, match="KV cache overflow"):
            model(tokens[:, :30], start_pos=40)
        model.reset_caches()
        assert all(layer.self_attn.kv_cache is None for layer in model.model.layers)
        with pytest.raises(ValueError, match="needs KV caches"):
            model(tokens[:, :1], start_pos=3)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


def test_layer_at_a_time_equals_whole(windowed):
    model = Transformer.from_checkpoint(open_checkpoint(windowed), torch.float32)
    (tokens,) = prompts(512, [30], seed=4)
    with torch.no_grad():
        whole = model(tokens)
        h = model.embed(tokens)
        positions, rope, mask = sequence_inputs(model.config, tokens.shape[1], dtype=h.dtype)
        for layer in model.model.layers:
            h = layer(h, positions, rope, mask)
        pieces = model.head(h)
        # and sub-step by sub-step (what the GPTQ staging and AWQ's search run)
        h = model.embed(tokens)
        for layer in model.model.layers:
            mid = layer.attention_output(h, layer.attention_core(layer.attention_input(h), positions, rope, mask))
            h = layer.mlp_output(mid, layer.mlp_hidden(layer.mlp_input(mid)))
        steps = model.head(h)
    assert torch.equal(pieces, whole) and torch.equal(steps, whole)


def test_bf16_forward_close_to_fp32(plain):
    ckpt = open_checkpoint(plain)
    (tokens,) = prompts(32000, [16])
    with torch.no_grad():
        f32 = Transformer.from_checkpoint(ckpt, torch.float32)(tokens)
        b16 = Transformer.from_checkpoint(ckpt, torch.bfloat16)(tokens)
    assert b16.dtype == torch.bfloat16
    assert rel_err(b16.float(), f32) < 0.05


def test_state_dict_names_are_canonical(plain):
    ckpt = open_checkpoint(plain)
    model = Transformer.from_checkpoint(ckpt, torch.bfloat16)
    assert list(model.state_dict()) == ckpt.tensor_names()
    # same dtype: the checkpoint tensor is assigned, not copied again
    assert torch.equal(model.model.norm.weight, ckpt.get_tensor("model.norm.weight"))


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("window", [None, 8], ids=["causal", "window"])
def test_attention_fast_path_is_bitwise_the_explicit_computation(kv_heads, window):
    """Attention over whole sequences reads the shared key/value heads in place and lets SDPA apply a plain causal
    mask itself; RoPE runs half by half. Bitwise the same as repeated heads under the explicit mask and the textbook
    x*cos + rotate_half(x)*sin."""
    import torch.nn.functional as F

    from quantkit.kernels.rope import rotate_half
    from quantkit.model.config import ModelConfig
    from quantkit.model.reference import Attention, _is_causal, causal_mask

    cfg = ModelConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=100)
    g = torch.Generator().manual_seed(7)
    attn = Attention(cfg)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
    t = 32
    positions, rope, mask = sequence_inputs(cfg, t)
    if window is not None:
        mask = causal_mask(positions, t, window)
    x = torch.randn(6, t, 128, generator=g)
    cos, sin = rope
    d, groups = cfg.head_dim, 4 // kv_heads

    def heads(y, n):
        return y.reshape(6, t, n, d).transpose(1, 2)

    with torch.no_grad():
        q, k, v = heads(attn.q_proj(x), 4), heads(attn.k_proj(x), kv_heads), heads(attn.v_proj(x), kv_heads)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, dim=1),
                                             v.repeat_interleave(groups, dim=1), attn_mask=mask)
        want = attn.o_proj(out.transpose(1, 2).reshape(6, t, 4 * d))
        assert torch.equal(attn(x, positions, rope, mask), want)
    assert _is_causal(mask, t) == (window is None)
