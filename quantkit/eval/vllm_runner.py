"""Prompt log-probabilities from vLLM, for `quantkit verify --client vllm` (quantkit/eval/vllm_client.py).

This file runs INSIDE the vLLM virtual environment (scripts/build_vllm.sh), not in quantkit's: it imports only
vllm and the standard library, and never quantkit. Run it as a script:

    VENV/bin/python vllm_runner.py --job job.json --out result.json

job.json: {"models": [{"path": DIR, "quantization": null | "gptq" | ...}, ...],
           "sequences": [[token ids], ...], "topk": K, "dtype": "auto" | "float32" | "bfloat16" | "float16",
           "max_model_len": 512}
Every model is loaded in turn by the same process (one Python / vLLM import for all of them) and scores every
sequence with SamplingParams(max_tokens=1, prompt_logprobs=K) and the ids as `prompt_token_ids` (no tokenizer:
`skip_tokenizer_init=True`). result.json: {"vllm_version", "models": [{"path", "load_s", "run_s",
"quantization", "dtype", "sequences": [[{"token", "logprob", "rank", "top": [[id, logprob], ...]}, ...], ...]}]}
with one entry per position 1..T-1 of each sequence: the logprob and rank of the actual token given the tokens
before it, and vLLM's top-K (ids with their logprobs, best first). A model that fails to load gets
{"path", "error"} instead, and the next model still runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

MARKER = "[quantkit-vllm-runner]"


def score_model(spec: dict, job: dict) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    kwargs = dict(model=spec["path"], skip_tokenizer_init=True, enforce_eager=True,
                  max_model_len=int(job.get("max_model_len", 512)), dtype=job.get("dtype", "auto"),
                  max_logprobs=int(job["topk"]), seed=0)
    if spec.get("quantization"):
        kwargs["quantization"] = spec["quantization"]
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - t0
    info = {}
    try:
        mc = llm.llm_engine.model_config
        info = {"quantization": mc.quantization, "dtype": str(mc.dtype).replace("torch.", "")}
    except Exception:  # noqa: BLE001 - introspection only
        pass
    params = SamplingParams(max_tokens=1, prompt_logprobs=int(job["topk"]), temperature=0.0, detokenize=False)
    t1 = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": list(ids)} for ids in job["sequences"]], params, use_tqdm=False)
    run_s = time.perf_counter() - t1
    sequences = []
    for ids, out in zip(job["sequences"], outputs):
        rows = []
        for pos in range(1, len(ids)):
            entry = out.prompt_logprobs[pos]
            token = int(ids[pos])
            top = sorted(((int(t), lp.logprob, lp.rank) for t, lp in entry.items() if lp.rank <= job["topk"]),
                         key=lambda r: r[2])
            actual = entry[token]
            rows.append({"token": token, "logprob": actual.logprob, "rank": actual.rank,
                         "top": [[t, lp] for t, lp, _ in top]})
        sequences.append(rows)
    del llm
    gc.collect()
    return {"path": spec["path"], "load_s": load_s, "run_s": run_s, **info, "sequences": sequences}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.job) as f:
        job = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm

    result = {"vllm_version": vllm.__version__, "models": []}
    for i, spec in enumerate(job["models"]):
        print(f"{MARKER} model {i}: {spec['path']}", flush=True)  # splits the log per model (vllm_client.py)
        try:
            result["models"].append(score_model(spec, job))
        except Exception as e:  # noqa: BLE001 - reported per model, the caller raises
            traceback.print_exc()
            result["models"].append({"path": spec["path"], "error": f"{type(e).__name__}: {' '.join(str(e).split())}"})
        with open(args.out + ".tmp", "w") as f:  # what is done so far survives a later crash or timeout
            json.dump(result, f)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":  # vLLM starts worker processes: without the guard they would rerun this file
    sys.exit(main())
