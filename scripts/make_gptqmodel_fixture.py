"""Make the tiny GPTQModel-written GPTQ checkpoints that tests/test_formats_clients.py reads back.

    GPTQMODEL_CPU_WORKERS=2 python scripts/make_gptqmodel_fixture.py [--out tests/fixtures]

A random MistralForCausalLM (hidden 64, 2 layers, vocab 512, fp16) is quantized by GPTQModel 7.6 on CPU twice:
`gptqmodel-sym-g32` (sym, desc_act false) and `gptqmodel-asym-actorder-g32` (asym, desc_act true: a v1 "zero
minus one" checkpoint with a non-monotonic g_idx), and once as AWQ GEMM (`gptqmodel-awq-gemm-g32`, AutoAWQ's
layout). Next to each, `reference_logits.pt` holds the logits that GPTQModel's own loaded model gives for
`PROMPT_IDS` (fp32, dequantize-then-matmul path, see exact_logits), so the test can compare even where gptqmodel
is not installed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch

PROMPT_IDS = [[1, 17, 250, 3, 99, 400, 12, 77, 5, 301, 222, 8]]
VARIANTS = {  # name -> (config class name, config kwargs)
    "gptqmodel-sym-g32": ("QuantizeConfig", dict(bits=4, group_size=32, desc_act=False, sym=True)),
    "gptqmodel-asym-actorder-g32": ("QuantizeConfig", dict(bits=4, group_size=32, desc_act=True, sym=False)),
    "gptqmodel-awq-gemm-g32": ("AWQConfig", dict(bits=4, group_size=32, format="gemm")),
}


def make_source(directory: Path, hidden: int = 64, intermediate: int = 128, kv_heads: int = 2) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=hidden // 4, rope_theta=1e6,
                        sliding_window=None, max_position_embeddings=256, tie_word_embeddings=False)
    model = MistralForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(directory)
    save_word_tokenizer(directory)
    return directory


def save_word_tokenizer(directory: Path) -> None:
    """A 512-word WordLevel tokenizer (GPTQModel insists on loading a tokenizer; calibration is token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3} | {f"w{i}": i for i in range(4, 512)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(directory)


def exact_logits(model, prompt_ids) -> torch.Tensor:
    """fp32 logits through GPTQModel's dequantize-then-matmul path (its fused CPU int4 kernel computes in bf16)."""
    model.to(torch.float32)
    for module in model.modules():
        if hasattr(module, "linear_mode"):
            module.linear_mode = "train"
    with torch.no_grad():
        return model(torch.tensor(prompt_ids)).logits.float()


def calibration(n: int = 32, length: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (n, length), generator=g)
    return [{"input_ids": row[None, :], "attention_mask": torch.ones(1, length, dtype=torch.long)} for row in ids]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
    ap.add_argument("--only", nargs="*", default=None, help="variant names to (re)make")
    args = ap.parse_args()
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # GPTQModel writes ./logs/*.log into the working directory
        src = make_source(Path(tmp) / "src")
        # AWQ's clip search works on batches of 256 output channels: every linear needs out % 256 == 0
        wide = make_source(Path(tmp) / "wide", hidden=256, intermediate=512, kv_heads=4)
        for name, (cls, qargs) in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            source = wide if cls == "AWQConfig" else src
            model = GPTQModel.load(str(source), getattr(gptqmodel, cls)(**qargs), device="cpu")
            extra = {"backend": BACKEND.AWQ_TORCH} if cls == "AWQConfig" else {}  # default AWQ backend needs CUDA
            model.quantize(calibration(), batch_size=4, **extra)
            target = out / name
            shutil.rmtree(target, ignore_errors=True)
            model.save(str(target))
            shutil.rmtree(target / "logs", ignore_errors=True)
            loaded = GPTQModel.load(str(target), device="cpu")
            logits = exact_logits(loaded.model, PROMPT_IDS)
            torch.save({"prompt_ids": PROMPT_IDS, "logits": logits}, target / "reference_logits.pt")
            print(name, "written", sorted(p.name for p in target.iterdir()))


if __name__ == "__main__":
    main()
