"""A VAD batch next to a busy event loop: the scripted batch (what the engine runs) vs the same
module run op by op (eager), on the CPU.

    python -m benchmarks.bench_vad_gil [--streams 100] [--rounds 60]

On a server the VAD batch runs on the batcher's thread while the event loop thread holds the
GIL most of the time (WebSocket parsing, codecs, handlers). An eager torch op releases the GIL
and must take it back; next to a busy thread each take can wait up to the interpreter's switch
interval (5 ms). `N` streams each send one chunk per round (a 96 ms sliding hop or a 0.6 s
pre-turn chunk, 48 kHz int16) and wait for its probabilities, while one coroutine keeps the
loop busy in pure Python for `busy` of the time (0 = an idle loop). Reported: the batch's run
time on the worker (p50/p95) and a round's wall time, per core and load.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import numpy as np

from benchmarks.harness import RESULTS_DIR, code_version, machine_info, write_report
from models.vad_core import VADBatchCore
from server.vad_engine import VADEngine

CHUNKS = {"hop 96 ms": 4608, "pre-turn 0.6 s": 28800}
BUSY = (0.0, 0.6, 0.9)


async def _one(core: str, streams: int, samples: int, busy: float, rounds: int) -> dict[str, Any]:
    eng = VADEngine(device="cpu", max_batch_size=512)
    if core == "eager":
        eng._core = VADBatchCore(eng.model)
    rng = np.random.default_rng(0)
    chunk = (rng.standard_normal(samples) * 3000).astype(np.int16)
    handles = [eng.open_stream(48000) for _ in range(streams)]
    stop = False

    async def loop_load() -> None:  # the loop busy `busy` of every 4 ms, in pure Python
        while not stop:
            t = time.perf_counter()
            while time.perf_counter() - t < 0.004 * busy:
                sum(range(200))
            await asyncio.sleep(0.004 * (1 - busy))

    load = asyncio.create_task(loop_load())
    walls = []
    try:
        for r in range(rounds + 3):
            t = time.perf_counter()
            await asyncio.gather(*(s.process(chunk) for s in handles))
            if r >= 3:  # the first rounds warm up
                walls.append((time.perf_counter() - t) * 1e3)
    finally:
        stop = True
        await load
        for s in handles:
            s.close()
        snap = eng.batcher.stats.snapshot()
        eng.close()
    return {"core": core, "streams": streams, "chunk": samples, "busy": busy,
            "run_ms": snap["run_ms"], "mean_batch": snap["mean_batch_size"],
            "round_ms_p50": statistics.median(walls),
            "round_ms_p95": float(np.percentile(walls, 95))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_vad_gil.md"))
    a = ap.parse_args(argv)
    rows = []
    for name, samples in CHUNKS.items():
        rounds = a.rounds if samples < 10000 else max(10, a.rounds // 3)
        for busy in BUSY:
            for core in ("scripted", "eager"):
                r = asyncio.run(_one(core, a.streams, samples, busy, rounds))
                r["chunk_name"] = name
                rows.append(r)
                print(f"{name:15s} busy {busy:.1f} {core:8s} run p50 {r['run_ms']['p50']:7.1f} ms "
                      f"p95 {r['run_ms']['p95']:7.1f} ms, round p50 {r['round_ms_p50']:7.1f} ms", flush=True)
    m = machine_info()
    lines = [
        "# VAD batch next to a busy event loop: scripted (one GIL release) vs eager (op by op)",
        "",
        f"- machine: {m['cpu_model']}, {m['usable_cpus']} usable CPUs; Python {m['python']}, "
        f"torch {m.get('torch', '?')}",
        f"- command: `python -m benchmarks.bench_vad_gil --streams {a.streams} --rounds {a.rounds}`; code: {code_version()}",
        f"- {a.streams} streams at 48 kHz, int16, one chunk each per round, all awaited; CPU, 1 torch thread on the "
        "batcher; `busy` = share of the time the event loop runs pure Python (the server's loop at "
        "100-200 voice sessions: 0.6-0.9)",
        "- `scripted`: `models/vad_core.py` compiled with TorchScript (what `VADEngine` runs); `eager`: the same "
        "module called without compiling, so each torch op releases and retakes the GIL",
        "",
        "| chunk | loop busy | core | batch run p50 (ms) | batch run p95 (ms) | round p50 (ms) | round p95 (ms) | mean batch |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['chunk_name']} | {r['busy']:.1f} | {r['core']} | {r['run_ms']['p50']:.1f} | {r['run_ms']['p95']:.1f} | "
            f"{r['round_ms_p50']:.1f} | {r['round_ms_p95']:.1f} | {r['mean_batch']:.0f} |")
    write_report(a.out, "\n".join(lines) + "\n", {"rows": rows, "machine": m, "code": code_version()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
