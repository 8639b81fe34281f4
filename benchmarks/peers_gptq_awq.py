"""quantkit GPTQ / AWQ side by side with GPTQModel 7.6 on mistral-nano: same scheme, same calibration tokens.

    GPTQMODEL_CPU_WORKERS=2 nice -n 10 python benchmarks/peers_gptq_awq.py [--seeds 0,1,2] [--peer-seeds 0]
        [--windows 20] [--calib-samples 64] [--calib-seqlen 512] [--calib pg|builtin] [--json out.json]

Schemes: GPTQ at w4a16-g128 (symmetric; quantkit's defaults: group-aware order, damp 0.1, block 128, unless
--gptq-variants says otherwise); AWQ at w4a16-g128-asym (zero point, duo scaling, clipping). Baseline RTN rows for
both schemes. --compute-dtype: what quantkit's GPTQ calibration and AWQ scale search run in.
Calibration: windows drawn by quantkit.calib.load_calibration (seed s) from ../shared/data/pg-english/calib (or the
built-in set); the *same token tensor* goes to quantkit's pipeline and to GPTQModel's `quantize()`
(as input_ids / attention_mask lists, calibration_sort=None so nothing is reordered or concatenated).
Peers: GPTQModel's GPTQ (--peer-gptq defaults: its out-of-the-box `QuantizeConfig(bits=4, group_size=128)`, i.e.
damp 0.05 and group-aware order; matched: quantkit's defaults, damp 0.1), GPTQModel's AWQ
(`AWQConfig(bits=4, group_size=128, sym=False)`,
backend AWQ_TORCH; AutoAWQ 0.2.9 itself needs its own venv and is not run here).
Evaluation: every model's weights are dequantized into the fp32 reference model (GPTQModel's checkpoints are
read with quantkit's own GPTQ/AWQ readers), then KLD(BF16 model || quantized) and perplexity on the first
`--windows` windows of wikitext-2 test, convention gptq, ctx 512 (quantkit.eval.compare).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantkit.calib import load_calibration  # noqa: E402
from quantkit.eval.compare import compare_models  # noqa: E402
from quantkit.eval.perplexity import read_texts, tokenize_for_convention  # noqa: E402
from quantkit.formats.base import read_checkpoint  # noqa: E402
from quantkit.model.checkpoint import open_checkpoint  # noqa: E402
from quantkit.model.reference import Transformer  # noqa: E402
from quantkit.model.tokenizer import load_tokenizer  # noqa: E402
from quantkit.testing import NANO_PATH, shared_data  # noqa: E402


def logits_fn(model):
    def fn(tokens):
        with torch.no_grad():
            return model(tokens)
    return fn


def quantkit_model(ckpt, method: str, preset: str, tokens, workdir: Path, compute_dtype: str = "float32",
                   variant: dict | None = None):
    from fidelity_nano import quantized_model  # the pipeline -> dump -> dequantized reference model path

    from quantkit.pipeline.layerwise import PipelineOptions

    v = dict(variant or {})
    return quantized_model(ckpt, method, preset, tokens, v.pop("damp", PipelineOptions.damp), workdir, compute_dtype,
                           **v)


def parse_variant(text: str) -> dict:
    """'damp=0.05,group_aware,act_order' -> {'damp': 0.05, 'group_aware': True, 'act_order': True}."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        out[key] = True if not value else (float(value) if "." in value else int(value))
    return out


PEER_GPTQ_CONFIGS = {  # GPTQModel QuantizeConfig arguments
    "matched": dict(bits=4, group_size=128, sym=True, desc_act=False, act_group_aware=True, damp_percent=0.1),
    "defaults": dict(bits=4, group_size=128),  # out of the box: damp 0.05, act_group_aware (GAR), no desc_act
}


def model_from_quantized_dir(ckpt, path: Path) -> Transformer:
    """Dequantize a GPTQ/AWQ checkpoint (read by quantkit's format readers) into the fp32 reference model."""
    q = read_checkpoint(path)
    model = Transformer.from_checkpoint(ckpt, torch.float32)
    state = model.state_dict()
    loaded = 0
    for name in q.names:
        t = q.get(name)
        if name not in state:
            continue
        state[name] = t.dequantize().float() if hasattr(t, "dequantize") else t.float()
        loaded += 1
    if loaded < len(state) - 1:
        raise RuntimeError(f"{path}: only {loaded} of {len(state)} tensors matched the reference model")
    model.load_state_dict(state)
    return model.eval()


def gptqmodel_quantize(method: str, tokens: torch.Tensor, out: Path, gptq_config: str = "defaults") -> float:
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.quantization.config import AWQConfig, QuantizeConfig

    if method == "gptq":
        cfg = QuantizeConfig(**PEER_GPTQ_CONFIGS[gptq_config])
        backend = BACKEND.AUTO
    else:
        cfg = AWQConfig(bits=4, group_size=128, sym=False)
        backend = BACKEND.AWQ_TORCH
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in tokens]
    t0 = time.perf_counter()
    model = GPTQModel.load(str(NANO_PATH), cfg, device="cpu")
    model.quantize(calib, batch_size=4, backend=backend, calibration_sort=None)
    model.save(str(out))
    seconds = time.perf_counter() - t0
    del model
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds for quantkit")
    ap.add_argument("--peer-seeds", default="0", help="calibration seeds for GPTQModel ('' = none)")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--calib", default="pg", help="pg (../shared/data/pg-english/calib) or builtin")
    ap.add_argument("--methods", default="gptq,awq")
    ap.add_argument("--no-rtn", action="store_true", help="skip the RTN baseline rows")
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="quantkit GPTQ's calibration forward and Hessian products, AWQ's scale search (quantize "
                         "--compute-dtype)")
    ap.add_argument("--gptq-variants", default="",
                    help="quantkit GPTQ settings to compare, ';'-separated, each 'damp=0.05,group_aware=0,act_order' "
                         "('' = quantkit's defaults)")
    ap.add_argument("--peer-gptq", default="defaults", choices=sorted(PEER_GPTQ_CONFIGS),
                    help="GPTQModel's GPTQ settings: defaults (its out-of-the-box QuantizeConfig) or matched "
                         "(quantkit's defaults: damp 0.1, group-aware order)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    wiki = shared_data("wikitext-2-raw", "wiki.test.raw")
    if wiki is None:
        print("error: ../shared/data/wikitext-2-raw is absent", file=sys.stderr)
        return 2
    calib_spec = str(shared_data("pg-english", "calib")) if args.calib == "pg" else "builtin"
    ckpt = open_checkpoint(NANO_PATH)
    tok = load_tokenizer(ckpt.tokenizer_path)
    eval_ids = tokenize_for_convention(tok, read_texts(wiki), "gptq")
    base = Transformer.from_checkpoint(ckpt, torch.float32).eval()
    base_plain = logits_fn(base)
    base_cache: dict[bytes, torch.Tensor] = {}

    def base_fn(tokens):  # the BF16 model's logits are the same for every row: compute each window once
        key = tokens.numpy().tobytes()
        if key not in base_cache:
            base_cache[key] = base_plain(tokens)
        return base_cache[key]
    schemes = {"gptq": "w4a16-g128", "awq": "w4a16-g128-asym"}
    methods = [m for m in args.methods.split(",") if m]
    variants = [v.strip() for v in args.gptq_variants.split(";")] if args.gptq_variants else [""]
    rows: list[dict] = []

    def evaluate(scheme: str, tool: str, method: str, seed, model, seconds) -> None:
        r = compare_models(base_fn, logits_fn(model), eval_ids, "gptq", 512, progress=False,
                           bos_id=tok.bos_id, max_windows=args.windows or None)
        row = {"tool": tool, "method": method, "scheme": scheme, "seed": seed,
               "kld_mean": r["kld"]["mean"] if isinstance(r.get("kld"), dict) else r.get("kld_mean"),
               "ppl": r["ppl_test"]["ppl"], "ppl_base": r["ppl_ref"]["ppl"],
               "same_top": 100 * r["same_top"]["fraction"],
               "quantize_s": seconds, "n_windows": r["n_windows"]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        tmp = Path(tmp)
        for method in ([] if args.no_rtn else methods):
            rtn, info = quantkit_model(ckpt, "rtn", schemes[method], None, tmp)
            evaluate(schemes[method], "quantkit", "rtn", None, rtn, info["quantize_seconds"])
            del rtn
        seeds = [int(s) for s in args.seeds.split(",") if s != ""]
        peer_seeds = [int(s) for s in args.peer_seeds.split(",") if s != ""]
        for seed in sorted(set(seeds) | set(peer_seeds)):
            calib = load_calibration(calib_spec, tok, args.calib_samples, args.calib_seqlen, seed)
            print(f"# seed {seed}: calibration {calib.identity['source']} sha256 {calib.sha256[:16]}", flush=True)
            for method in methods:
                for variant in (variants if method == "gptq" else [""]) if seed in seeds else []:
                    model, info = quantkit_model(ckpt, method, schemes[method], calib.tokens, tmp, args.compute_dtype,
                                                 parse_variant(variant))
                    evaluate(schemes[method], f"quantkit[{variant}]" if variant else "quantkit", method, seed, model,
                             info["quantize_seconds"])
                    del model
                if seed in peer_seeds:
                    out = tmp / f"gptqmodel-{method}-{seed}"
                    try:
                        seconds = gptqmodel_quantize(method, calib.tokens, out, args.peer_gptq)
                        model = model_from_quantized_dir(ckpt, out)
                    except Exception as e:  # report and go on: the other rows are still useful
                        print(f"# GPTQModel {method} seed {seed} failed: {type(e).__name__}: {e}", flush=True)
                        continue
                    tool = "gptqmodel-7.6" + (f"[{args.peer_gptq}]" if method == "gptq" else "")
                    evaluate(schemes[method], tool, method, seed, model, round(seconds, 2))
                    del model

    print("\n| tool | method | scheme | seeds | mean KLD | PPL | same top % | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["tool"], r["method"], r["scheme"]), []).append(r)
    for (tool, method, scheme), rs in groups.items():
        kl = [r["kld_mean"] for r in rs]
        pp = [r["ppl"] for r in rs]
        spread = lambda v, f: (f"{statistics.mean(v):{f}} ± {statistics.stdev(v):{f}}" if len(v) > 1  # noqa: E731
                               else f"{v[0]:{f}}")
        st = [r["same_top"] for r in rs if r["same_top"] is not None]
        print(f"| {tool} | {method} | {scheme} | {','.join(str(r['seed']) for r in rs)} | {spread(kl, '.5f')} | "
              f"{spread(pp, '.3f')} | {statistics.mean(st) if st else float('nan'):.2f} | "
              f"{statistics.mean(r['quantize_s'] for r in rs):.0f} |")
    print(f"\nbase (BF16 weights, fp32 compute) PPL {rows[0]['ppl_base']:.3f} on {rows[0]['n_windows']} windows")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
