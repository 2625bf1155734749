"""What the Ray Serve engine costs per call and per item, against the local VAD engine.

k streams each send one 96 ms chunk (48 kHz int16, ReplyOnPause's hop) at the same moment and
wait for all k results (one round); rows for k = 1 .. 512 items per round:

* ``local``: the in-process `VADEngine` (what BATCHRTC_ENGINE=local runs with one process).
* ``carried``: the same chunks with their state carried, through `RayVAD` into a `VADReplica`
  in this process (no Ray): the cost of carrying state and opening a stream per item.
* ``ray``: `BATCHRTC_ENGINE=ray`'s path: one Serve call per round to one replica on a local
  Ray cluster started here (2 CPUs), the replica in its own process.

Also a bare Serve round trip (a no-op method) and the bytes a call carries per item. Per-item
overhead is (ray p50 - local p50) / k. Usage (needs the `ray` extra)::

    python -m benchmarks.bench_ray_engine            # ~2 min; writes benchmarks/results/bench_ray_engine.md
    python -m benchmarks.bench_ray_engine --rounds 5 --out /tmp/ray.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pickle
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.fixtures import load_wav
from benchmarks.harness import OtherLoad, machine_info, write_report

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
HOP = 4608  # 96 ms at 48 kHz
KS = (1, 8, 64, 256, 512)


def _chunk() -> np.ndarray:
    from scipy.signal import resample_poly

    x = load_wav("two_voices_noise_16k.wav")[1][16000:16000 + HOP // 3]
    return np.clip(np.round(resample_poly(x.astype(np.float64), 3, 1)), -32768, 32767).astype(np.int16)


async def _rounds(open_stream: Any, k: int, rounds: int, chunk: np.ndarray) -> list[float]:
    streams = [open_stream(48000) for _ in range(k)]
    out: list[float] = []
    try:
        for r in range(rounds + 2):  # two warm-up rounds
            t0 = time.perf_counter()
            res = await asyncio.gather(*(s.process(chunk) for s in streams))
            dt = time.perf_counter() - t0
            assert all(p.size == 3 for p in res)
            if r >= 2:
                out.append(dt)
    finally:
        for s in streams:
            s.close()
    return out


def _row(samples: list[float], k: int) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"k": k, "n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "per_item_us": float(np.percentile(a, 50)) * 1e3 / k}


async def measure(rounds: int) -> dict[str, Any]:
    import ray

    from server.config import load_settings
    from server.engine.ray_app import RayEngine, connect
    from server.engine.ray_vad import RayVAD, VADReplica, pack_call, Item, StreamState
    from server.vad_engine import VADEngine

    chunk = _chunk()
    rows: dict[str, list[dict[str, float]]] = {"local": [], "carried": [], "ray": []}
    local = VADEngine(device="cpu", capacity=1024)
    replica = VADReplica(device="cpu", capacity=1024)
    carried = RayVAD(replica.process)
    with OtherLoad() as other:  # before Ray starts: its processes would count as "other"
        for k in KS:
            n = max(5, min(rounds, 4000 // k))
            rows["local"].append(_row(await _rounds(local.open_stream, k, n, chunk), k))
            rows["carried"].append(_row(await _rounds(carried.open_stream, k, n, chunk), k))
    local.close()
    await carried.close()
    replica.engine.close()

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = await asyncio.to_thread(connect, load_settings())
        eng = RayEngine(handle, timeout_s=60)
        noop = handle.options(method_name="replica_actor")
        bare = []
        for i in range(210):
            t0 = time.perf_counter()
            await noop.remote()
            if i >= 10:
                bare.append(time.perf_counter() - t0)
        for k in KS:
            n = max(5, min(rounds, 4000 // k))
            rows["ray"].append(_row(await _rounds(eng.vad.open_stream, k, n, chunk), k))
        stats = eng.vad.bundler.stats()
        await eng.close()
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    # what one call carries: a mid-stream state (pending samples, resampler history) per item
    st = StreamState(np.zeros(320, np.float32), np.zeros(256, np.float32), np.zeros(60, np.float32),
                     np.zeros(0, np.float32))
    sizes = {k: len(pickle.dumps(pack_call([Item(48000, chunk, st)] * k), protocol=5)) / k for k in KS}
    return {"rows": rows, "bare_call_ms": _row(bare, 1), "bundler": stats, "call_bytes_per_item": sizes,
            "state_bytes_mid_stream": st.nbytes, "other_load": other.value}


def report(res: dict[str, Any], machine: dict[str, Any]) -> str:
    r = res["rows"]
    lines = [
        "# Ray Serve engine: per-call and per-item overhead vs the local VAD engine",
        "",
        f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, torch {machine.get('torch')}, "
        f"ray {machine.get('ray')}, Python {machine['python']}; CPU only, 1 torch thread per VAD batcher. "
        f"Other processes' CPU load during the local rows: "
        f"{'-' if res['other_load'] is None else format(res['other_load'], '.0%')} of all CPUs.",
        "",
        "k streams send one 96 ms 48 kHz int16 chunk each at once and wait for all k results (a round);",
        "`ray` is one Serve call per round to one replica (its own process) on a local 2-CPU cluster.",
        "",
        "| k (items per call) | local p50 (ms) | carried, no Ray p50 (ms) | ray p50 (ms) | ray p90 (ms) | ray - local per item (µs) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for lo, ca, ry in zip(r["local"], r["carried"], r["ray"]):
        k = ry["k"]
        lines.append(f"| {k} | {lo['p50_ms']:.2f} | {ca['p50_ms']:.2f} | {ry['p50_ms']:.2f} | {ry['p90_ms']:.2f} | "
                     f"{(ry['p50_ms'] - lo['p50_ms']) * 1e3 / k:,.0f} |")
    b = res["bare_call_ms"]
    sizes = ", ".join(f"k={k}: {v:,.0f} B" for k, v in res["call_bytes_per_item"].items())
    lines += [
        "",
        f"Bare Serve round trip (a no-op method, by handle, from this driver): p50 {b['p50_ms']:.2f} ms, "
        f"p90 {b['p90_ms']:.2f} ms.",
        f"A stream's carried state mid-stream at 48 kHz: {res['state_bytes_mid_stream']:,} B (h, c, context: "
        "1,280 B; 256 pending 16 kHz samples; 60 samples of resampler history); measured over the Ray rows: "
        f"{res['bundler']['state_bytes_per_item']:,.0f} B per item each way, next to "
        f"{res['bundler']['sample_bytes_per_item']:,.0f} B of samples.",
        f"Pickled call size per item: {sizes}.",
    ]
    return "\n".join(lines) + "\n"


def publish(out: Path, res: dict[str, Any], report: Callable[[dict[str, Any], dict[str, Any]], str]) -> None:
    """Write a Ray benchmark's results (`report(res, machine)` as markdown, `res` as JSON
    beside it) and print the markdown."""
    machine = machine_info(("torch", "silero-vad", "ray", "numpy"))
    text = report(res, machine)
    md, js = write_report(out, text, {"machine": machine, **res})
    print(text)
    print(f"wrote {md} and {js}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=40, help="timed rounds per row (fewer for large k)")
    ap.add_argument("--out", default=str(RESULTS / "bench_ray_engine.md"))
    a = ap.parse_args(argv)
    os.environ["BATCHRTC_DEVICE"] = "cpu"
    torch.set_num_threads(1)
    publish(Path(a.out), asyncio.run(measure(a.rounds)), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
