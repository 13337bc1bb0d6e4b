#!/usr/bin/env bash
# Build dvmrl._core into python/dvmrl/ for development with PYTHONPATH=python.
# Serialised with flock so that parallel builds never share the build tree.
# Usage: scripts/dev_build.sh [extra cmake -D options]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="$root/build/dev"
mkdir -p "$build"
exec 9>"$build/.lock"
flock 9
py="${PYTHON:-$root/.venv/bin/python}"
pybind11_dir="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DSKBUILD_PROJECT_NAME=dvmrl -DSKBUILD_PROJECT_VERSION=0.1.0 \
  -DPython_EXECUTABLE="$py" -Dpybind11_DIR="$pybind11_dir" \
  -DDVMRL_CUDA="${DVMRL_CUDA:-OFF}" "$@" >"$build/configure.log"
cmake --build "$build" --parallel 2
so="$(ls "$build"/_core*.so)"
cp "$so" "$root/python/dvmrl/.tmp_core.so"
mv "$root/python/dvmrl/.tmp_core.so" "$root/python/dvmrl/$(basename "$so")"
echo "built $(basename "$so")"
