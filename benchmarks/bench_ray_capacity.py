"""How many real-time VAD streams one Ray Serve replica carries, and what the session
directory costs (BATCHRTC_ENGINE=ray, issue 15).

* **Streams one replica carries.** N streams in this process (one front end) each send a 96 ms
  48 kHz int16 chunk every 96 ms (ReplyOnPause's hop), starts spread over one hop, for
  `--seconds`; every chunk goes through `RayVAD` (bundled calls, carried state) to one replica
  on a local 2-CPU Ray cluster. A stream keeps up when its chunks are answered before the next
  is due; the row reports chunk latency (submit -> probabilities) and how late the senders got.
* **The session directory.** `claim` + `release` round trips, and a relayed request
  (`forward`: front end B -> directory -> front end A's poll -> A's answer -> B), between two
  `SessionsClient`s of this process on the real directory actor.

Usage (needs the `ray` extra)::

    python -m benchmarks.bench_ray_capacity            # ~2 min; benchmarks/results/bench_ray_capacity.md
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

from benchmarks.bench_ray_engine import HOP, _chunk, publish

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
HOP_S = HOP / 48000


async def carry(open_stream: Any, n: int, seconds: float, chunk: np.ndarray) -> dict[str, float]:
    lat: list[float] = []
    late: list[float] = []
    failed = 0
    t0 = time.monotonic() + 0.2

    async def stream(k: int) -> None:
        nonlocal failed
        s = open_stream(48000)
        start = t0 + HOP_S * k / n
        i = 0
        while True:
            due = start + i * HOP_S
            if due > t0 + seconds:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.monotonic()
            late.append(sent - due)
            try:
                await s.process(chunk)
                lat.append(time.monotonic() - sent)
            except Exception:
                failed += 1
            i += 1
        s.close()

    await asyncio.gather(*(stream(k) for k in range(n)))
    a = np.asarray(lat) * 1e3
    b = np.asarray(late) * 1e3
    return {"streams": n, "chunks": int(a.size), "failed": failed, "p50_ms": float(np.percentile(a, 50)),
            "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)),
            "late_p95_ms": float(np.percentile(b, 95)), "late_max_ms": float(b.max()),
            # A stream sends its next chunk when the last is answered (as ReplyOnPause does):
            # it keeps up while its senders stay less than a hop behind their schedule.
            "keeps_up": bool(np.percentile(b, 95) < HOP_S * 1e3)}


async def directory_costs(settings: Any, rounds: int) -> dict[str, float]:
    from server.engine.ray_app import connect_sessions

    a = await connect_sessions(settings)
    b = await connect_sessions(settings)

    async def set_input(sid: str, args: Any) -> None:
        return None

    a.local_ops["set_input"] = set_input
    claim: list[float] = []
    fwd: list[float] = []
    try:
        for i in range(rounds):
            t = time.perf_counter()
            assert await a.claim(f"bench-{i}", 1 << 30) is None
            claim.append(time.perf_counter() - t)
            t = time.perf_counter()
            await b.forward("set_input", f"bench-{i}", ("x",))
            fwd.append(time.perf_counter() - t)
            a.release(f"bench-{i}")
    finally:
        await a.close()
        await b.close()
    c = np.asarray(claim[5:]) * 1e3
    f = np.asarray(fwd[5:]) * 1e3
    return {"claim_p50_ms": float(np.percentile(c, 50)), "claim_p95_ms": float(np.percentile(c, 95)),
            "forward_p50_ms": float(np.percentile(f, 50)), "forward_p95_ms": float(np.percentile(f, 95)),
            "n": int(c.size)}


async def measure(ns: list[int], seconds: float, rounds: int) -> dict[str, Any]:
    import ray
    from ray import serve

    from server.config import load_settings
    from server.engine.ray_app import RayEngine, connect

    from server.vad_engine import VADEngine

    chunk = _chunk()
    local = VADEngine(device="cpu", capacity=1024)
    await carry(local.open_stream, 8, 1.0, chunk)  # warm-up
    local_rows = []
    for n in ns:  # before Ray starts: the same load on the in-process engine
        local_rows.append(await carry(local.open_stream, n, seconds, chunk))
        print("local", local_rows[-1], flush=True)
    local.close()

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        settings = load_settings()
        handle = await asyncio.to_thread(connect, settings)
        eng = RayEngine(handle, timeout_s=30, origin="bench")
        await carry(eng.vad.open_stream, 8, 1.0, chunk)  # warm-up
        rows = []
        for n in ns:
            rows.append(await carry(eng.vad.open_stream, n, seconds, chunk))
            print(rows[-1], flush=True)
        bundler = eng.vad.bundler.stats()
        replica = await handle.options(method_name="stats").remote()
        await eng.close()
        directory = await directory_costs(settings, rounds)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"rows": rows, "local_rows": local_rows, "bundler": bundler, "replica_batches": replica.get("batch_size_hist"),
            "directory": directory, "seconds": seconds}


def report(res: dict[str, Any], machine: dict[str, Any]) -> str:
    lines = [
        "# Ray Serve engine: real-time VAD streams one replica carries; session directory costs",
        "",
        f"Machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs (shared with other work), torch "
        f"{machine.get('torch')}, ray {machine.get('ray')}, Python {machine['python']}; CPU only. One local Ray "
        "cluster (2 CPUs): one replica (its own process, 1 torch thread) and this process (the front end and "
        "the load) share the same 2 cores.",
        "",
        f"N streams, each one 96 ms 48 kHz chunk every 96 ms for {res['seconds']:g} s; a stream sends its next "
        "chunk when the last is answered (as ReplyOnPause does). `ray`: through one front end's bundled calls to "
        "one replica; `local`: the same load on the in-process engine (BATCHRTC_ENGINE=local, one process). "
        "Keeps up: the senders' lateness p95 stays under one hop (96 ms), i.e. no backlog builds.",
        "",
        "| engine | streams | chunks | failed | latency p50 (ms) | p95 (ms) | p99 (ms) | sender late p95 (ms) | late max (ms) | keeps up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rows in (("local", res["local_rows"]), ("ray", res["rows"])):
        for r in rows:
            lines.append(f"| {name} | {r['streams']} | {r['chunks']} | {r['failed']} | {r['p50_ms']:.1f} | "
                         f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['late_p95_ms']:.1f} | {r['late_max_ms']:.1f} | "
                         f"{'yes' if r['keeps_up'] else 'no'} |")
    d = res["directory"]
    b = res["bundler"]
    lines += [
        "",
        f"Calls: {b['calls']:,} for {b['items']:,} chunks ({b['items_per_call']:.1f} a call), "
        f"{b['failed_calls']} failed.",
        "",
        f"Session directory (named actor, {d['n']} rounds, from this driver): claim p50 {d['claim_p50_ms']:.2f} ms, "
        f"p95 {d['claim_p95_ms']:.2f} ms; a relayed `set_input` (B -> directory -> A -> B) p50 "
        f"{d['forward_p50_ms']:.2f} ms, p95 {d['forward_p95_ms']:.2f} ms.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", default="32,64,128,192,256", help="comma-separated stream counts")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=200, help="directory round trips")
    ap.add_argument("--out", default=str(RESULTS / "bench_ray_capacity.md"))
    a = ap.parse_args(argv)
    os.environ["BATCHRTC_DEVICE"] = "cpu"
    torch.set_num_threads(1)
    publish(Path(a.out), asyncio.run(measure([int(x) for x in a.streams.split(",")], a.seconds, a.rounds)),
            report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
