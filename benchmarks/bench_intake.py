"""Server CPU per WebSocket media message: what one 20 ms frame costs the voice server.

    python -m benchmarks.bench_intake [--sessions 50] [--seconds 10] [--repeats 3]
        [--compare-tree DIR]

N WebSocket sessions send FastRTC `media` messages (20 ms of 48 kHz mu-law, the `json.dumps`
form) at real time to `uvicorn server.echo_app:stream` (ReplyOnPause echo on the batched VAD)
in its own process; the server process's CPU time over the sending window, divided by the
messages sent, is the cost per message (all of it: uvicorn's WebSocket layer, our intake, the
VAD, the pause rule and, with speech, the echo replies). Payloads:

- ``silence``: digital silence (outside a turn the VAD is skipped: `ReplyOnPause._silent`);
- ``speech``: the four speech fixtures, looped, one per session (real turns and replies).

``floor`` is the same load against a bare Starlette WebSocket route that only receives: what
uvicorn and Starlette cost per message before any of our code runs. `--compare-tree DIR`
adds the silence and speech rows for the server as another source tree has it (e.g. `git
worktree add /tmp/before REV`), in the same run, runs of the two alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import time
from pathlib import Path
from typing import Any

import psutil
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from benchmarks.harness import code_version, command_line, machine_info, write_report
from benchmarks.server_process import UvicornProcess

FRAME = 960  # 20 ms at 48 kHz
KINDS = ("floor", "silence", "speech")


async def _receive_only(websocket: WebSocket) -> None:
    await websocket.accept()
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


floor_app = Starlette(routes=[WebSocketRoute("/websocket/offer", _receive_only)])


def _messages(kind: str) -> list[list[str]]:
    """Per workload, its media messages in order (sessions take workloads in turn)."""
    from benchmarks.bench_reply import FIXTURES, _fixture_pcm48
    from server.codecs import ulaw_encode

    def encode(pcm) -> list[str]:
        return [json.dumps({"event": "media", "media": {"payload": base64.b64encode(
            ulaw_encode(pcm[s : s + FRAME])).decode("ascii")}}) for s in range(0, pcm.size - FRAME + 1, FRAME)]

    if kind == "speech":
        return [encode(_fixture_pcm48(name, 1.0, None)) for name in FIXTURES]
    import numpy as np

    return [encode(np.zeros(FRAME * 50, np.int16))]


async def _load(port: int, kind: str, sessions: int, seconds: float, pid: int) -> dict[str, float]:
    workloads = _messages(kind)
    conns = []
    for i in range(sessions):
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/websocket/offer", compression=None,
                                      max_size=None)
        if kind != "floor":
            await ws.send(json.dumps({"event": "start", "websocket_id": f"intake-{i}"}))
        conns.append(ws)

    async def drain(ws: Any) -> None:
        try:
            async for _ in ws:
                pass
        except websockets.ConnectionClosed:
            pass

    readers = [asyncio.create_task(drain(ws)) for ws in conns]
    await asyncio.sleep(1.0)
    proc = psutil.Process(pid)
    cpu0 = sum(proc.cpu_times()[:2])
    t0 = time.monotonic()
    frames = int(seconds * 50)
    for k in range(frames):
        for i, ws in enumerate(conns):
            msgs = workloads[i % len(workloads)]
            await ws.send(msgs[k % len(msgs)])
        await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.02 - time.monotonic()))
    await asyncio.sleep(0.5)  # the last frames' work
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    wall = time.monotonic() - t0
    for ws in conns:
        await ws.close()
    await asyncio.gather(*readers, return_exceptions=True)
    sent = frames * sessions
    return {"us_per_message": cpu * 1e6 / sent, "cpu_pct": 100 * cpu / wall, "messages": sent}


def run(kind: str, sessions: int, seconds: float, root: Path | None = None) -> tuple[dict[str, float], str]:
    app = ["benchmarks.bench_intake:floor_app"] if kind == "floor" else ["server.echo_app:stream"]
    server = UvicornProcess([*app, "--log-level", "warning", "--ws-per-message-deflate", "false"],
                            {"BATCHRTC_CONCURRENCY": str(sessions + 8)}, name=f"intake_{kind}",
                            start_timeout_s=120, root=root)
    with server:
        got = asyncio.run(_load(server.port, kind, sessions, seconds, server.pid))
        return got, server.command_line(("BATCHRTC_CONCURRENCY",))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3, help="fresh server per repeat; the median is shown")
    ap.add_argument("--compare-tree", type=Path, default=None,
                    help="also measure the server of this source tree (silence, speech)")
    ap.add_argument("--out", default="benchmarks/results/bench_intake.md")
    args = ap.parse_args()
    trees: list[tuple[str, Path | None]] = [(code_version(), None)]
    if args.compare_tree is not None:
        root = args.compare_tree.resolve()
        trees.append((code_version(root), root))
    rows, servers = [], {}
    for kind in KINDS:
        here = trees[:1] if kind == "floor" else trees
        runs: dict[str, list[dict[str, float]]] = {label: [] for label, _ in here}
        for _ in range(args.repeats):
            for label, root in here:  # alternating, so drift hits both alike
                got, servers[f"{kind} ({label})"] = run(kind, args.sessions, args.seconds, root)
                runs[label].append(got)
                print(kind, label, got, flush=True)
        for label, rs in runs.items():
            rows.append({"kind": kind, "code": label, "runs": rs,
                         "us_per_message": statistics.median(r["us_per_message"] for r in rs),
                         "cpu_pct": statistics.median(r["cpu_pct"] for r in rs)})
    info = machine_info()
    lines = [
        f"# Server CPU per WebSocket media message ({info['cpu_model']}, {info['usable_cpus']} CPUs)",
        "",
        f"- command: `{command_line()}`; code: {code_version()}",
        f"- {args.sessions} sessions, 20 ms frames at real time for {args.seconds:g} s, "
        f"{args.repeats} runs per row (a fresh server each), median shown",
        *(f"- {k}: `{v}`" for k, v in servers.items()),
        "",
        "| payload | server code | server CPU per message | server CPU (% of one core) | runs (us) |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['code']} | {r['us_per_message']:.0f} us | {r['cpu_pct']:.0f} % | "
                     + ", ".join(f"{x['us_per_message']:.0f}" for x in r["runs"]) + " |")
    text = "\n".join(lines)
    print(text)
    write_report(Path(args.out), text, {"machine": info, "servers": servers, "rows": rows})


if __name__ == "__main__":
    main()
