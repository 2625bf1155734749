#!/usr/bin/env bash
# Issue 13's GPU numbers, in one go, on a GPU machine (written for one H100/H200 with 16 cores):
# video sessions with the front ends in N worker processes feeding one engine process, against
# one process (the handler in its own process, the default on CUDA), 640x480 @ 30 fps
# send-receive, and send-only sessions; then ReplyOnPause with FastRTC's default 20 ms frames, 1 vs 2 workers, against
# FastRTC's per-session ONNX VAD. Reports go to benchmarks/results/*_cuda.md (+ .json).
#
#   bash benchmarks/gpu_engine_process.sh            # ~25 min
#   WORKERS=6 bash benchmarks/gpu_engine_process.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS="${WORKERS:-8}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
python -m benchmarks.bench_video --modes batched-proc,batched-workers --workers "$WORKERS" \
  --sessions 16,32,64 --server-cpus 0-9 --client-cpus 10-15 --client-procs 4 \
  --out benchmarks/results/bench_video_workers_cuda.md
# send-only sessions (detections out, no video back): how many hold 25 fps
python -m benchmarks.bench_video --modes batched-send-workers --workers "$WORKERS" \
  --sessions 64,128,192 --server-cpus 0-9 --client-cpus 10-15 --client-procs 4 \
  --out benchmarks/results/bench_video_send_workers_cuda.md
python -m benchmarks.bench_reply --modes batched,batched-w2,fastrtc-onnx --frame-ms 20 \
  --sessions 100,200,400 --out benchmarks/results/bench_reply_workers_cuda.md
