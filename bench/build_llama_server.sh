#!/usr/bin/env bash
# Build llama.cpp's llama-server (the reference of bench/serve_gen.py) from the llama.cpp
# vendored in the llama-cpp-python sdist on PyPI (no other network access needed), into
# runs/llamacpp-src/.../build-noamx/bin/llama-server. About 10-20 minutes on 2 cores.
#
# AMX is left out on purpose: with -DGGML_NATIVE=ON the build enables ggml's AMX kernels on
# CPUs that have AMX, and llama-server then crashes in ggml_backend_amx_mul_mat on the first
# batch (seen on the Xeon of this project's machines); AVX-512 (with VNNI and BF16) stays on.
# On an AVX2-only CPU pass AVX512=OFF.
set -euo pipefail
VERSION=${VERSION:-0.3.36}
AVX512=${AVX512:-$(grep -q avx512f /proc/cpuinfo && echo ON || echo OFF)}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC="$ROOT/runs/llamacpp-src"
mkdir -p "$SRC"
cd "$SRC"
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d . -q
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
cd "llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -B build-noamx -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
  -DGGML_F16C=ON -DGGML_AVX512="$AVX512" -DGGML_AVX512_VBMI="$AVX512" -DGGML_AVX512_VNNI="$AVX512" \
  -DGGML_AVX512_BF16="$AVX512" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
cmake --build build-noamx --target llama-server -j "$(nproc)"
echo "built $PWD/build-noamx/bin/llama-server"
