"""How optimistic a GPTQ sensitivity measured in-sample is: the KL divergence of mistral-nano with one tensor
GPTQ-rounded (the allocation's own encoder), the Hessian taken from the same windows the divergence is measured on
(what `--target-bpw --method gptq` does) or from other windows of the same text, measured on calibration windows
and on held-out text.

  calibration: *The Hound of the Baskervilles*, 16 x 256 tokens (seed 0: the allocation's windows; seed 1: others)
  held-out:    *Pride and Prejudice*, 16 x 256 tokens

Usage: python benchmarks/gptq_sensitivity_sample.py [--types IQ4_XS,Q4_K,Q5_K,Q6_K] [--tensors NAME,...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nano_gguf_setup import nano_windows  # noqa: E402

from quantkit.eval.sensitivity import _first_layer, _InputHessians, _Reference, ggml_candidates  # noqa: E402

TENSORS = ("model.layers.1.mlp.down_proj.weight", "model.layers.3.mlp.gate_proj.weight",
           "model.layers.4.self_attn.v_proj.weight", "lm_head.weight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="IQ4_XS,Q4_K,Q5_K,Q6_K")
    ap.add_argument("--tensors", default=",".join(TENSORS))
    args = ap.parse_args()
    ckpt, model, windows = nano_windows()
    same, other, held = windows["calib"], windows["calib-other"], windows["held-out"]
    refs = {"same": _Reference(model, same), "other": _Reference(model, other), "held": _Reference(model, held)}
    n_layers = ckpt.config.num_hidden_layers
    hessians = {k: _InputHessians(refs[k], n_layers, None) for k in ("same", "other")}
    encoders = ggml_candidates(args.types.split(","), {}, {"damp": 0.1, "block_size": 128, "group_aware": True})
    print("| tensor | type | Hessian of | KLD calib | KLD held-out | calib: other / same windows |")
    print("|---|---|---|---:|---:|---:|")
    for name in args.tensors.split(","):
        param = model.get_parameter(name)
        original = param.data
        first = _first_layer(name, n_layers)
        for type_name, encoder in encoders.items():
            kld = {}
            for which, inputs in hessians.items():
                param.data = encoder(name, original, inputs.get(name))
                try:
                    kld[which] = (refs["same"].kld_from_layer(first), refs["held"].kld_from_layer(first))
                finally:
                    param.data = original
            for which in ("same", "other"):
                ratio = f"{kld['other'][0] / kld['same'][0]:.2f}" if which == "other" else ""
                print(f"| {name} | {type_name} | {which} windows | {kld[which][0]:.6f} | {kld[which][1]:.6f} | "
                      f"{ratio} |", flush=True)


if __name__ == "__main__":
    main()
