#!/usr/bin/env bash
# Issue 14's GPU numbers in one go (a few minutes on one H100/H200): the detector tests with
# their CUDA ones, a torch.profiler summary of one batch before and after, and bench_detector
# (before and after in the same run). Reports go to benchmarks/results/*_cuda.{md,txt,json}.
#
#   bash benchmarks/gpu_detector.sh
#   BASELINE=path/to/old/detector.py bash benchmarks/gpu_detector.sh   # where git is absent
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
base=()
if [ -n "${BASELINE:-}" ]; then base=(--baseline "$BASELINE"); fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
"$PY" -m pytest -q --noconftest -p no:cacheprovider tests/test_detector.py
"$PY" -m benchmarks.profile_detector --before "${base[@]}" --batches 32,64 \
  --out benchmarks/results/profile_detector_before_cuda.txt > /dev/null
"$PY" -m benchmarks.profile_detector --batches 32,64 \
  --out benchmarks/results/profile_detector_after_cuda.txt > /dev/null
grep -h -A3 "pipeline\|^batch" benchmarks/results/profile_detector_*_cuda.txt | grep -v "^--\|^$" || true
"$PY" -m benchmarks.bench_detector "${base[@]}" --device cuda --batches 1,4,16,32,64,128
