"""llama-quantize's per-tensor type rules: `tensor_types(config, ftype) -> {canonical name: ggml type name}`.

ref: ggml-org/llama.cpp:src/llama-quant.cpp (`llama_tensor_get_type`, `llama_tensor_get_type_impl`,
`tensor_type_fallback`, `tensor_requires_imatrix`), formats/gguf.md (file types). Only the rules that apply to dense
llama-architecture models (Mistral, Llama) are implemented; the TQ, MoE, Falcon and 70B branches are not. With
`pure=True` every quantizable tensor gets the default type (only the shape fallback applies), as
`llama-quantize --pure`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import LlamaFileType

from quantkit.errors import SchemeError
from quantkit.ggml_types import block_size, is_float_type
from quantkit.ggml_types import tensor_nbytes as tensor_nbytes  # imported from here by callers outside gguf/
from quantkit.model import arch
from quantkit.model.config import ModelConfig


@dataclass(frozen=True)
class FileType:
    name: str  # CLI string: Q4_K_M, Q8_0, BF16, ...
    llama_ftype: int  # general.file_type (LlamaFileType)
    default_type: str  # ggml type of the bulk of the weights
    description: str = ""  # one line for `--list-types`


FILE_TYPES: dict[str, FileType] = {
    ft.name: ft
    for ft in (
        FileType("F32", LlamaFileType.ALL_F32, "F32", "32-bit float: no quantization (a reference, twice BF16)"),
        FileType("F16", LlamaFileType.MOSTLY_F16, "F16", "16-bit float: lossless for most models"),
        FileType("BF16", LlamaFileType.MOSTLY_BF16, "BF16", "bfloat16: the source precision of most checkpoints"),
        FileType("Q8_0", LlamaFileType.MOSTLY_Q8_0, "Q8_0", "8-bit blocks of 32, one scale: near-lossless"),
        FileType("Q4_0", LlamaFileType.MOSTLY_Q4_0, "Q4_0", "4-bit blocks of 32, one scale (legacy)"),
        FileType("Q4_1", LlamaFileType.MOSTLY_Q4_1, "Q4_1", "4-bit blocks of 32, scale and minimum (legacy)"),
        FileType("Q5_0", LlamaFileType.MOSTLY_Q5_0, "Q5_0", "5-bit blocks of 32, one scale (legacy)"),
        FileType("Q5_1", LlamaFileType.MOSTLY_Q5_1, "Q5_1", "5-bit blocks of 32, scale and minimum (legacy)"),
        FileType("Q2_K", LlamaFileType.MOSTLY_Q2_K, "Q2_K", "2-bit k-quant mix: smallest, large quality loss"),
        FileType("Q3_K_S", LlamaFileType.MOSTLY_Q3_K_S, "Q3_K", "3-bit k-quants throughout: small, lossy"),
        FileType("Q3_K_M", LlamaFileType.MOSTLY_Q3_K_M, "Q3_K",
                 "3-bit k-quants, attention V/output and FFN down at 4-5 bits"),
        FileType("Q3_K_L", LlamaFileType.MOSTLY_Q3_K_L, "Q3_K", "3-bit k-quants, attention V/output, FFN down at Q5_K"),
        FileType("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, "Q4_K", "4-bit k-quants, the first layers' V/FFN down at Q5_K"),
        FileType("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, "Q4_K",
                 "4-bit k-quants, half of attention V/FFN down at Q6_K: the usual choice"),
        FileType("Q5_K_S", LlamaFileType.MOSTLY_Q5_K_S, "Q5_K", "5-bit k-quants throughout"),
        FileType("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, "Q5_K", "5-bit k-quants, half of attention V/FFN down at Q6_K"),
        FileType("Q6_K", LlamaFileType.MOSTLY_Q6_K, "Q6_K", "6-bit k-quants: close to Q8_0 at 80% of its size"),
        FileType("IQ4_NL", LlamaFileType.MOSTLY_IQ4_NL, "IQ4_NL",
                 "4.5-bit non-linear blocks of 32 (a 16-value table), attention V at Q5_K with GQA"),
        FileType("IQ4_XS", LlamaFileType.MOSTLY_IQ4_XS, "IQ4_XS",
                 "4.25-bit non-linear super-blocks of 256, attention V at Q5_K with GQA: Q4_K_S quality, smaller"),
        FileType("Q2_K_S", LlamaFileType.MOSTLY_Q2_K_S, "Q2_K",
                 "2-bit k-quants, attention V (GQA) and the first FFN down at Q4_K; needs an imatrix"),
        FileType("IQ3_M", LlamaFileType.MOSTLY_IQ3_M, "IQ3_S",
                 "3.4-bit lattice blocks, attention V/output and the first FFN down at Q4_K"),
        FileType("IQ3_S", LlamaFileType.MOSTLY_IQ3_S, "IQ3_S", "3.4-bit lattice blocks (IQ3_S) throughout"),
        FileType("IQ3_XS", LlamaFileType.MOSTLY_IQ3_XS, "IQ3_S",
                 "IQ3_S, with attention Q/K and the middle FFN gate/up at IQ3_XXS; needs an imatrix"),
        FileType("IQ3_XXS", LlamaFileType.MOSTLY_IQ3_XXS, "IQ3_XXS",
                 "3.06-bit lattice blocks, attention Q/K at IQ2_S; needs an imatrix"),
        FileType("IQ2_M", LlamaFileType.MOSTLY_IQ2_M, "IQ2_S", "2.5-bit lattice blocks (IQ2_S); needs an imatrix"),
        FileType("IQ2_S", LlamaFileType.MOSTLY_IQ2_S, "IQ2_XS",
                 "IQ2_XS with attention output and embeddings at IQ3_S; needs an imatrix"),
        FileType("IQ2_XS", LlamaFileType.MOSTLY_IQ2_XS, "IQ2_XS", "2.31-bit lattice blocks; needs an imatrix"),
        FileType("IQ2_XXS", LlamaFileType.MOSTLY_IQ2_XXS, "IQ2_XXS", "2.06-bit lattice blocks; needs an imatrix"),
        FileType("IQ1_M", LlamaFileType.MOSTLY_IQ1_M, "IQ1_M", "1.75-bit ternary lattice blocks; needs an imatrix"),
        FileType("IQ1_S", LlamaFileType.MOSTLY_IQ1_S, "IQ1_S",
                 "1.56-bit ternary lattice blocks: the smallest, large quality loss; needs an imatrix"),
    )
}
# block types that llama-quantize refuses to write without an imatrix (except into token_embd / output), and the
# one k-quant file type whose Q2_K tensors need one
NEEDS_IMATRIX = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")
# the file types of the 1-2 bit family, whose rules differ from the rest for every kind of tensor
_IQ2_FAMILY = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
# block-size fallbacks when a row length (ne[0] = in_features) is not a multiple of the type's block
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
             **dict.fromkeys(("IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"), "IQ4_NL")}


def get_file_type(name: str) -> FileType:
    key = name.upper()
    if key not in FILE_TYPES:
        raise SchemeError(f"unknown GGUF type {name!r}; choose one of: {', '.join(FILE_TYPES)}")
    return FILE_TYPES[key]


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _fallback(type_name: str, ncols: int) -> str:
    if ncols % block_size(type_name) == 0:
        return type_name
    new = _FALLBACK.get(type_name, type_name)
    if ncols % block_size(new) != 0:
        return "F16"
    return new


def _mix_type(kind: str, layer: int, ftype: str, default: str, config: ModelConfig, ncols: int,
              tied: bool, has_imatrix: bool) -> str:
    n = config.num_hidden_layers
    n_gqa = config.num_attention_heads // config.num_key_value_heads
    if kind == "output" or (tied and kind == "token_embd"):
        if ncols % block_size(default) != 0:
            return "Q8_0"
        if ftype in _IQ2_FAMILY or ftype == "IQ3_XXS":
            return "Q5_K"
        return default if default == "Q8_0" else "Q6_K"
    if kind == "token_embd":
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        return "IQ3_S" if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS") else default
    if ftype in _IQ2_FAMILY:
        low = "IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K"  # attn_v without GQA, the first ffn_down
        if kind == "attn_v":
            return "Q4_K" if n_gqa >= 4 else low
        if kind == "ffn_down":
            return low if layer < n // 8 else default
        if kind == "attn_output":
            return {"IQ1_S": "IQ2_XXS", "IQ1_M": "IQ2_XXS", "IQ2_S": "IQ3_S", "IQ2_M": "IQ3_S"}.get(ftype, default)
        return default
    if kind == "attn_v":
        if ftype == "Q2_K":
            return "Q4_K" if n_gqa >= 4 else "Q3_K"
        if ftype == "Q2_K_S" and n_gqa >= 4:
            return "Q4_K"
        if ftype == "IQ3_XXS":
            return "Q4_K" if n_gqa >= 4 else "IQ3_XXS" if has_imatrix else "IQ3_S"
        if (ftype in ("IQ3_XS", "IQ3_S") and n_gqa >= 4) or ftype == "IQ3_M":
            return "Q4_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if layer < 2 else "Q4_K"
        if ftype == "Q3_K_L":
            return "Q5_K"
        if ftype in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
            return "Q5_K"
        if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n):
            return "Q6_K"
        if ftype == "Q4_K_S" and layer < 4:
            return "Q5_K"
        return default
    if kind in ("attn_q", "attn_k"):
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ftype, default)
    if kind == "ffn_down":
        first = layer < n // 8
        if ftype == "Q2_K":
            return "Q3_K"
        if ftype == "Q2_K_S":
            return "Q4_K" if first else default
        if ftype == "IQ3_XXS" and not has_imatrix:
            return "Q4_K" if first else "Q3_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if layer < n // 16 else "Q4_K"
        if ftype == "IQ3_M" and first:
            return "Q4_K"
        if ftype == "Q3_K_L":
            return "Q5_K"
        if ftype == "Q4_K_M":
            return "Q6_K" if use_more_bits(layer, n) else default
        if ftype in ("IQ4_NL", "IQ4_XS") and not has_imatrix and first:
            return "Q5_K"
        if ftype == "Q5_K_M" and use_more_bits(layer, n):
            return "Q6_K"
        if ftype == "Q4_K_S" and first:
            return "Q5_K"
        if ftype in ("Q4_0", "Q5_0") and has_imatrix and first:
            return "Q4_1" if ftype == "Q4_0" else "Q5_1"
        return default
    if kind == "attn_output":
        return {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(
            ftype, default)
    if kind in ("ffn_gate", "ffn_up") and ftype == "IQ3_XS" and n // 8 <= layer < 7 * n // 8:
        return "IQ3_XXS"
    return default


def _kind(name: str) -> tuple[str, int]:
    gguf_name = arch.to_gguf(name)
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        return rest.rsplit(".", 1)[0], int(layer)
    return gguf_name.rsplit(".", 1)[0], -1


def tensor_types(config: ModelConfig, ftype: str, pure: bool = False, has_imatrix: bool = False) -> dict[str, str]:
    """The ggml type of every tensor of a model of `config` in the file type `ftype`, in file order."""
    ft = get_file_type(ftype)
    shapes = config.expected_shapes()
    tied = "lm_head.weight" not in shapes
    out: dict[str, str] = {}
    for name in arch.canonical_names(config.num_hidden_layers):
        if name not in shapes:
            continue
        shape = shapes[name]
        if len(shape) < 2 or name.endswith("norm.weight"):
            out[name] = "F32"
            continue
        if is_float_type(ft.default_type):
            out[name] = ft.default_type
            continue
        kind, layer = _kind(name)
        ncols = shape[-1]
        new = (ft.default_type if pure
               else _mix_type(kind, layer, ft.name, ft.default_type, config, ncols, tied, has_imatrix))
        out[name] = _fallback(new, ncols)
    return out


def check_imatrix(types: dict[str, str], ftype: str, has_imatrix: bool) -> None:
    """Refuse, as llama-quantize does, types that need an importance matrix when there is none."""
    if has_imatrix:
        return
    for name, type_name in types.items():
        if requires_imatrix(name, type_name, ftype.upper()):
            raise SchemeError(f"{arch.to_gguf(name)}: type {type_name} (GGUF type {ftype}) needs an importance "
                              f"matrix; give --imatrix FILE, or calibrate (quantize --calib ...)")


def requires_imatrix(name: str, type_name: str, ftype: str) -> bool:
    """llama-quantize's `tensor_requires_imatrix`: whether `name` (canonical) may only be written as `type_name`
    in file type `ftype` with an importance matrix."""
    if _kind(name)[0] in ("token_embd", "output"):
        return False
    return type_name in NEEDS_IMATRIX or (type_name == "Q2_K" and ftype == "Q2_K_S")


def data_bytes(config: ModelConfig, types: dict[str, str], alignment: int = 32) -> int:
    """Size of the GGUF data section for these types (sum of padded tensor sizes)."""
    shapes = config.expected_shapes()
    total = 0
    for name, t in types.items():
        total += -(-tensor_nbytes(shapes[name], t) // alignment) * alignment
    return total

