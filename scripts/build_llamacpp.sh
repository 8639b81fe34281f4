#!/usr/bin/env bash
# Build llama.cpp's command-line tools from the llama-cpp-python sdist into a cache outside the repository.
# Tests and benchmarks that need llama.cpp find it through quantkit.testing.llamacpp_bin() and skip without it.
#   QUANTKIT_LLAMACPP_DIR   where to build (default: ~/.cache/quantkit/llama.cpp)
#   LLAMA_CPP_PYTHON_VERSION  sdist version (default 0.3.36 = ggml-org/llama.cpp@0c1e57098)
set -euo pipefail
dest="${QUANTKIT_LLAMACPP_DIR:-$HOME/.cache/quantkit/llama.cpp}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
tools="llama-quantize llama-perplexity llama-imatrix llama-tokenize llama-simple llama-completion llama-bench llama-gguf"
# AMX tiles stay off: ggml's AMX matmuls take another numeric path than the CPU kernels the tests compare with, and
# on virtual machines that report AMX without backing it they crash (SIGSEGV at ldtilecfg).
flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
case "$(uname -m)" in x86_64|amd64) ;; *) flags="" ;; esac
stamp="llama-cpp-python $version native=${GGML_NATIVE:-ON} flags=$flags"
if [ -x "$dest/build/bin/llama-quantize" ] && [ -x "$dest/build/bin/llama-perplexity" ] && [ -x "$dest/build/bin/llama-bench" ] \
   && [ "$(cat "$dest/.quantkit-build" 2>/dev/null)" = "$stamp" ]; then
  echo "llama.cpp already built in $dest"; exit 0
fi
mkdir -p "$(dirname "$dest")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$work"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
rm -rf "$dest"
cp -r "$work"/llama_cpp_python-*/vendor/llama.cpp "$dest"
cd "$dest"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DGGML_NATIVE=${GGML_NATIVE:-ON} -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" >/dev/null
cmake --build build -j"$(nproc)" --target $tools
echo "$stamp" > "$dest/.quantkit-build"
echo "built llama.cpp tools in $dest/build/bin"
