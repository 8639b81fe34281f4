"""Checkpoint loader: layouts, Q/K permutation of consolidated, config spellings, validation errors."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from quantkit.errors import CheckpointError, ConfigError
from quantkit.model import arch
from quantkit.model.checkpoint import open_checkpoint
from quantkit.model.config import ModelConfig
from quantkit.testing import make_random_checkpoint


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {layout: make_random_checkpoint(root / layout, layout=layout, seed=3, shards=3)
            for layout in ("hf-sharded", "hf-single", "consolidated")}


def test_layouts_give_identical_tensors(layouts):
    ckpts = {layout: open_checkpoint(path) for layout, path in layouts.items()}
    assert {c.layout for c in ckpts.values()} == set(layouts)
    assert len(ckpts["hf-sharded"].files) == 3
    base = ckpts["hf-single"]
    assert base.tensor_names() == arch.canonical_names(2)
    for layout, ckpt in ckpts.items():
        assert ckpt.tensor_names() == base.tensor_names(), layout
        assert ckpt.config.summary() == base.config.summary() or layout == "consolidated"
        for name in base.tensor_names():
            assert torch.equal(ckpt.get_tensor(name), base.get_tensor(name)), (layout, name)
            assert ckpt.get_tensor(name).dtype == torch.bfloat16


def test_factory_is_deterministic(tmp_path):
    a = open_checkpoint(make_random_checkpoint(tmp_path / "a", seed=7))
    b = open_checkpoint(make_random_checkpoint(tmp_path / "b", seed=7))
    c = open_checkpoint(make_random_checkpoint(tmp_path / "c", seed=8))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(a.get_tensor(name), b.get_tensor(name))
    assert not torch.equal(a.get_tensor(name), c.get_tensor(name))


def _interleaved_rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """mistral-inference RoPE: consecutive pairs (2j, 2j+1) of a head rotate as complex numbers."""
    d = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(freqs), pos * freqs)).reshape(x.shape)


def _rotate_half_rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([pos * freqs, pos * freqs])
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return x.double() * ang.cos() + rot.double() * ang.sin()


def test_consolidated_qk_permutation_gives_same_attention_scores(layouts):
    """Raw consolidated Q/K rows with interleaved RoPE score exactly like the loader's HF rows with rotate-half RoPE."""
    path = layouts["consolidated"]
    ckpt = open_checkpoint(path)
    cfg = ckpt.config
    with safe_open(str(path / "consolidated.safetensors"), "pt") as f:
        wq_raw = f.get_tensor("layers.0.attention.wq.weight").double()
        wk_raw = f.get_tensor("layers.0.attention.wk.weight").double()
    wq_hf = ckpt.get_tensor("model.layers.0.self_attn.q_proj.weight").double()
    wk_hf = ckpt.get_tensor("model.layers.0.self_attn.k_proj.weight").double()
    assert not torch.equal(wq_raw, wq_hf)  # the permutation is real
    x = torch.randn(cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hd, group = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    for pq, pk in [(5, 2), (17, 17), (40, 3)]:
        q_raw = _interleaved_rope((wq_raw @ x).view(-1, hd), pq, cfg.rope_theta)
        k_raw = _interleaved_rope((wk_raw @ x).view(-1, hd), pk, cfg.rope_theta)
        q_hf = _rotate_half_rope((wq_hf @ x).view(-1, hd), pq, cfg.rope_theta)
        k_hf = _rotate_half_rope((wk_hf @ x).view(-1, hd), pk, cfg.rope_theta)
        scores_raw = (q_raw * k_raw.repeat_interleave(group, 0)).sum(-1)
        scores_hf = (q_hf * k_hf.repeat_interleave(group, 0)).sum(-1)
        torch.testing.assert_close(scores_raw, scores_hf, rtol=1e-10, atol=1e-10)


def test_permutation_round_trip():
    w = torch.randn(64, 8)
    assert torch.equal(arch.interleaved_to_hf(arch.hf_to_interleaved(w, 4), 4), w)
    assert not torch.equal(arch.hf_to_interleaved(w, 4), w)


V01 = {  # Mistral-7B-v0.1 config.json (abridged): sliding window 4096, rope_theta 1e4
    "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000,
}
V02 = {**V01, "rope_theta": 1000000.0, "sliding_window": None}


def test_config_v01_and_v02():
    v1 = ModelConfig.from_hf_dict(V01)
    v2 = ModelConfig.from_hf_dict(V02)
    assert (v1.sliding_window, v1.rope_theta) == (4096, 1e4)
    assert (v2.sliding_window, v2.rope_theta) == (None, 1e6)
    assert v2.head_dim == 128 and v2.kv_size == 1024
    assert v2.num_parameters() == 7241732096  # Mistral-7B's published parameter count


def test_config_spellings_rope_parameters_and_dtype():
    new_style = {k: v for k, v in V02.items() if k not in ("rope_theta", "torch_dtype")}
    new_style["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    new_style["dtype"] = "float16"
    cfg = ModelConfig.from_hf_dict(new_style)
    assert cfg.rope_theta == 1e6
    assert cfg.torch_dtype == "float16" and cfg.dtype == torch.float16
    assert ModelConfig.from_hf_dict({**V02, "torch_dtype": "torch.float32"}).dtype == torch.float32


def test_config_refuses_what_the_reference_model_cannot_run():
    with pytest.raises(ConfigError, match="rope_scaling type 'llama3' is not supported"):
        ModelConfig.from_hf_dict({**V02, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ConfigError, match="attention_bias"):
        ModelConfig.from_hf_dict({**V02, "attention_bias": True})
    assert ModelConfig.from_hf_dict({**V02, "rope_scaling": None, "attention_bias": False}).rope_theta == 1e6


def test_config_unknown_architecture_lists_supported():
    with pytest.raises(ConfigError,
                       match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM.*MistralForCausalLM"):
        ModelConfig.from_hf_dict({**V02, "architectures": ["GPT2LMHeadModel"]})


def test_params_json_round_trip(tmp_path):
    path = make_random_checkpoint(tmp_path / "c", layout="consolidated", sliding_window=32, rope_theta=1e4)
    cfg = open_checkpoint(path).config
    assert (cfg.sliding_window, cfg.rope_theta, cfg.num_key_value_heads, cfg.head_dim) == (32, 1e4, 2, 16)


def test_sliding_window_written_and_read(tmp_path):
    v1 = open_checkpoint(make_random_checkpoint(tmp_path / "v1", sliding_window=4096)).config
    v2 = open_checkpoint(make_random_checkpoint(tmp_path / "v2")).config
    assert v1.sliding_window == 4096 and v2.sliding_window is None
    assert json.loads((tmp_path / "v2" / "config.json").read_text())["sliding_window"] is None


def test_tokenizer_path_and_fingerprint(layouts):
    ckpt = open_checkpoint(layouts["hf-sharded"])
    assert ckpt.tokenizer_path.name == "tokenizer.model"
    assert ckpt.fingerprint() == open_checkpoint(layouts["hf-sharded"]).fingerprint()
    assert ckpt.fingerprint() != open_checkpoint(layouts["hf-single"]).fingerprint()
    assert ckpt.num_parameters == ckpt.config.num_parameters()
    assert ckpt.total_bytes == 2 * ckpt.num_parameters
    assert ckpt.dtypes() == {"BF16": len(ckpt.tensor_names())}


# ---- bad input at the library level (the CLI versions are in test_bad_input.py) ----

def test_missing_tensor_and_bad_shape(tmp_path):
    path = make_random_checkpoint(tmp_path / "m", layout="hf-single")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\..* is missing"):
        open_checkpoint(path)
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 256}))
    with pytest.raises(CheckpointError, match=r"shape \[128, 64\], expected \[256, 64\]"):
        open_checkpoint(path)


def test_open_does_not_read_tensor_data(tmp_path):
    """Opening reads only headers: a shard whose data bytes are zeroed still opens (data is read on demand)."""
    path = make_random_checkpoint(tmp_path / "z", layout="hf-single")
    f = path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    raw[8 + header_len:] = bytes(len(raw) - 8 - header_len)
    f.write_bytes(bytes(raw))
    ckpt = open_checkpoint(path)
    assert math.isclose(ckpt.get_tensor("model.norm.weight").float().abs().sum().item(), 0.0)
