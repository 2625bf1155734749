"""What the hop to the engine process costs per item, against the same work in-process.

One item at a time (no batching, no contention: the hop itself), on the same machine:

* ``ping``: a control message to the engine and back (Unix socket, pickled tuple).
* ``vad``: one ReplyOnPause chunk (0.6 s at 48 kHz, float32, 115 KB) through the shared VAD
  engine: in-process (`VADEngine`) vs in the engine process (through shared memory).
* ``video``: one 640x480 RGB frame (921 KB) through an identity batched handler that returns
  the frame (so the result comes back through the block too), with one producer registered
  (as one session would) so the batch runs at once: in-process vs engine process.

The hop is the difference of the medians. Usage::

    python -m benchmarks.bench_engine_hop            # ~1 min; writes benchmarks/results/bench_engine_hop.md
    python -m benchmarks.bench_engine_hop --n 200 --out /tmp/hop.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import machine_info, write_report
from server.video import batched

RESULTS = Path(__file__).resolve().parent / "results"


@batched(max_batch_size=8, max_queue_delay_ms=8, device="cpu")
def identity(frames: torch.Tensor, args: list[tuple]) -> torch.Tensor:
    """The frame back, unchanged: measures the transport, not a model."""
    return frames


def _stats(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1e6
    return {"n": int(a.size), "p50_us": float(np.percentile(a, 50)), "p95_us": float(np.percentile(a, 95)),
            "mean_us": float(a.mean())}


async def _time(fn: Any, n: int, warmup: int = 10) -> dict[str, float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return _stats(out)


async def measure(n: int) -> dict[str, dict[str, float]]:
    from server.config import load_settings
    from server.engine import acquire_client, release_client
    from server.vad_engine import VADEngine

    rng = np.random.default_rng(0)
    chunk = (rng.standard_normal(28800) * 0.05).astype(np.float32)
    frame = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    rows: dict[str, dict[str, float]] = {}

    # in-process
    settings = load_settings()  # the same settings the engine process's VAD is built with
    local = VADEngine(max_batch_size=settings.vad_max_batch, max_queue_delay_ms=settings.vad_max_delay_ms,
                      threads=settings.vad_threads)
    stream = local.open_stream(48000)
    rows["vad in-process"] = await _time(lambda: stream.process(chunk), n)
    stream.close()
    local.close()
    handler = identity
    handler.process = False
    handler.add_producer()  # one session feeding it: a batch runs as soon as its frame is in
    rows["video 640x480 in-process"] = await _time(lambda: handler.submit(frame, ()), n)
    handler.remove_producer()
    handler.close(restartable=True)

    # engine process (started here, as a single server process with BATCHRTC_ENGINE=process would)
    client = await acquire_client(shm_bytes=256 << 20)
    try:
        rows["ping engine process"] = await _time(lambda: client.call("ping", timeout=10), n)
        await client.call("warm_vad", timeout=120)
        remote = client.vad.open_stream(48000)
        rows["vad engine process"] = await _time(lambda: remote.process(chunk), n)
        remote.close()
        await client.register_handler(*identity.engine_spec())
        handler.add_producer()
        rows["video 640x480 engine process"] = await _time(lambda: handler.submit(frame, ()), n)
        handler.remove_producer()
    finally:
        await release_client()
    return rows


def report(rows: dict[str, dict[str, float]], machine: dict[str, Any]) -> str:
    def hop(kind: str) -> str:
        a, b = rows.get(f"{kind} in-process"), rows.get(f"{kind} engine process")
        return f"{b['p50_us'] - a['p50_us']:,.0f}" if a and b else "-"

    lines = [
        "# Engine hop: one item in-process vs through the engine process",
        "",
        f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, torch {machine.get('torch')}, "
        f"Python {machine['python']}; CPU only. Items one at a time (no batching, no contention).",
        "",
        "| item | n | p50 (µs) | p95 (µs) | mean (µs) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['n']} | {r['p50_us']:,.0f} | {r['p95_us']:,.0f} | {r['mean_us']:,.0f} |")
    lines += [
        "",
        f"Hop (engine p50 - in-process p50): VAD chunk {hop('vad')} µs, 640x480 frame {hop('video 640x480')} µs; "
        f"control round trip alone {rows['ping engine process']['p50_us']:,.0f} µs.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="timed items per row (default 300)")
    ap.add_argument("--out", default=str(RESULTS / "bench_engine_hop.md"))
    a = ap.parse_args(argv)
    os.environ["BATCHRTC_DEVICE"] = "cpu"
    torch.set_num_threads(1)
    rows = asyncio.run(measure(a.n))
    machine = machine_info()
    text = report(rows, machine)
    md, js = write_report(Path(a.out), text, {"machine": machine, "rows": rows})
    print(text)
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
