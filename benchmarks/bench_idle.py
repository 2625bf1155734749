"""What idle connections cost the server: CPU (% of one core) and memory per connection.

    python -m benchmarks.bench_idle [--counts 1,5,20] [--seconds 10]

The server is `uvicorn server.echo_app:stream` (ReplyOnPause on the batched VAD) in its own
process; its CPU time is read with psutil over `--seconds` with N connections open and nobody
speaking, minus the same reading with none open, divided by N. Kinds of idle connection:

- ``websocket``: connected and started, sends nothing;
- ``webrtc-muted``: a WebRTC audio session whose client sends no packets (a muted mic, or a
  client with Opus DTX between words);
- ``webrtc-silence``: a WebRTC audio session whose client sends 20 ms frames of silence (a
  mic in a quiet room, no DTX: aiortc has none).

Targets (issue 16): <= 2 % of a core per idle WebRTC audio connection, <= 0.5 % per idle
WebSocket one.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import websockets
from aiortc import MediaStreamTrack

from benchmarks.harness import machine_info
from benchmarks.server_process import UvicornProcess
from benchmarks.webrtc_client import AudioSource, connect

KINDS = ("websocket", "webrtc-muted", "webrtc-silence")
TARGETS = {"websocket": 0.5, "webrtc-muted": 2.0, "webrtc-silence": 2.0}


class Muted(MediaStreamTrack):
    """An audio track that never yields a frame: the client sends no RTP."""

    kind = "audio"

    async def recv(self):  # type: ignore[override]
        await asyncio.Event().wait()


async def open_idle(kind: str, n: int, http: str, ws: str, tag: str) -> list:
    conns: list = []
    for i in range(n):
        if kind == "websocket":
            sock = await websockets.connect(f"{ws}/websocket/offer", compression=None)
            await sock.send(json.dumps({"event": "start", "websocket_id": f"{tag}{i}"}))
            conns.append(sock)
        else:
            track = Muted() if kind == "webrtc-muted" else AudioSource(np.zeros(0, np.int16))
            client, answer = await connect(http, f"{tag}{i}", audio=track, recv_audio=True)
            if answer.get("type") != "answer":
                raise RuntimeError(f"offer refused: {answer}")
            conns.append(client)
    return conns


async def close_all(conns: list) -> None:
    for c in conns:
        await c.close()


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


async def measure(proc: psutil.Process, seconds: float) -> tuple[float, float]:
    """(% of one core, RSS MiB) over `seconds`."""
    c0, w0 = cpu_s(proc), time.monotonic()
    await asyncio.sleep(seconds)
    return 100 * (cpu_s(proc) - c0) / (time.monotonic() - w0), proc.memory_info().rss / 2**20


async def run(counts: list[int], seconds: float, settle: float) -> tuple[list[dict], str]:
    server = UvicornProcess(
        ["server.echo_app:stream", "--log-level", "warning", "--ws-per-message-deflate", "false"],
        {"BATCHRTC_CONCURRENCY": str(max(counts) + 8), "BATCHRTC_ICE_HOSTS": "127.0.0.1"},
        name="bench_idle",
    )
    rows = []
    with server:
        http = f"http://127.0.0.1:{server.port}"
        ws = f"ws://127.0.0.1:{server.port}"
        proc = psutil.Process(server.pid)
        # Warm up the VAD and the WebRTC stack once, then the baseline with nothing open.
        warm = await open_idle("webrtc-silence", 1, http, ws, "warm")
        await asyncio.sleep(3)
        await close_all(warm)
        await asyncio.sleep(settle)
        base_cpu, base_rss = await measure(proc, seconds)
        rows.append({"kind": "none", "n": 0, "cpu_pct": base_cpu, "rss_mib": base_rss})
        print(rows[-1], flush=True)
        for kind in KINDS:
            for n in counts:
                conns = await open_idle(kind, n, http, ws, f"{kind}-{n}-")
                await asyncio.sleep(settle)
                cpu, rss = await measure(proc, seconds)
                await close_all(conns)
                rows.append({"kind": kind, "n": n, "cpu_pct": cpu, "rss_mib": rss,
                             "per_conn_pct": (cpu - base_cpu) / n,
                             "rss_per_conn_mib": (rss - base_rss) / n})
                print(rows[-1], flush=True)
                await asyncio.sleep(settle)
        command = server.command_line(("BATCHRTC_CONCURRENCY", "BATCHRTC_ICE_HOSTS"))
    return rows, command


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="1,5,20")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--out", default="benchmarks/results/bench_idle.md")
    args = ap.parse_args()
    command = "python -m benchmarks.bench_idle " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows, server_cmd = asyncio.run(run([int(c) for c in args.counts.split(",")], args.seconds,
                                       args.settle))
    info = machine_info()
    base = rows[0]
    lines = [
        f"# Idle connections: server CPU and memory ({info['cpu_model']}, "
        f"{info['usable_cpus']} CPUs)",
        "",
        f"Command: `{command}`; server: `{server_cmd}`. Server process CPU over "
        f"{args.seconds:g} s with N idle connections, minus {base['cpu_pct']:.2f} % with none "
        f"(RSS then {base['rss_mib']:.0f} MiB), per connection.",
        "",
        "| connection | N | server CPU | per connection | RSS | RSS per connection | target | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    verdicts = {}
    for r in rows[1:]:
        target = TARGETS[r["kind"]]
        met = r["per_conn_pct"] <= target
        verdicts.setdefault(r["kind"], True)
        verdicts[r["kind"]] &= met
        lines.append(f"| {r['kind']} | {r['n']} | {r['cpu_pct']:.2f} % | {r['per_conn_pct']:.2f} % | "
                     f"{r['rss_mib']:.0f} MiB | {r['rss_per_conn_mib']:.2f} MiB | <= {target} % | "
                     f"{'MET' if met else 'NOT MET'} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "server": server_cmd, "machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
