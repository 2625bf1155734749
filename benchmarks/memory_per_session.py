"""Memory per voice session: RSS against FastRTC 0.0.34 itself, and where ours goes (tracemalloc).

    python -m benchmarks.memory_per_session [--sessions 50,100,200] [--fastrtc-python PATH]

Each row is a fresh server process with one warm-up session (model loaded, first-use caches
filled), then N WebSocket clients streaming real speech (`speech_pause_speech_16k.wav`, 48 kHz
mu-law, 20 ms frames, real time, every client the same). RSS is read with none open and
`--at-s` seconds in (mid-utterance, when a session holds its VAD state, its audio buffers and
its reply machinery; its peak over the whole row too). Modes:

* ``batched`` -- the default app (`server.echo_app`: `ReplyOnPause(echo)` on the batched VAD);
* ``fastrtc`` -- FastRTC 0.0.34 itself with the same echo (`benchmarks/fastrtc_app.py`, from
  the environment given by ``--fastrtc-python``; see bench_reply's ``fastrtc`` mode);
* ``batched-traced`` -- the default app through `traced_app` below (two GET routes: start
  tracemalloc, 8 frames per allocation, and take the baseline; compare a snapshot with it):
  where the per-session memory goes, grouped by the innermost line of our code (`server/`,
  `models/`, `batching/`) on each allocation's stack, else the allocating line. Python objects
  and numpy buffers are traced; torch tensors, thread stacks and the allocator's slack are not.
  Its RSS includes tracemalloc's own bookkeeping, so RSS is compared on the untraced rows.

Prints issue 16's verdict per N measured for both servers (ours no more RSS per session than
FastRTC's, at the snapshot and at the peak). Writes ``benchmarks/results/memory_per_session.md``
(and ``.json``; ``--render-from`` writes the markdown of a .json again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
import tracemalloc
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.harness import machine_info
from benchmarks.server_process import UvicornProcess

RESULTS = Path(__file__).resolve().parent / "results"
OURS = ("/server/", "/models/", "/batching/")
_baseline: tracemalloc.Snapshot | None = None


def _site(tb: tracemalloc.Traceback) -> str:
    """The innermost frame of our code on the stack (else the allocating line)."""
    for frame in reversed(tb):  # tracemalloc lists the oldest frame first
        if any(p in frame.filename for p in OURS):
            name = frame.filename[frame.filename.rfind("/", 0, frame.filename.rfind("/")) + 1:]
            return f"{name}:{frame.lineno}"
    frame = tb[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} (not ours)"


def traced_app():  # uvicorn --factory target
    """The default app plus GET /_mem/mark (start tracing, baseline snapshot) and /_mem/diff
    (against it)."""
    from server.echo_app import stream

    def snapshot() -> tracemalloc.Snapshot:
        return tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__),))

    @stream.get("/_mem/mark")
    async def _mark() -> dict:
        global _baseline
        if not tracemalloc.is_tracing():
            tracemalloc.start(8)
        _baseline = snapshot()
        return {"traced": tracemalloc.get_traced_memory()[0]}

    @stream.get("/_mem/diff")
    async def _diff() -> dict:
        if _baseline is None:
            return {"error": "GET /_mem/mark first"}
        now = snapshot()
        by_site: dict[str, list[int]] = {}
        for stat in now.compare_to(_baseline, "traceback"):
            entry = by_site.setdefault(_site(stat.traceback), [0, 0])
            entry[0] += stat.size_diff
            entry[1] += stat.count_diff
        total = sum(s.size for s in now.traces) - sum(s.size for s in _baseline.traces)
        return {"total_diff": total, "sites": sorted(by_site.items(), key=lambda kv: -kv[1][0])}

    return stream


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=300) as r:  # a traced snapshot takes a while
        return json.loads(r.read())


def _server(mode: str, n: int, fastrtc_python: str | None) -> UvicornProcess:
    args = ["--log-level", "warning", "--ws-per-message-deflate", "false"]
    env = {"BATCHRTC_CONCURRENCY": str(n + 8)}
    if mode == "fastrtc":
        from benchmarks.bench_reply import FASTRTC_START_TIMEOUT_S, fastrtc_env

        return UvicornProcess(["benchmarks.fastrtc_app:app", *args], env | fastrtc_env(fastrtc_python),
                              name="memory_fastrtc", start_timeout_s=FASTRTC_START_TIMEOUT_S,
                              python=fastrtc_python)
    app = ["benchmarks.memory_per_session:traced_app", "--factory"] if mode == "batched-traced" else ["server.echo_app:stream"]
    return UvicornProcess([*app, *args], env, name=f"memory_{mode}", start_timeout_s=120)


def run(mode: str, n: int, at_s: float, fastrtc_python: str | None = None) -> dict[str, Any]:
    from benchmarks.bench_reply import FIXTURES, _fixture_pcm48

    pcm = _fixture_pcm48(FIXTURES[0], 0.5, None)
    server = _server(mode, n, fastrtc_python)
    with server:
        base = f"http://127.0.0.1:{server.port}"
        url = f"ws://127.0.0.1:{server.port}/websocket/offer"
        proc = psutil.Process(server.pid)
        asyncio.run(_warm(url, pcm))
        time.sleep(1.0)
        traced = mode == "batched-traced"
        if traced:
            _get(f"{base}/_mem/mark")
        rss0, threads0 = proc.memory_info().rss, proc.num_threads()
        got = asyncio.run(_sessions(url, n, pcm, at_s, base if traced else None, proc))
        command = server.command_line(("BATCHRTC_CONCURRENCY",))
    return {"mode": mode, "n": n, "at_s": at_s, "rss0": rss0, "threads0": threads0,
            "server_command": command, **got}


async def _warm(url: str, pcm: np.ndarray) -> None:
    from benchmarks.ws_client import stream_audio

    await stream_audio(url, "mem-warm", pcm, 48000, tail_s=1.0)


async def _sessions(url: str, n: int, pcm: np.ndarray, at_s: float, traced_base: str | None,
                    proc: psutil.Process) -> dict[str, Any]:
    """N sessions streaming `pcm`: RSS and threads `at_s` in, peak RSS throughout, and (traced)
    the tracemalloc diff at `at_s`."""
    from benchmarks.ws_client import stream_audio

    tasks = [asyncio.create_task(stream_audio(url, f"mem-{i}", pcm, 48000, tail_s=0.5)) for i in range(n)]
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    await asyncio.sleep(at_s)
    out: dict[str, Any] = {"rss1": proc.memory_info().rss, "threads1": proc.num_threads()}
    if traced_base:
        out |= await asyncio.to_thread(_get, f"{traced_base}/_mem/diff")
    results = await asyncio.gather(*tasks, return_exceptions=True)
    sampler.cancel()
    failed = [repr(r)[:200] for r in results if isinstance(r, BaseException)]
    if failed:
        print(f"{len(failed)} session(s) failed, e.g. {failed[0]}", file=sys.stderr)
    return out | {"rss_peak": peak, "sessions_done": len(results) - len(failed)}


def _per_session(r: dict[str, Any], key: str) -> float:
    """RSS added per session (KiB) at the snapshot (`rss1`) or the peak (`rss_peak`)."""
    return (r[key] - r["rss0"]) / r["n"] / 1024


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 16's target, per N measured for both: ours no more per session than FastRTC's,
    at the snapshot and at the peak."""
    by = {(r["mode"], r["n"]): r for r in rows}
    lines = []
    for n in sorted({n for m, n in by if m == "batched" and ("fastrtc", n) in by}):
        ours, theirs = by["batched", n], by["fastrtc", n]
        pairs = [(_per_session(ours, k), _per_session(theirs, k)) for k in ("rss1", "rss_peak")]
        met = all(a <= b for a, b in pairs)
        lines.append(f"- N={n}: per session ours {pairs[0][0]:.0f} / {pairs[1][0]:.0f} KiB, FastRTC "
                     f"{pairs[0][1]:.0f} / {pairs[1][1]:.0f} KiB (snapshot / peak); target ours <= "
                     f"FastRTC's: **{'MET' if met else 'NOT MET'}**")
    return lines


def render(rows: list[dict[str, Any]], meta: dict[str, str]) -> str:
    kib = 1024
    lines = [
        "# Memory per voice session: RSS against FastRTC 0.0.34, and where ours goes",
        "",
        f"- machine: {meta['machine']}",
        f"- command: `{meta['command']}`",
        "- servers (a fresh process per row): "
        + "; ".join(sorted({f"`{r['server_command']}`" for r in rows})),
        f"- each row: one warm-up session, then N WebSocket sessions streaming "
        f"`speech_pause_speech_16k.wav` (48 kHz mu-law, 20 ms frames, real time); RSS with none "
        f"open, {rows[0]['at_s'] if rows else '-'} s in (mid-utterance), and its peak over the row",
        "",
        "| mode | N | sessions ok | RSS none open | RSS at snapshot | per session | peak RSS | peak per session | threads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        n = r["n"]
        lines.append(
            f"| {r['mode']} | {n} | {r['sessions_done']}/{n} | {r['rss0'] / 2**20:.0f} MiB | "
            f"{r['rss1'] / 2**20:.0f} MiB | {(r['rss1'] - r['rss0']) / n / kib:.0f} KiB | "
            f"{r['rss_peak'] / 2**20:.0f} MiB | {(r['rss_peak'] - r['rss0']) / n / kib:.0f} KiB | "
            f"{r['threads0']} -> {r['threads1']} |")
    targets = verdicts(rows)
    if targets:
        lines += ["", "Issue 16's target (memory per session under FastRTC's):", *targets]
    for r in rows:
        if "sites" not in r:
            continue
        n = r["n"]
        lines += [
            "",
            f"Where ours goes (`batched-traced`, N={n}): traced {r['total_diff'] / n / kib:.0f} KiB per "
            f"session (Python objects and numpy buffers alive at the snapshot, against the "
            f"baseline); grouped by the innermost line of our code on each allocation's stack, "
            f"top 15 by size:",
            "",
            "| site | KiB per session | blocks per session |",
            "|---|---:|---:|",
        ]
        for site, (size, count) in r["sites"][:15]:
            lines.append(f"| `{site}` | {size / n / kib:.1f} | {count / n:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default="50,100,200", help="comma-separated N list")
    ap.add_argument("--modes", default="batched,fastrtc,batched-traced")
    ap.add_argument("--traced-sessions", default="50",
                    help="N list for batched-traced (tracing slows the server: clients time out past ~50)")
    ap.add_argument("--at-s", type=float, default=3.0, help="snapshot this long after the sessions start")
    ap.add_argument("--fastrtc-python", default=os.environ.get("BATCHRTC_BENCH_FASTRTC_PYTHON"),
                    help='mode "fastrtc": the python of an environment with fastrtc[vad]==0.0.34')
    ap.add_argument("--out", default=str(RESULTS / "memory_per_session.md"))
    ap.add_argument("--render-from", default=None, metavar="JSON",
                    help="measure nothing: write the markdown of an earlier run's .json again (next to it)")
    a = ap.parse_args(argv)
    if a.render_from:
        raw = json.loads(Path(a.render_from).read_text())
        out = Path(a.render_from).with_suffix(".md")
        out.write_text(render(raw["rows"], raw["meta"]))
        print("\n".join(verdicts(raw["rows"])))
        return 0
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("batched", "fastrtc", "batched-traced"):
            ap.error(f"unknown mode {m!r}")
    if "fastrtc" in modes and not a.fastrtc_python:
        ap.error('mode "fastrtc" needs --fastrtc-python (or leave it out of --modes)')
    command = " ".join(["python -m benchmarks.memory_per_session",
                        *(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))])
    rows = []
    for mode in modes:
        counts = a.traced_sessions if mode == "batched-traced" else a.sessions
        for n in (int(x) for x in counts.split(",") if x.strip()):
            rows.append(run(mode, n, a.at_s, a.fastrtc_python))
            print({k: v for k, v in rows[-1].items() if k != "sites"}, flush=True)
    meta = {"machine": str(machine_info()), "command": command}
    out = Path(a.out)
    out.write_text(render(rows, meta))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
