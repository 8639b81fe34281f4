"""ModelConfig: the hyper-parameters of a decoder checkpoint, read from HF `config.json` or mistral `params.json`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantkit.errors import ConfigError
from quantkit.io import read_json_object
from quantkit.model.arch import Architecture, get_architecture

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

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
        if not archs:
            raise ConfigError(f"{source}: no 'architectures' field; expected e.g. ['MistralForCausalLM']")
        get_architecture(archs[0])
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None and isinstance(cfg.get("rope_parameters"), dict):
            rope_theta = cfg["rope_parameters"].get("rope_theta")
        if rope_theta is None:
            rope_theta = 10000.0
        for key in ("rope_scaling", "rope_parameters"):
            scaling = cfg.get(key)
            if isinstance(scaling, dict):
                kind = scaling.get("rope_type", scaling.get("type", "default"))
                if kind not in (None, "default"):
                    raise ConfigError(f"{source}: {key} type {kind!r} is not supported (only plain RoPE, 'default')")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise ConfigError(f"{source}: {key}: true is not supported (Mistral/Llama linears have no bias)")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        eos = cfg.get("eos_token_id", 2)
        return cls(
            architecture=archs[0],
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            num_key_value_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            head_dim=cfg.get("head_dim"),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            sliding_window=cfg.get("sliding_window"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=int(cfg.get("bos_token_id", 1) or 1),
            eos_token_id=int(eos[0] if isinstance(eos, list) else (eos if eos is not None else 2)),
            torch_dtype=str(dtype).replace("torch.", ""),
            raw=cfg,
        )

    @classmethod
    def from_params_dict(cls, params: dict[str, Any], source: str = "params.json") -> "ModelConfig":
        """mistral-inference `params.json` (mistralai/mistral-inference); rope_theta None means 1e6 there."""
        required = ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size")
        missing = [k for k in required if k not in params]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        if params.get("moe"):
            raise ConfigError(f"{source}: mixture-of-experts models are not supported")
        return cls(
            architecture="MistralForCausalLM",
            vocab_size=int(params["vocab_size"]),
            hidden_size=int(params["dim"]),
            intermediate_size=int(params["hidden_dim"]),
            num_hidden_layers=int(params["n_layers"]),
            num_attention_heads=int(params["n_heads"]),
            num_key_value_heads=int(params.get("n_kv_heads") or params["n_heads"]),
            head_dim=params.get("head_dim"),
            rms_norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta") or 1e6),
            max_position_embeddings=int(params.get("max_seq_len", 32768)),
            sliding_window=params.get("sliding_window"),
            raw=params,
        )

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
        d.pop("raw")
        return d
