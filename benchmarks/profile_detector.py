"""torch.profiler summary of one FaceDetector.detect call: where a batch's time goes.

    python -m benchmarks.profile_detector [--device cuda] [--batches 32] [--before] [--out FILE]

``--before`` profiles the detector as it was before issue 14 (see bench_detector).

Prints the top ops by self device time and by self CPU time, the time inside each labelled
stage (``mtcnn.*`` record_function ranges) and how many ops one call dispatches.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_detector import frames, load_baseline
from models.detector import FaceDetector


def summary(det: FaceDetector, x: torch.Tensor, sync) -> str:
    for _ in range(3):
        det.detect(x)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        det.detect(x)
        sync()
        wall = time.perf_counter() - t0
    ev = prof.key_averages()
    n_ops = sum(e.count for e in ev if e.key.startswith("aten::") and not e.is_user_annotation)
    dev_key = "self_cuda_time_total" if x.is_cuda else "self_cpu_time_total"
    lines = [f"batch {x.shape[0]} {tuple(x.shape[1:3])}: {wall * 1e3:.1f} ms wall under the "
             f"profiler, {n_ops} aten ops dispatched"]
    for e in ev:
        if e.key.startswith("mtcnn."):
            lines.append(f"  stage {e.key}: CPU {e.cpu_time_total / 1e3:.2f} ms"
                         + (f", device {e.device_time_total / 1e3:.2f} ms" if x.is_cuda else ""))
    lines.append(ev.table(sort_by=dev_key, row_limit=15, max_name_column_width=40))
    if x.is_cuda:
        lines.append(ev.table(sort_by="self_cpu_time_total", row_limit=12,
                              max_name_column_width=40))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="32")
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--before", action="store_true", help="profile the pre-issue-14 detector")
    ap.add_argument("--baseline", default=None, help="its detector.py (default: from git)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    dev = torch.device(args.device)
    det = load_baseline(args.baseline).FaceDetector(dev) if args.before else FaceDetector(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    head = f"{'before' if args.before else 'after'}: {getattr(det, 'pipeline', 'dynamic')} pipeline"
    text = head + "\n\n" + "\n\n".join(summary(det, torch.from_numpy(frames(int(b), w, h)).to(dev), sync)
                       for b in args.batches.split(","))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
