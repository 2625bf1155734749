"""Churn soak: many connect/disconnect cycles of mixed sessions; resources return to baseline.

    python -m benchmarks.soak_churn --cycles 2000

Each round opens 6 WebSocket ReplyOnPause sessions (every third vanishes without a close
frame) and 2 WebRTC video sessions through a batched handler, on real servers on loopback,
then closes them. Every `--report-every` cycles it records the process RSS, threads, VAD
state slots in use, live sessions and event-loop tasks; the report says whether they came
back to the baseline measured after the first round.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("BATCHRTC_ICE_HOSTS", "127.0.0.1")

import base64  # noqa: E402
import json  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import websockets  # noqa: E402

from benchmarks.harness import ServerThread, code_version, machine_info, settle  # noqa: E402
from benchmarks.webrtc_client import FrameSource, connect  # noqa: E402
from server import ReplyOnPause, Stream  # noqa: E402
from server.codecs import ulaw_encode  # noqa: E402
from server.vad_engine import get_vad_engine  # noqa: E402
from server.video import batched  # noqa: E402


def echo(audio):
    yield audio


def frame(i: int) -> np.ndarray:
    img = np.full((96, 128, 3), 90, np.uint8)
    img[:, : (i % 128)] = 200
    return img


def ws_cycle_factory(server: ServerThread):
    """One WebSocket ReplyOnPause session: start, 0.8 s of audio, then stop or vanish."""
    speech = (np.sin(np.arange(48000) / 7) * 6000).astype(np.int16)
    payload = base64.b64encode(ulaw_encode(speech[:9600])).decode()

    async def ws_cycle(i: int, quit_rudely: bool) -> None:
        async with websockets.connect(f"{server.ws}/websocket/offer") as ws:
            await ws.send(json.dumps({"event": "start", "websocket_id": f"c{i}"}))
            for _ in range(4):  # 0.8 s of audio -> at least one VAD batch
                await ws.send(json.dumps({"event": "media", "media": {"payload": payload}}))
            await asyncio.sleep(0.2)
            if quit_rudely:
                ws.transport.abort()  # vanish without a close frame
                return
            await ws.send(json.dumps({"event": "stop"}))

    return ws_cycle


def rtc_cycle_factory(server: ServerThread):
    """One WebRTC video session: connect, get two processed frames, close."""
    async def rtc_cycle(i: int) -> None:
        c, ans = await connect(server.http, f"v{i}", video=FrameSource(frame, fps=15), recv_video=True, keep_frames=0)
        assert ans["type"] == "answer"
        await settle(lambda: len(c.frames) >= 2, 20)
        await c.close()

    return rtc_cycle




async def run(cycles: int, report_every: int) -> list[dict]:
    @batched(max_batch_size=16, max_queue_delay_ms=5, device="cpu")
    def passthrough(frames: torch.Tensor, args):
        return frames

    audio = Stream(ReplyOnPause(echo), modality="audio", concurrency_limit=64)
    video = Stream(passthrough, modality="video", concurrency_limit=64)

    @audio.get("/_tasks")
    async def tasks():
        return {"tasks": len(asyncio.all_tasks())}

    sa, sv = ServerThread(audio).start(), ServerThread(video).start()
    # the same session cycles as tests/test_churn_faults.py
    ws_cycle, rtc_cycle = ws_cycle_factory(sa), rtc_cycle_factory(sv)
    proc = psutil.Process()
    rows: list[dict] = []
    done = 0
    try:
        while done < cycles:
            await asyncio.gather(*(ws_cycle(done + k, k % 3 == 0) for k in range(6)), *(rtc_cycle(done + k) for k in range(2)))
            done += 8
            if done % report_every < 8 or done >= cycles:
                await settle(lambda: audio.active_sessions == 0 and video.active_sessions == 0, 30)
                gc.collect()
                async with httpx.AsyncClient() as http:
                    t = (await http.get(f"{sa.http}/_tasks")).json()["tasks"]
                rows.append({"cycles": done, "rss_mib": proc.memory_info().rss / 2**20,
                             "threads": threading.active_count(), "vad_slots": get_vad_engine().state.in_use,
                             "sessions": audio.active_sessions + video.active_sessions, "loop_tasks": t,
                             "closing": audio.registry.closing + video.registry.closing,
                             "lost_threads": audio.pool.lost + video.pool.lost,
                             "time": time.monotonic()})
                print(rows[-1], flush=True)
    finally:
        sa.stop()
        sv.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=2000)
    ap.add_argument("--report-every", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/soak_churn.md")
    a = ap.parse_args()
    t0 = time.monotonic()
    rows = asyncio.run(run(a.cycles, a.report_every))
    base, last = rows[0], rows[-1]
    info = machine_info()
    lines = [f"# Churn soak: {last['cycles']} connect/disconnect cycles (`python -m benchmarks.soak_churn --cycles {a.cycles}`)", "",
             f"Machine: {info['cpu_model']}, {info['usable_cpus']} usable CPUs; torch {info['torch']}; code "
             f"{code_version()}; {time.monotonic() - t0:.0f} s.", "",
             "| cycles | RSS MiB | threads | VAD slots in use | live sessions | closing | lost handler threads | loop tasks |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['cycles']} | {r['rss_mib']:.0f} | {r['threads']} | {r['vad_slots']} | {r['sessions']} | "
                     f"{r['closing']} | {r['lost_threads']} | {r['loop_tasks']} |")
    lines += ["", f"From the first report to the last: RSS {last['rss_mib'] - base['rss_mib']:+.0f} MiB, threads "
              f"{last['threads'] - base['threads']:+d}, VAD slots {last['vad_slots'] - base['vad_slots']:+d}, loop tasks "
              f"{last['loop_tasks'] - base['loop_tasks']:+d}, live sessions {last['sessions']}, still closing "
              f"{last['closing']}, lost handler threads {last['lost_threads']}."]
    text = "\n".join(lines)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
