"""Does a quantkit GPTQ output load in the archived auto-gptq 0.7.1 on CPU, and compute the same logits?

    python benchmarks/autogptq_load.py [--venv /tmp/quantkit-agptq-venv] [--preset w4a16-g128]

auto-gptq needs transformers < 4.50, so it runs in its own venv (created on first use, as
../shared/docs/peers.md §3 describes: torch 2.13.0 CPU, transformers<4.50, auto-gptq 0.7.1, optimum<1.24,
numpy<2.3, peft<0.14). This script (in quantkit's venv) writes mistral-nano as GPTQ with RTN, runs
`AutoGPTQForCausalLM.from_quantized(out, device="cpu", use_triton=False, disable_exllama=True,
disable_exllamav2=True)` in that venv on a fixed prompt, and compares its logits with quantkit's dequantized model.
Prints one result line; the result is recorded in formats/gptq.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["torch==2.13.0", "transformers<4.50", "auto-gptq==0.7.1", "optimum<1.24", "numpy<2.3", "peft<0.14"]
PROMPT = [[1, 415, 2936, 9060, 285, 1142, 28705, 13, 1014, 349, 264, 1369, 302, 272, 1526]]

CHILD = r'''
import json, sys, torch
from auto_gptq import AutoGPTQForCausalLM
out, prompt, dest = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoGPTQForCausalLM.from_quantized(out, device="cpu", use_triton=False, disable_exllama=True,
                                           disable_exllamav2=True, use_safetensors=True)
model.model.to(torch.float32)
with torch.no_grad():
    logits = model.model(torch.tensor(prompt)).logits.float()
kinds = sorted({type(m).__module__ + "." + type(m).__name__ for m in model.model.modules() if hasattr(m, "qweight")})
torch.save({"logits": logits, "qlinear": kinds}, dest)
'''


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text("torch==2.13.0+cpu\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(constraints), *PACKAGES], check=True)
    return python


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", default="/tmp/quantkit-agptq-venv")
    ap.add_argument("--preset", default="w4a16-g128")
    args = ap.parse_args()
    import torch

    from quantkit.formats.dequantized import dequantized_model
    from quantkit.pipeline.export import export_rtn
    from quantkit.quant.scheme import PRESETS

    python = ensure_venv(Path(args.venv))
    versions = subprocess.run([str(python), "-c", "import auto_gptq, transformers, optimum, torch; "
                               "print(auto_gptq.__version__, transformers.__version__, torch.__version__)"],
                              capture_output=True, text=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = export_rtn(REPO / "models" / "mistral-nano", {"gptq": Path(tmp) / "gptq"}, PRESETS[args.preset])["gptq"]
        dest = Path(tmp) / "logits.pt"
        run = subprocess.run([str(python), "-c", CHILD, str(out), json.dumps(PROMPT), str(dest)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
            print(f"auto-gptq {versions.stdout.strip()}: FAILED to load quantkit {args.preset} GPTQ output: "
                  + " | ".join(tail))
            sys.exit(1)
        saved = torch.load(dest)
        with torch.no_grad():
            ours = dequantized_model(out)(torch.tensor(PROMPT))
        rel = float((saved["logits"] - ours).abs().max() / ours.abs().max())
        same_top = float((saved["logits"].argmax(-1) == ours.argmax(-1)).float().mean())
        print(f"auto-gptq/transformers/torch {versions.stdout.strip()}: loaded quantkit {args.preset} GPTQ output "
              f"(mistral-nano) on CPU via {', '.join(saved['qlinear'])}; max |dlogit| / max |logit| vs quantkit = "
              f"{rel:.2e}, same top-1 {100 * same_top:.0f}%")


if __name__ == "__main__":
    main()
