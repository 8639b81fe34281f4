"""ModelConfig: the hyper-parameters of a decoder checkpoint, read from HF `config.json` or mistral `params.json`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import ConfigError
from quantkit.io import read_json_object
from quantkit.model.arch import Architecture, get_architecture

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# The range of every integer field, checked before anything is built from it (a hostile config must not make
# quantkit allocate tables for 10^9 layers). The bounds are far beyond any released decoder.
INT_RANGES = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1 << 12),
    "num_key_value_heads": (1, 1 << 12),
    "head_dim": (2, 1 << 12),
    "max_position_embeddings": (1, 1 << 26),
    "sliding_window": (1, 1 << 26),
    "bos_token_id": (0, (1 << 22) - 1),
    "eos_token_id": (0, (1 << 22) - 1),
}
OPTIONAL_FIELDS = ("head_dim", "sliding_window")


@dataclass
class ModelConfig:
    architecture: str = "MistralForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    torch_dtype: str = "bfloat16"
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    source: str = field(default="config", repr=False, compare=False)  # the file the values came from
    keys: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # field -> name in that file

    def __post_init__(self) -> None:
        """Type and range of every field, before anything is sized from them; errors name file, field and value."""
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL_FIELDS:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                self._bad(name, f"an integer in [{low}, {high}]")
        for name, low, high in (("rms_norm_eps", 0.0, 1.0), ("rope_theta", 0.0, math.inf)):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, value := float(value))
            if not isinstance(value, float) or not math.isfinite(value) or not low < value < high:
                self._bad(name, f"a finite number in ({low}, {high})")
        if not isinstance(self.tie_word_embeddings, bool):
            self._bad("tie_word_embeddings", "true or false")
        if not isinstance(self.torch_dtype, str):
            self._bad("torch_dtype", f"a dtype name such as {', '.join(DTYPES)}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                self._bad("hidden_size", f"a multiple of num_attention_heads ({self.num_attention_heads}), or a "
                                         "head_dim field")
            self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim < 2:
                self._bad("num_attention_heads", f"at most hidden_size / 2 ({self.hidden_size // 2})")
        if self.head_dim % 2:
            self._bad("head_dim", "an even number (RoPE rotates pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            self._bad("num_key_value_heads", f"a divisor of num_attention_heads ({self.num_attention_heads})")
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                self._bad(name, f"a token id below vocab_size ({self.vocab_size})")

    def _bad(self, name: str, expected: str):
        raise ConfigError(f"{self.source}: {self.keys.get(name, name)} = {getattr(self, name)!r}: expected {expected}")

    @property
    def arch(self) -> Architecture:
        return get_architecture(self.architecture)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES.get(self.torch_dtype, torch.bfloat16)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def rope_heads(self, name: str) -> int | None:
        """Head count of a Q or K projection (whose rotary rows the HF <-> GGUF/consolidated permutation moves
        within each head), or None for every other tensor."""
        if name.endswith("self_attn.q_proj.weight"):
            return self.num_attention_heads
        if name.endswith("self_attn.k_proj.weight"):
            return self.num_key_value_heads
        return None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical tensor name -> shape, for validating a checkpoint against its config."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (self.q_size, h),
            "self_attn.k_proj.weight": (self.kv_size, h),
            "self_attn.v_proj.weight": (self.kv_size, h),
            "self_attn.o_proj.weight": (h, self.q_size),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (f, h),
            "mlp.up_proj.weight": (f, h),
            "mlp.down_proj.weight": (h, f),
        }
        shapes = {"model.embed_tokens.weight": (v, h)}
        for i in range(self.num_hidden_layers):
            shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (v, h)
        return shapes

    def num_parameters(self) -> int:
        total = 0
        for shape in self.expected_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    # ---- reading ----

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ConfigError(f"{source}: architectures = {archs!r}: expected a list such as ['MistralForCausalLM']")
        get_architecture(archs[0])
        rope_theta = cfg.get("rope_theta")
        nested = cfg.get("rope_parameters")
        if isinstance(nested, dict) and nested.get("rope_theta") is not None:
            if rope_theta is not None and rope_theta != nested["rope_theta"]:
                raise ConfigError(f"{source}: rope_theta = {rope_theta!r} and rope_parameters.rope_theta = "
                                  f"{nested['rope_theta']!r} disagree: expected one value (or only one of them)")
            rope_theta = nested["rope_theta"]
        for key in ("rope_scaling", "rope_parameters"):
            scaling = cfg.get(key)
            if isinstance(scaling, dict):
                kind = scaling.get("rope_type", scaling.get("type", "default"))
                if kind not in (None, "default"):
                    raise ConfigError(f"{source}: {key} type {kind!r} is not supported (only plain RoPE, 'default')")
            elif scaling is not None:
                raise ConfigError(f"{source}: {key} = {scaling!r}: expected an object or null")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise ConfigError(f"{source}: {key}: true is not supported (Mistral/Llama linears have no bias)")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list) and eos:
            eos = eos[0]
        defaults = {"num_key_value_heads": cfg["num_attention_heads"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                    "max_position_embeddings": 32768, "tie_word_embeddings": False, "bos_token_id": 1,
                    "eos_token_id": 2}
        values = {k: cfg.get(k) for k in (*required, "num_key_value_heads", "head_dim", "rms_norm_eps",
                                          "max_position_embeddings", "sliding_window", "tie_word_embeddings",
                                          "bos_token_id")}
        values |= {"rope_theta": rope_theta, "eos_token_id": eos}
        values |= {k: d for k, d in defaults.items() if values[k] is None}
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        return cls(architecture=archs[0], **values, torch_dtype=str(dtype).replace("torch.", ""), raw=cfg,
                   source=source)

    @classmethod
    def from_params_dict(cls, params: dict[str, Any], source: str = "params.json") -> "ModelConfig":
        """mistral-inference `params.json` (mistralai/mistral-inference); rope_theta None means 1e6 there."""
        keys = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "intermediate_size": "hidden_dim",
                "num_attention_heads": "n_heads", "vocab_size": "vocab_size", "num_key_value_heads": "n_kv_heads",
                "head_dim": "head_dim", "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta",
                "max_position_embeddings": "max_seq_len", "sliding_window": "sliding_window"}
        missing = [k for k in list(keys.values())[:5] if k not in params]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        if params.get("moe"):
            raise ConfigError(f"{source}: mixture-of-experts models are not supported")
        values = {f: params.get(k) for f, k in keys.items()}
        defaults = {"num_key_value_heads": params["n_heads"], "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                    "max_position_embeddings": 32768}
        values |= {k: d for k, d in defaults.items() if values[k] is None}
        return cls(architecture="MistralForCausalLM", **values, raw=params, source=source, keys=keys)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        data = read_json_object(path, ConfigError)
        if path.name == "params.json":
            return cls.from_params_dict(data, str(path))
        return cls.from_hf_dict(data, str(path))

    # ---- writing ----

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json as the Mistral-7B-Instruct-v0.2 repository has it (top-level rope_theta, torch_dtype)."""
        arch = self.arch
        out = {
            "architectures": [self.architecture],
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": arch.model_type,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        if arch.supports_sliding_window:
            out["sliding_window"] = self.sliding_window
        return out

    def to_params_dict(self) -> dict[str, Any]:
        out = {
            "dim": self.hidden_size,
            "n_layers": self.num_hidden_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.intermediate_size,
            "n_heads": self.num_attention_heads,
            "n_kv_heads": self.num_key_value_heads,
            "norm_eps": self.rms_norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
        }
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        return out

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        for private in ("raw", "source", "keys"):
            d.pop(private)
        return d
