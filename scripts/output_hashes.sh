#!/usr/bin/env bash
# sha256 of the tensor files of mistral-nano quantized five ways by the quantkit tree at SRC_ROOT, to check that a
# refactor changes no output byte: run it on the tree before and after, and diff the two listings.
#   bash scripts/output_hashes.sh SRC_ROOT OUT_DIR > hashes.txt
# (GGUF files also carry quantkit.source_fingerprint, which hashes the source path: compare their tensor data
# when the two trees live in different directories.)
set -euo pipefail
src=$(cd "$1" && pwd); out=$2
rm -rf "$out"; mkdir -p "$out"; out=$(cd "$out" && pwd)
cd "$src"
q() { PYTHONPATH="$src" python -m quantkit quantize models/mistral-nano --no-progress --calib-samples 16 \
        --calib-seqlen 256 "$@" > /dev/null; }
q --method gptq --preset w4a16-g128 -o "$out/gptq"
q --method gptq --preset w4a16-g128 --act-order --format gptq,compressed-tensors -o "$out/multi"
q --method gptq --format gguf --type Q4_K_M -o "$out/gq4km.gguf"
q --method rtn --format gguf --type Q4_K_M --calib builtin -o "$out/rq4km.gguf"
q --method awq --preset w4a16-g128-asym -o "$out/awq"
cd "$out" && find . -name '*.safetensors' -o -name '*.gguf' | sort | xargs sha256sum
