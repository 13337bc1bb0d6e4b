#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build the core with CUDA, run the GPU
# tests and the message-passing benchmark on the GPU.
# Usage: bench/gpu_check.sh [output folder]   (default: $OUT, else build/gpu_check)
# Needs .venv with a CUDA build of torch==2.13.0 and nvcc on PATH.
set -euo pipefail
usage="usage: bash bench/gpu_check.sh [OUTPUT_FOLDER]  (default: \$OUT, else build/gpu_check)"
case "${1:-}" in
  -h|--help) echo "$usage"; exit 0 ;;
  -*) echo "bench/gpu_check.sh: unknown option '$1'; $usage" >&2; exit 2 ;;
esac
if ! command -v nvidia-smi >/dev/null; then
  echo "bench/gpu_check.sh: nvidia-smi not found; run this on a machine with" \
    "an NVIDIA GPU and its driver" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${OUT:-$root/build/gpu_check}}"
mkdir -p "$out"
# Absolute, because the commands below run from the repository root.
out="$(cd "$out" && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
cd "$root"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
arch="$("$py" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")')"
# Build only for this GPU to keep the check quick.
DVMRL_CUDA=ON PYTHON="$py" scripts/dev_build.sh -DCMAKE_CUDA_ARCHITECTURES="$arch" \
  2>&1 | tail -3 | tee "$out/build.txt"
PYTHONPATH=python "$py" -c 'import dvmrl, json; print(json.dumps(dvmrl.build_info(), indent=1))' \
  | tee "$out/build_info.json"

status=0
PYTHONPATH=python timeout 300 "$py" -m pytest tests/test_ops_cuda.py -q -rs \
  2>&1 | tee "$out/test_ops_cuda.txt" || status=$?

PYTHONPATH=python timeout 240 "$py" bench/bench_message_passing.py --device cuda \
  --variants fused dense edge --json "$out/bench_message_passing_cuda.json" \
  2>&1 | tee "$out/bench_message_passing_cuda.txt" || status=$?
exit "$status"
