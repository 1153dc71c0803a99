#!/usr/bin/env bash
# Build llama.cpp's llama-server (the reference of bench/serve_gen.py) from the llama.cpp
# vendored in the llama-cpp-python sdist on PyPI (no other network access needed), into
# runs/llamacpp-src/llama_cpp_python-$VERSION/vendor/llama.cpp/<key>/bin/llama-server, and print
# that path last. About 10-20 minutes on 2 cores.
#
# One build per CPU kind: <key> (bench/llama_build.py, which bench/serve_gen.py uses too) is
# build-<avx512|avx2|base>-<hash of the CPU's flags that matter>, and each x86 extension is
# compiled in only where this CPU has it (an AVX-512 build dies with SIGILL on an AVX2 machine).
# AMX is left out on purpose: with AMX on, llama-server crashed in ggml_backend_amx_mul_mat on
# the first batch (seen on the Xeon of this project's machines); AVX-512 (VNNI, BF16) stays on.
set -euo pipefail
VERSION=${VERSION:-0.3.36}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
KEY=$(python3 "$ROOT/bench/llama_build.py" key)
read -r -a OPTIONS <<< "$(python3 "$ROOT/bench/llama_build.py" cmake)"
SRC="$ROOT/runs/llamacpp-src"
mkdir -p "$SRC"
cd "$SRC"
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d . -q
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
cd "llama_cpp_python-$VERSION/vendor/llama.cpp"
echo "building $KEY: ${OPTIONS[*]}"
cmake -B "$KEY" -DCMAKE_BUILD_TYPE=Release -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=OFF "${OPTIONS[@]}"
cmake --build "$KEY" --target llama-server -j "$(nproc)"
echo "$PWD/$KEY/bin/llama-server"
