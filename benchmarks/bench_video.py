"""Video load benchmark: N concurrent WebRTC face-detection sessions, batched vs per-frame.

Setup (every (mode, N) step on a fresh server process):

* Server: ``python -m uvicorn benchmarks.video_apps:<mode>_stream --port P --log-level
  warning`` with ``BATCHRTC_ICE_HOSTS=127.0.0.1`` (loopback ICE), ``BENCH_MAX_BATCH``,
  ``BENCH_MAX_DELAY_MS``, ``BENCH_DEADLINE_MS``, ``BENCH_CONCURRENCY``. Modes: ``batched``
  (one ``@batched`` detect+draw call per batch of sessions' frames), ``perframe`` (FastRTC-style
  ``fn(frame_bgr)``: one detector call per frame on the handler thread pool) and, on request,
  ``echo`` (no model: the WebRTC transport + pipeline floor).
* Load: N aiortc sessions spread over K load-generator processes (``--client-procs``), each
  its own asyncio loop, all ``RTCConfiguration(iceServers=[])`` (no STUN), all on loopback.
  Each session sends ``--width`` x ``--height`` frames at ``--fps`` like a camera (a frame is
  due every 1/fps s; a source that falls behind skips frames, which shows as "sent fps" below
  ``--fps``). Content: the astronaut's face (``tests/fixtures/astronaut.png``) on a grey
  canvas, moving slowly (so the detector has a real face in every frame), plus the frame index
  as a 16-block black/white barcode in the bottom-left row (12 bits of index + a 4-bit check).
  Frames are built directly in I420, so the clients pay no RGB->YUV conversion.
* Every returned frame's barcode is decoded (block means of the Y plane, threshold 128, check
  bits verified), so it is matched to its send time despite lossy VP8: end-to-end latency =
  arrival - send time of that index (one CLOCK_MONOTONIC for all processes). A returned
  frame "has a box" when enough pure-green chroma pixels (U, V < 100: ``draw_boxes`` colour
  (0, 255, 0)) lie around the face's known position in that frame.
* Warm-up (``--warmup`` s, not measured) starts when every client process has its sessions
  connected; then ``--duration`` s are measured. Per session: frames returned/s (by arrival
  time), dropped % (indices sent in the window that never came back), latencies of the frames
  sent in the window. Server CPU (all threads and the event-loop thread alone), the load
  generators' CPU and whole-machine CPU come from psutil; GPU utilisation and memory from NVML
  every 0.5 s when available. Server-side counters (batch sizes, batch run time, frames
  received/processed/dropped by the server) come from the app's ``GET /_bench/stats``.

Target (printed met / not met, never adjusted): on one H100/H200, >= 64 concurrent 640x480 @
30 fps detection sessions at >= 25 fps each (min over sessions) with p95 latency <= 100 ms.

Note: aiortc's video jitter buffer hands a frame to the decoder only when the first packet of
the NEXT frame arrives, so each WebRTC hop (client->server, server->client) adds about one
frame interval of the sender's stream to the latency (~33 ms per hop at 30 fps). ``--modes
echo`` measures that floor.

Usage::

    python -m benchmarks.bench_video --quick               # ~1 min on 2 CPU cores
    python -m benchmarks.bench_video                       # N = 1,4,16,32,64, 640x480@30, 15 s
    python -m benchmarks.bench_video --sessions 64 --modes batched --client-procs 6 \\
        --server-cpus 0-9 --client-cpus 10-15

Writes ``benchmarks/results/bench_video_<device>[_quick].md`` and ``.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import fractions
import functools
import json
import math
import multiprocessing as mp
import os
import shlex
import shutil
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness
from benchmarks.harness import child_main
from benchmarks.server_process import UvicornProcess, wait_for_workers

# Light imports only at module level: client worker processes import this module (no torch).

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
ASTRONAUT = REPO_ROOT / "tests" / "fixtures" / "astronaut.png"
FACE_BOX = (180.0, 60.0, 268.0, 172.0)  # the face in astronaut.png (x1, y1, x2, y2), by the detector
PATCH_BOX = (140, 20, 310, 215)  # the crop pasted onto the canvas (contains FACE_BOX)
APPS = {
    "batched": "benchmarks.video_apps:batched_stream",
    "batched-proc": "benchmarks.video_apps:batched_stream",
    "batched-workers": "benchmarks.video_apps:batched_stream",
    # mode="send": camera in, detections out on the data channel, no video back (no encode);
    # each detection carries its frame's index, so fps and latency are read from those
    "batched-send": "benchmarks.video_apps:batched_send_stream",
    "batched-send-workers": "benchmarks.video_apps:batched_send_stream",
    "perframe": "benchmarks.video_apps:perframe_stream",
    "echo": "benchmarks.video_apps:echo_stream",
}
DEFAULT_MODES = "batched,perframe"
DEFAULT_SESSIONS = "1,4,16,32,64"
QUICK = {"sessions": "1,2", "width": 320, "height": 240, "fps": 10, "duration": 4.0, "warmup": 2.0}
TARGET = {"sessions": 64, "width": 640, "height": 480, "send_fps": 30, "fps": 25.0, "p95_ms": 100.0}
STATS_PATH = "/_bench/stats"
BITS = 16  # barcode blocks: 12 index bits + 4 check bits
INDEX_BITS = 12
INDEX_MOD = 1 << INDEX_BITS


# ============================================================================== the scene
def _check4(v: int) -> int:
    """4 check bits of a 12-bit value (nibble sum, xor-ed with a rotation: catches one flipped
    block and most multi-block errors)."""
    a, b, c = v & 15, (v >> 4) & 15, (v >> 8) & 15
    return ((a + b + c) ^ ((a << 1 | a >> 3) & 15) ^ 0b1010) & 15


class Scene:
    """Frame content and how to read it back: a moving face + an index barcode, in I420."""

    def __init__(self, width: int, height: int, fps: float, period_s: float = 6.0, positions: int = 48) -> None:
        if width % 2 or height % 2 or width < 64 or height < 48:
            raise ValueError(f"frame size must be even and at least 64x48, got {width}x{height}")
        from PIL import Image

        self.w, self.h, self.fps = width, height, float(fps)
        self.bs = max(4, min(16, width // 20)) // 2 * 2  # barcode block side (even)
        img = Image.open(ASTRONAUT).convert("RGB")
        px1, py1, px2, py2 = PATCH_BOX
        # patch height = half the frame, limited so it fits beside the barcode row with margins
        avail_h = height - 3 * self.bs
        ph = min(int(0.5 * height), avail_h - 4)
        scale = ph / (py2 - py1)
        pw = int(round((px2 - px1) * scale))
        if pw > width - 8:
            scale = (width - 8) / (px2 - px1)
            pw, ph = width - 8, int(round((py2 - py1) * scale))
        self.pw, self.ph = pw // 2 * 2, ph // 2 * 2
        patch = np.asarray(img.crop(PATCH_BOX).resize((self.pw, self.ph), Image.BILINEAR))
        fx1, fy1, fx2, fy2 = FACE_BOX
        self.face = ((fx1 - px1) * self.pw / (px2 - px1), (fy1 - py1) * self.ph / (py2 - py1),
                     (fx2 - px1) * self.pw / (px2 - px1), (fy2 - py1) * self.ph / (py2 - py1))
        self.background = np.full((height, width, 3), 112, np.uint8)
        self._patch_rgb = patch
        # movement: x sweeps the width (triangle wave), y bobs a little; quantised positions
        self.period_frames = max(2, int(round(period_s * self.fps)))
        self.positions = min(positions, self.period_frames)
        x_max = width - self.pw - 4
        y_max = height - 3 * self.bs - self.ph - 2
        self._xy: list[tuple[int, int]] = []
        for k in range(self.positions):
            u = k / self.positions
            tri = 1 - abs(2 * u - 1)  # 0 -> 1 -> 0
            x = 2 + tri * (x_max - 2)
            y = 2 + (0.5 + 0.5 * math.sin(2 * math.pi * u)) * max(0, y_max - 2)
            self._xy.append((int(x) // 2 * 2, int(y) // 2 * 2))
        self._cache: dict[int, np.ndarray] = {}
        self.box_min_px = max(3, int(0.15 * ((self.face[2] - self.face[0]) + (self.face[3] - self.face[1]))))

    # -- sending -----------------------------------------------------------------------------
    def pos_index(self, i: int) -> int:
        return (i % self.period_frames) * self.positions // self.period_frames

    def xy(self, i: int) -> tuple[int, int]:
        return self._xy[self.pos_index(i)]

    def _base(self, k: int) -> np.ndarray:
        """I420 frame (H*3/2, W) with the face at position k (cached: built once per position)."""
        arr = self._cache.get(k)
        if arr is None:
            import av

            rgb = self.background.copy()
            x, y = self._xy[k]
            rgb[y : y + self.ph, x : x + self.pw] = self._patch_rgb
            arr = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()
            self._cache[k] = arr
        return arr

    def code(self, i: int) -> int:
        v = i % INDEX_MOD
        return (v << 4) | _check4(v)

    def make_i420(self, i: int) -> np.ndarray:
        arr = self._base(self.pos_index(i)).copy()
        bs, h = self.bs, self.h
        code = self.code(i)
        y0 = h - bs
        for b in range(BITS):
            bit = (code >> (BITS - 1 - b)) & 1
            arr[y0:h, b * bs : (b + 1) * bs] = 235 if bit else 16
        return arr  # chroma under the barcode is the grey background's (neutral)

    # -- reading back ------------------------------------------------------------------------
    def read_index(self, y: np.ndarray) -> int:
        """12-bit index from a Y plane (H, W), or -1 when the check bits do not match."""
        bs, h = self.bs, self.h
        m = max(1, bs // 4)
        band = y[h - bs + m : h - m, : BITS * bs].astype(np.float32)
        means = band.reshape(band.shape[0], BITS, bs)[:, :, m : bs - m].mean(axis=(0, 2))
        code = 0
        for v in means:
            code = (code << 1) | int(v > 128)
        idx = code >> 4
        return idx if (code & 15) == _check4(idx) else -1

    def has_box(self, u: np.ndarray, v: np.ndarray, i: int) -> bool:
        """Whether a green (0,255,0) outline lies around the face of frame i (chroma planes)."""
        x, y = self.xy(i)
        fx1, fy1, fx2, fy2 = self.face
        mx, my = 0.35 * (fx2 - fx1), 0.35 * (fy2 - fy1)
        cx1 = max(0, int((x + fx1 - mx) / 2))
        cy1 = max(0, int((y + fy1 - my) / 2))
        cx2 = min(self.w // 2, int((x + fx2 + mx) / 2) + 1)
        cy2 = min(self.h // 2, int((y + fy2 + my) / 2) + 1)
        uu, vv = u[cy1:cy2, cx1:cx2], v[cy1:cy2, cx1:cx2]
        return int(np.count_nonzero((uu < 100) & (vv < 100))) >= self.box_min_px

    @staticmethod
    def planes(frame: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Y, U, V of a decoded av.VideoFrame (no colour conversion when it is already I420)."""
        if frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        w, h = frame.width, frame.height
        flat = frame.to_ndarray().reshape(-1)
        n, q = w * h, (w // 2) * (h // 2)
        return (flat[:n].reshape(h, w), flat[n : n + q].reshape(h // 2, w // 2),
                flat[n + q : n + 2 * q].reshape(h // 2, w // 2))


# ======================================================================== client worker
def _pin_ice_hosts() -> None:
    """As ``server.webrtc._pin_ice_hosts`` (not imported: it would pull in torch): ICE host
    candidates only on ``BATCHRTC_ICE_HOSTS`` (127.0.0.1 here)."""
    hosts = os.environ.get("BATCHRTC_ICE_HOSTS")
    if hosts:
        import aioice.ice

        addrs = [h.strip() for h in hosts.split(",") if h.strip()]
        aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(addrs)


def _patch_marker_jitter() -> None:
    """Load generator only (``--client-jitter marker``): complete a received video frame when
    its RTP marker packet (the frame's last) arrives, as libwebrtc/browsers do, instead of
    aiortc's default of waiting for the first packet of the next frame (one frame interval
    later). Never applied to the server."""
    import aiortc.rtcrtpreceiver as rr
    from aiortc.jitterbuffer import JitterBuffer, JitterFrame

    if getattr(rr.JitterBuffer, "_bench_marker", False):
        return

    class MarkerJitterBuffer(JitterBuffer):
        _bench_marker = True

        def add(self, packet: Any) -> tuple[bool, Any]:
            pli, frame = super().add(packet)
            if frame is not None or not self._is_video or self._origin is None:
                return pli, frame
            parts, ts = [], None
            for count in range(self._capacity):
                p = self._packets[(self._origin + count) % self._capacity]
                if p is None or (ts is not None and p.timestamp != ts):
                    return pli, None
                ts = p.timestamp
                parts.append(p)
                if p.marker:
                    self.remove(count + 1)
                    return pli, JitterFrame(data=b"".join(x._data for x in parts), timestamp=ts)
            return pli, None

    rr.JitterBuffer = MarkerJitterBuffer


@dataclass
class WorkerJob:
    base_url: str
    ids: list[str]
    phases: list[int]
    width: int
    height: int
    fps: float
    max_frames: int           # per session: the source ends after this many (bounds the run)
    connect_timeout_s: float
    first_frame_timeout_s: float
    go_timeout_s: float
    tail_s: float
    connect_concurrency: int = 4
    cpus: list[int] | None = None
    jitter: str = "aiortc"  # or "marker": see _patch_marker_jitter


def _worker_main(conn: Any, job: WorkerJob) -> None:
    """Entry of a load-generator process: connect, report ready, wait for the window, report."""
    os.environ.setdefault("BATCHRTC_ICE_HOSTS", "127.0.0.1")
    if job.cpus:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, job.cpus)
    _pin_ice_hosts()
    if job.jitter == "marker":
        _patch_marker_jitter()
    child_main(conn, functools.partial(_worker_async, job=job))


def _make_source_class() -> type:
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class BenchSource(MediaStreamTrack):
        """Camera-like source: frame k is due at start + k/fps; late frames are skipped."""

        kind = "video"

        def __init__(self, scene: Scene, phase: int, max_frames: int) -> None:
            super().__init__()
            self.scene = scene
            self.phase = phase
            self.sent = np.full(max_frames, np.nan)  # index -> send time (monotonic)
            self.max_frames = max_frames
            self.last = -1
            self._start: float | None = None

        async def recv(self) -> Any:
            import av

            now = time.monotonic()
            if self._start is None:
                self._start = now
            nxt = self.last + 1
            due = self._start + nxt / self.scene.fps
            if due > now:
                await asyncio.sleep(due - now)
            else:  # behind: skip to the frame due now (a camera does not queue)
                nxt = max(nxt, int((now - self._start) * self.scene.fps))
            if nxt >= self.max_frames or self.readyState != "live":
                self.stop()
                raise MediaStreamError
            arr = self.scene.make_i420(nxt + self.phase)
            frame = av.VideoFrame.from_ndarray(arr, format="yuv420p")
            frame.pts = int(round(nxt * 90000 / self.scene.fps))
            frame.time_base = fractions.Fraction(1, 90000)
            self.sent[nxt] = time.monotonic()
            self.last = nxt
            return frame

    return BenchSource


class _Sess:
    def __init__(self, sid: str, src: Any) -> None:
        self.id = sid
        self.src = src
        self.pc: Any = None
        self.arrivals: list[float] = []
        self.index: list[int] = []  # full index (phase removed) or -1 when unreadable
        self.box: list[bool] = []
        self.outputs: list[tuple[float, int]] = []  # (arrival, faces) of fetch_output messages
        self.errors: list[str] = []
        self.first_frame = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.connected = False


async def _collect(track: Any, s: _Sess, scene: Scene) -> None:
    from aiortc.mediastreams import MediaStreamError

    try:
        while True:
            frame = await track.recv()
            t = time.monotonic()
            try:
                y, u, v = Scene.planes(frame)
                code = scene.read_index(y) if (frame.width, frame.height) == (scene.w, scene.h) else -1
            except Exception:  # noqa: BLE001 - an unreadable frame counts as such
                code, u, v = -1, None, None
            full = _full_index(s, code)
            s.arrivals.append(t)
            s.index.append(full)
            s.box.append(bool(full >= 0 and u is not None and scene.has_box(u, v, full + s.src.phase)))
            s.first_frame.set()
    except MediaStreamError:
        return


def _full_index(s: _Sess, code: int) -> int:
    """The most recent sent frame whose (index + phase) mod 2^12 is `code` (-1: unreadable)."""
    if code < 0:
        return -1
    last = s.src.last
    full = last - ((last + s.src.phase - code) % INDEX_MOD)
    return full if full >= 0 else -1


def _returned(s: _Sess, t: float, code: int, face: bool) -> None:
    """A send-only session's detection for the frame with barcode `code`, counted as that frame
    coming back (its box column: whether a face was found)."""
    full = _full_index(s, code)
    s.arrivals.append(t)
    s.index.append(full)
    s.box.append(bool(full >= 0 and face))
    s.first_frame.set()


async def _connect(base_url: str, s: _Sess, scene: Scene, timeout: float) -> None:
    """FastRTC's offer protocol, as ``tests/webrtc_client.connect`` but reading frames without
    an RGB conversion and keeping only what the benchmark needs."""
    import httpx
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    s.pc = pc
    channel = pc.createDataChannel("text")

    @channel.on("message")
    def on_message(msg: Any) -> None:
        if not isinstance(msg, str):
            return
        try:
            m = json.loads(msg)
        except ValueError:
            return
        typ = m.get("type")
        if typ == "fetch_output":
            t = time.monotonic()
            data = m.get("data") or [{}]
            faces = data[0].get("faces", -1) if isinstance(data[0], dict) else -1
            s.outputs.append((t, int(faces)))
            if isinstance(data[0], dict) and "index" in data[0]:  # a send-only session's result
                _returned(s, t, int(data[0]["index"]), faces > 0)
        elif typ in ("error", "warning"):
            s.errors.append(f"{typ}: {str(m.get('message'))[:200]}")

    @pc.on("track")
    def on_track(track: Any) -> None:
        if track.kind == "video":
            s.tasks.append(asyncio.ensure_future(_collect(track, s, scene)))

    pc.addTrack(s.src)
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(timeout=timeout) as http:
        r = await http.post(f"{base_url}/webrtc/offer",
                            json={"sdp": pc.localDescription.sdp, "type": "offer", "webrtc_id": s.id})
    body = r.json()
    if r.status_code != 200 or body.get("type") != "answer":
        raise RuntimeError(f"offer refused ({r.status_code}): {str(body)[:200]}")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="answer"))
    s.connected = True


async def _worker_async(conn: Any, job: WorkerJob) -> None:
    loop = asyncio.get_running_loop()
    scene = Scene(job.width, job.height, job.fps)
    for k in range(scene.positions):  # build the cached frames before streaming
        scene._base(k)
    Source = _make_source_class()
    sessions = [_Sess(sid, Source(scene, ph, job.max_frames)) for sid, ph in zip(job.ids, job.phases)]
    sem = asyncio.Semaphore(job.connect_concurrency)

    async def open_one(s: _Sess) -> None:
        async with sem:
            try:
                await asyncio.wait_for(_connect(job.base_url, s, scene, job.connect_timeout_s), job.connect_timeout_s)
            except Exception as e:  # noqa: BLE001 - recorded as this session's error
                s.errors.append(f"connect: {type(e).__name__}: {e}")

    t_conn = time.monotonic()
    await asyncio.gather(*(open_one(s) for s in sessions))
    # media flowing both ways before the warm-up starts
    waiting = [s.first_frame.wait() for s in sessions if s.connected]
    if waiting:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waiting), job.first_frame_timeout_s)
    conn.send(("ready", {
        "connected": sum(s.connected for s in sessions),
        "flowing": sum(s.first_frame.is_set() for s in sessions),
        "connect_s": time.monotonic() - t_conn,
        "errors": [e for s in sessions for e in s.errors][:5],
    }))
    if not await loop.run_in_executor(None, conn.poll, job.go_timeout_s):
        raise RuntimeError(f"no go signal from the parent in {job.go_timeout_s} s")
    kind, t_ws, t_we = conn.recv()
    if kind != "go":
        raise RuntimeError(f"unexpected control message {kind!r}")
    cpu0 = time.process_time()
    await asyncio.sleep(max(0.0, t_we + job.tail_s - time.monotonic()))
    cpu1 = time.process_time()
    results = [_session_result(s, t_ws, t_we) for s in sessions]

    async def close(s: _Sess) -> None:
        for t in s.tasks:
            t.cancel()
        if s.pc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.pc.close(), 5)

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(close(s) for s in sessions), return_exceptions=True), 20)
    conn.send(("done", {"sessions": results, "process_cpu_s": cpu1 - cpu0}))


def _session_result(s: _Sess, t_ws: float, t_we: float) -> dict[str, Any]:
    dur = t_we - t_ws
    sent_t = s.src.sent
    in_win = np.flatnonzero((sent_t >= t_ws) & (sent_t < t_we))
    arr = np.asarray(s.arrivals, dtype=np.float64)
    idx = np.asarray(s.index, dtype=np.int64)
    box = np.asarray(s.box, dtype=bool)
    arr_in = (arr >= t_ws) & (arr < t_we)
    ok = idx >= 0
    safe = np.where(ok, idx, 0)
    st = np.where(ok, sent_t[np.clip(safe, 0, len(sent_t) - 1)], np.nan)
    sent_in = ok & (st >= t_ws) & (st < t_we)  # returned frames that were sent in the window
    lat_ms = ((arr - st) * 1e3)[sent_in]
    matched = np.unique(idx[sent_in]).size
    outs = [f for t, f in s.outputs if t_ws <= t < t_we]
    return {
        "id": s.id,
        "connected": s.connected,
        "sent": int(in_win.size),
        "sent_fps": in_win.size / dur,
        "returned": int(arr_in.sum()),
        "returned_fps": float(arr_in.sum()) / dur,
        "unreadable": int((arr_in & ~ok).sum()),
        "matched": int(matched),
        "dropped_pct": 100.0 * (1 - matched / in_win.size) if in_win.size else None,
        "latency_ms": [round(float(x), 2) for x in lat_ms],
        "box_frames": int((box & arr_in & ok).sum()),
        "readable_frames": int((arr_in & ok).sum()),
        "outputs": len(outs),
        "faces_mean": float(np.mean([f for f in outs if f >= 0])) if any(f >= 0 for f in outs) else None,
        "errors": s.errors[:5],
    }


# ============================================================================ server side
def parse_cpus(text: str | None) -> list[int] | None:
    """'0-9,12' -> [0, ..., 9, 12]; None/'' -> None."""
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return sorted(set(out))


class ServerProcess(UvicornProcess):
    """``python -m uvicorn benchmarks.video_apps:<mode>_stream`` in its own session; killed on exit."""

    def __init__(self, mode: str, *, max_batch: int, max_delay_ms: float, deadline_ms: float,
                 concurrency: int, warmup_hw: tuple[int, int] | None, device: str | None,
                 cpus: list[int] | None, extra_env: dict[str, str], outputs: bool = True,
                 start_timeout_s: float = 180.0, workers: int = 2) -> None:
        if mode not in APPS:
            raise ValueError(f"mode must be one of {sorted(APPS)}, got {mode!r}")
        self.mode = mode
        self.cpus = cpus
        prefix = ["taskset", "-c", ",".join(map(str, cpus))] if cpus and shutil.which("taskset") else []
        env = {
            "BATCHRTC_ICE_HOSTS": "127.0.0.1",
            "BENCH_MAX_BATCH": str(max_batch),
            "BENCH_MAX_DELAY_MS": str(max_delay_ms),
            "BENCH_DEADLINE_MS": str(deadline_ms),
            "BENCH_CONCURRENCY": str(concurrency),
            "BENCH_LOAD_DETECTOR": "0" if mode == "echo" else "1",
            "BENCH_OUTPUTS": "1" if outputs else "0",
            # batched: the handler's batcher thread inside the server process; batched-proc: the
            # handler in its own child process (server.video's process=True).
            "BATCHRTC_VIDEO_PROCESS": "1" if mode == "batched-proc" else "0",
        }
        if warmup_hw:
            env["BENCH_WARMUP_HW"] = f"{warmup_hw[0]}x{warmup_hw[1]}"
        if device:
            env["BATCHRTC_DEVICE"] = device
        env.update(extra_env)
        # batched-workers: `uvicorn --workers N`, every worker feeding one engine process (server/engine/)
        self.workers = workers if mode.endswith("-workers") else 1
        workers = ["--workers", str(self.workers)] if self.workers > 1 else []
        super().__init__([APPS[mode], "--host", "127.0.0.1", "--log-level", "warning", *workers], env,
                         name=f"bench_video_server_{mode}", prefix=prefix, start_timeout_s=start_timeout_s)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> str:
        return self.command_line(("BATCHRTC_ICE_HOSTS", "BATCHRTC_DEVICE", "BATCHRTC_VIDEO_PROCESS",
                                  "BENCH_MAX_BATCH", "BENCH_MAX_DELAY_MS",
                                  "BENCH_DEADLINE_MS", "BENCH_CONCURRENCY", "BENCH_OUTPUTS"))

    def _spawned(self) -> None:
        if self.cpus and self.argv[0] != "taskset":
            with contextlib.suppress(Exception):
                import psutil

                psutil.Process(self.pid).cpu_affinity(self.cpus)

    def start(self) -> ServerProcess:
        super().start()
        if self.workers > 1:  # the port is bound before the workers have loaded the app
            wait_for_workers(self.base_url, self.workers, self.start_timeout_s)
        if self.stats(timeout=10) is None:
            raise RuntimeError(f"server accepts connections but {STATS_PATH} does not answer:\n{self.log_tail()}")
        return self

    def stats(self, timeout: float = 5.0) -> dict | None:
        try:
            with urllib.request.urlopen(f"{self.base_url}{STATS_PATH}", timeout=timeout) as r:
                return json.loads(r.read())
        except Exception:  # noqa: BLE001 - reported as missing, never fatal
            return None


class _NVML:
    """GPU utilisation / memory through pynvml (nvidia-ml-py); absent -> everything None."""

    def __init__(self) -> None:
        self.nv: Any = None
        self.handles: list[Any] = []
        self.name: str | None = None
        try:
            import pynvml as nv

            nv.nvmlInit()
            self.nv = nv
            self.handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
            if self.handles:
                n = nv.nvmlDeviceGetName(self.handles[self.default_index()])
                self.name = n.decode() if isinstance(n, bytes) else str(n)
        except Exception:  # noqa: BLE001 - no driver / no GPU: GPU columns are "-"
            self.nv = None
            self.handles = []

    @property
    def ok(self) -> bool:
        return self.nv is not None and bool(self.handles)

    def default_index(self) -> int:
        """The device the server's ``cuda``/``cuda:0`` is, when it cannot be found by pid:
        the first CUDA_VISIBLE_DEVICES entry if numeric (a UUID one is matched), else 0."""
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        if first.isdigit() and int(first) < len(self.handles):
            return int(first)
        if first:
            for i, h in enumerate(self.handles):
                with contextlib.suppress(Exception):
                    uuid = self.nv.nvmlDeviceGetUUID(h)
                    uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                    if uuid.startswith(first) or first.startswith(uuid):
                        return i
        return 0

    def sample(self, pid: int) -> tuple[float, float, float | None] | None:
        """(util %, device memory used MiB, server pid's memory MiB) of the GPU the server uses
        (the first one it has memory on; else device 0)."""
        if not self.ok:
            return None
        nv = self.nv
        pick, pid_mem = self.handles[self.default_index()], None
        for h in self.handles:
            try:
                procs = nv.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:  # noqa: BLE001
                procs = []
            for p in procs:
                if p.pid == pid:
                    pick = h
                    used = getattr(p, "usedGpuMemory", None)
                    pid_mem = used / 2**20 if isinstance(used, int) else None
                    break
            if pid_mem is not None:
                break
        try:
            util = float(nv.nvmlDeviceGetUtilizationRates(pick).gpu)
            mem = nv.nvmlDeviceGetMemoryInfo(pick).used / 2**20
        except Exception:  # noqa: BLE001
            return None
        return util, mem, pid_mem


class Sampler(threading.Thread):
    """Every ``period_s``: CPU times of the server (all threads; its main = event-loop thread),
    of each client process (and its main thread), whole-machine busy time; GPU via NVML."""

    def __init__(self, server_pid: int, client_pids: list[int], nvml: _NVML, period_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="bench-video-sampler")
        import psutil

        self.ps = psutil
        self.server_pid = server_pid
        self.server = psutil.Process(server_pid)
        self.clients = []
        for pid in client_pids:
            with contextlib.suppress(psutil.Error):
                self.clients.append(psutil.Process(pid))
        self.nvml = nvml
        self.period_s = period_s
        self.rows: list[dict[str, Any]] = []
        self._halt = threading.Event()
        self._last: dict[str, float] = {}

    @staticmethod
    def _main_thread_cpu(p: Any) -> float | None:
        try:
            for t in p.threads():
                if t.id == p.pid:
                    return t.user_time + t.system_time
        except Exception:  # noqa: BLE001
            return None
        return None

    def _cpu(self, key: str, p: Any, children: bool = False) -> tuple[float, float]:
        try:
            ct = p.cpu_times()
            tot = ct.user + ct.system
            if children:  # children (the handler's process, workers, the engine) count as the server
                for c in p.children(recursive=True):
                    with contextlib.suppress(self.ps.Error):
                        cc = c.cpu_times()
                        self._last[f"{key}:child:{c.pid}"] = cc.user + cc.system
                # a child that exited keeps the CPU it used (its last reading), so the sum never drops
                tot += sum(v for k, v in self._last.items() if k.startswith(f"{key}:child:"))
            main = self._main_thread_cpu(p)
        except self.ps.Error:
            tot, main = None, None
        if tot is not None:
            self._last[key] = tot
        if main is not None:
            self._last[key + ":main"] = main
        return self._last.get(key, 0.0), self._last.get(key + ":main", 0.0)

    def _sample(self) -> None:
        t = time.monotonic()
        srv, srv_main = self._cpu("server", self.server, children=True)
        cl = [self._cpu(f"c{c.pid}", c) for c in self.clients]
        st = self.ps.cpu_times()
        busy = st.user + st.system + getattr(st, "irq", 0.0) + getattr(st, "softirq", 0.0) + getattr(st, "nice", 0.0)
        g = self.nvml.sample(self.server_pid)
        self.rows.append({"t": t, "server": srv, "server_main": srv_main,
                          "clients": [c[0] for c in cl], "clients_main": [c[1] for c in cl],
                          "busy": busy, "gpu": g})

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(Exception):
                self._sample()
            self._halt.wait(self.period_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def window(self, t_a: float, t_b: float) -> dict[str, Any]:
        rows = [r for r in self.rows if t_a - self.period_s / 2 <= r["t"] <= t_b + self.period_s / 2]
        out: dict[str, Any] = {"server_cpu_pct": None, "server_loop_pct": None, "clients_cpu_pct": None,
                               "client_loop_max_pct": None, "client_cpu_max_pct": None,
                               "machine_cpu_pct": None, "gpu_util_pct": None, "gpu_mem_mib": None,
                               "gpu_server_mem_mib": None}
        if len(rows) >= 2:
            a, b = rows[0], rows[-1]
            dt = b["t"] - a["t"]
            if dt > 0:
                pct = lambda x, y: 100.0 * (y - x) / dt  # noqa: E731
                out["server_cpu_pct"] = pct(a["server"], b["server"])
                out["server_loop_pct"] = pct(a["server_main"], b["server_main"])
                per = [pct(x, y) for x, y in zip(a["clients"], b["clients"])]
                per_main = [pct(x, y) for x, y in zip(a["clients_main"], b["clients_main"])]
                out["clients_cpu_pct"] = sum(per) if per else None
                out["client_cpu_max_pct"] = max(per) if per else None
                out["client_loop_max_pct"] = max(per_main) if per_main else None
                out["machine_cpu_pct"] = pct(a["busy"], b["busy"])
        g = [r["gpu"] for r in rows if r["gpu"] is not None]
        if g:
            out["gpu_util_pct"] = float(np.mean([x[0] for x in g]))
            out["gpu_mem_mib"] = float(max(x[1] for x in g))
            pm = [x[2] for x in g if x[2] is not None]
            out["gpu_server_mem_mib"] = float(max(pm)) if pm else None
        return out


# ============================================================================== one step
@dataclass
class StepOptions:
    width: int = 640
    height: int = 480
    fps: float = 30.0
    duration: float = 15.0
    warmup: float = 5.0
    client_procs: int = 1
    max_batch: int = 64
    max_delay_ms: float = 8.0
    deadline_ms: float = 100.0
    concurrency: int = 512
    device: str | None = None
    server_cpus: list[int] | None = None
    client_cpus: list[int] | None = None
    server_env: dict[str, str] = field(default_factory=dict)
    connect_timeout_s: float = 30.0
    tail_s: float = 1.0
    keep_server_log: bool = False
    client_jitter: str = "aiortc"
    outputs: bool = True
    workers: int = 2  # uvicorn --workers for the batched-workers mode


@dataclass
class StepResult:
    mode: str
    n: int
    width: int
    height: int
    fps: float
    duration: float
    server_command: str = ""
    device: str = "-"
    gpu_name: str | None = None
    torch: str = "-"
    connected: int = 0
    flowing: int = 0
    connect_s: float | None = None
    sent_fps_mean: float | None = None
    fps_mean: float | None = None
    fps_min: float | None = None
    lat_p50: float | None = None
    lat_p95: float | None = None
    lat_p99: float | None = None
    lat_n: int = 0
    dropped_pct_mean: float | None = None
    unreadable: int = 0
    box_pct: float | None = None
    faces_per_output: float | None = None
    outputs_per_s: float | None = None
    server_cpu_pct: float | None = None
    server_loop_pct: float | None = None
    clients_cpu_pct: float | None = None
    client_cpu_max_pct: float | None = None
    client_loop_max_pct: float | None = None
    machine_cpu_pct: float | None = None
    other_cpu_pct: float | None = None  # machine - server - clients: this parent, other users' jobs
    gpu_util_pct: float | None = None
    gpu_mem_mib: float | None = None
    gpu_server_mem_mib: float | None = None
    cuda_max_allocated_mib: float | None = None
    server_video: dict[str, int] | None = None  # received/processed/dropped in the window
    batcher: dict[str, Any] | None = None       # window: batches, mean size, run/wait ms
    client_procs: int = 1
    errors: list[str] = field(default_factory=list)
    server_log_warnings: int = 0
    wall_s: float = 0.0
    sessions: list[dict[str, Any]] = field(default_factory=list)


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _batcher_window(b0: dict | None, b1: dict | None) -> dict[str, Any] | None:
    if not b1:
        return None
    h0 = {int(k): v for k, v in ((b0 or {}).get("batch_size_hist") or {}).items()}
    h1 = {int(k): v for k, v in (b1.get("batch_size_hist") or {}).items()}
    dh = {k: h1.get(k, 0) - h0.get(k, 0) for k in h1}
    dh = {k: v for k, v in dh.items() if v > 0}
    batches = sum(dh.values())
    items = sum(k * v for k, v in dh.items())
    r0 = (b0 or {}).get("flush_reasons") or {}
    reasons = {k: v - r0.get(k, 0) for k, v in (b1.get("flush_reasons") or {}).items() if v - r0.get(k, 0) > 0}
    return {
        "batches": batches,
        "mean_batch": items / batches if batches else None,
        "max_batch": max(dh) if dh else None,
        "flush_reasons": reasons,
        "dropped_late": b1.get("dropped_late", 0) - (b0 or {}).get("dropped_late", 0),
        "run_ms": b1.get("run_ms"),          # recent-window percentiles (last 2048 batches)
        "queue_wait_ms": b1.get("queue_wait_ms"),
    }


def _spawn_workers(ctx: Any, jobs: list[WorkerJob]) -> list[tuple[Any, Any]]:
    out = []
    for job in jobs:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker_main, args=(child, job), daemon=True)
        p.start()
        child.close()
        out.append((p, parent))
    return out


def _recv(conn: Any, kind: str, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"no {kind!r} from a client process in {timeout:.0f} s")
    try:
        msg = conn.recv()
    except EOFError:
        raise RuntimeError(f"a client process exited before sending {kind!r}") from None
    if msg[0] == "error":
        raise RuntimeError(f"client process failed:\n{msg[1]}")
    if msg[0] != kind:
        raise RuntimeError(f"expected {kind!r} from a client process, got {msg[0]!r}")
    return msg[1]


def run_step(mode: str, n: int, opts: StepOptions, nvml: _NVML | None = None, log: Any = print) -> StepResult:
    """One (mode, N) measurement on a fresh server. Every wait is bounded; the server and the
    client processes are ended in ``finally`` whatever happens."""
    nvml = nvml or _NVML()
    res = StepResult(mode, n, opts.width, opts.height, opts.fps, opts.duration)
    t_step = time.monotonic()
    server = ServerProcess(mode, max_batch=opts.max_batch, max_delay_ms=opts.max_delay_ms,
                           deadline_ms=opts.deadline_ms, concurrency=max(opts.concurrency, n + 1),
                           warmup_hw=(opts.height, opts.width), device=opts.device,
                           cpus=opts.server_cpus, extra_env=opts.server_env, outputs=opts.outputs,
                           workers=opts.workers)
    res.server_command = server.command
    workers: list[tuple[Any, Any]] = []
    sampler: Sampler | None = None
    k = max(1, min(opts.client_procs, n))
    res.client_procs = k
    try:
        server.start()
        info = server.stats() or {}
        res.device = info.get("device", "-")
        res.gpu_name = info.get("gpu_name")
        res.torch = f"{info.get('torch', '-')} ({info.get('torch_threads', '-')} threads)"
        total_s = opts.warmup + opts.duration + opts.tail_s
        per_worker = math.ceil(n / k)
        connect_budget = opts.connect_timeout_s + 2.0 * per_worker
        first_frame_s = 30.0
        # frames a source may send in all: connect + first frames + go + window (+ margin)
        max_frames = int(opts.fps * (connect_budget + first_frame_s + total_s + 30)) + 16
        ctx = mp.get_context("spawn")
        jobs = []
        ids = [f"{mode}-{n}-{i}" for i in range(n)]
        for w in range(k):
            mine = list(range(w, n, k))
            jobs.append(WorkerJob(
                base_url=server.base_url, ids=[ids[i] for i in mine],
                phases=[(i * 37) % 4096 for i in mine], width=opts.width, height=opts.height, fps=opts.fps,
                max_frames=max_frames, connect_timeout_s=opts.connect_timeout_s,
                first_frame_timeout_s=first_frame_s, go_timeout_s=connect_budget + first_frame_s + 120,
                tail_s=opts.tail_s, cpus=opts.client_cpus, jitter=opts.client_jitter))
        workers = _spawn_workers(ctx, jobs)
        ready = [_recv(c, "ready", connect_budget + first_frame_s + 60) for _, c in workers]
        res.connected = sum(r["connected"] for r in ready)
        res.flowing = sum(r["flowing"] for r in ready)
        res.connect_s = max(r["connect_s"] for r in ready)
        for r in ready:
            res.errors.extend(r["errors"])
        sampler = Sampler(server.pid, [p.pid for p, _ in workers], nvml)
        sampler.start()
        t_ws = time.monotonic() + opts.warmup
        t_we = t_ws + opts.duration
        for _, c in workers:
            c.send(("go", t_ws, t_we))
        time.sleep(max(0.0, t_ws - time.monotonic()))
        s0 = server.stats()
        time.sleep(max(0.0, t_we - time.monotonic()))
        s1 = server.stats()
        done = [_recv(c, "done", opts.tail_s + 90) for _, c in workers]
        sampler.stop()
        res.__dict__.update(sampler.window(t_ws, t_we))
        if None not in (res.machine_cpu_pct, res.server_cpu_pct, res.clients_cpu_pct):
            res.other_cpu_pct = max(0.0, res.machine_cpu_pct - res.server_cpu_pct - res.clients_cpu_pct)
        sessions = [s for d in done for s in d["sessions"]]
        _aggregate(res, sessions, opts)
        if s1:
            res.cuda_max_allocated_mib = s1.get("cuda_max_allocated_mib")
            if s0 and server.workers == 1:  # with workers, /_bench/stats is one worker's view
                res.server_video = {k2: s1["video"][k2] - s0["video"][k2] for k2 in s1["video"]}
            res.batcher = _batcher_window((s0 or {}).get("batcher"), s1.get("batcher"))
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        for p, c in workers:
            p.join(timeout=20)
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
            with contextlib.suppress(Exception):
                c.close()
        server.stop()
        text = server.log_text()
        res.server_log_warnings = sum(1 for ln in text.splitlines()
                                      if "WARNING" in ln or "ERROR" in ln or "Traceback" in ln)
        if res.server_log_warnings:
            res.errors.extend(["server log: " + ln[:200] for ln in text.splitlines()
                               if "WARNING" in ln or "ERROR" in ln][:3])
        if not opts.keep_server_log:
            server.cleanup_log()
        res.wall_s = time.monotonic() - t_step
    return res


def _aggregate(res: StepResult, sessions: list[dict[str, Any]], opts: StepOptions) -> None:
    res.sessions = [{k: v for k, v in s.items() if k != "latency_ms"} for s in sessions]
    fps = [s["returned_fps"] if s["connected"] else 0.0 for s in sessions]
    fps += [0.0] * (res.n - len(sessions))
    res.fps_mean = float(np.mean(fps)) if fps else None
    res.fps_min = float(np.min(fps)) if fps else None
    res.sent_fps_mean = float(np.mean([s["sent_fps"] for s in sessions])) if sessions else None
    lat = [x for s in sessions for x in s["latency_ms"]]
    res.lat_n = len(lat)
    res.lat_p50, res.lat_p95, res.lat_p99 = _pct(lat, 50), _pct(lat, 95), _pct(lat, 99)
    drops = [s["dropped_pct"] for s in sessions if s["dropped_pct"] is not None]
    res.dropped_pct_mean = float(np.mean(drops)) if drops else None
    res.unreadable = sum(s["unreadable"] for s in sessions)
    readable = sum(s["readable_frames"] for s in sessions)
    res.box_pct = 100.0 * sum(s["box_frames"] for s in sessions) / readable if readable else None
    outs = sum(s["outputs"] for s in sessions)
    res.outputs_per_s = outs / opts.duration / max(1, len(sessions)) if outs else None
    faces = [s["faces_mean"] for s in sessions if s["faces_mean"] is not None]
    res.faces_per_output = float(np.mean(faces)) if faces else None
    for s in sessions:
        res.errors.extend(f"{s['id']}: {e}" for e in s["errors"])


# ============================================================================= reporting
def machine_info(nvml: _NVML | None = None) -> dict[str, Any]:
    """The harness's machine description, with the GPU as NVML names it."""
    packages = ("aiortc", "av", "numpy")
    info = harness.machine_info(packages=packages)
    info["versions"] = {pkg: info.pop(pkg) for pkg in packages}  # as the reports print them
    info["gpu"] = nvml.name if nvml is not None and nvml.ok else info.get("gpu")
    return info


def _f(v: float | None, nd: int = 0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:,.{nd}f}"


TABLE_HEAD = ("| mode | N | sent fps/sess | returned fps/sess mean | min | e2e p50 ms | p95 ms | p99 ms "
              "| dropped % | box % | server CPU % | server loop % | clients CPU % | machine CPU % "
              "| GPU util % | GPU mem MiB | mean batch |")


TABLE_SEP = "|---|---:|" + "---:|" * (TABLE_HEAD.count("|") - 3)


def table_row(r: StepResult) -> str:
    b = r.batcher or {}
    gmem = r.gpu_server_mem_mib if r.gpu_server_mem_mib is not None else r.gpu_mem_mib
    cells = [r.mode, str(r.n) + ("" if r.connected == r.n else f" ({r.connected} up)"),
             _f(r.sent_fps_mean, 1), _f(r.fps_mean, 1), _f(r.fps_min, 1), _f(r.lat_p50), _f(r.lat_p95),
             _f(r.lat_p99), _f(r.dropped_pct_mean, 1), _f(r.box_pct, 0), _f(r.server_cpu_pct),
             _f(r.server_loop_pct), _f(r.clients_cpu_pct), _f(r.machine_cpu_pct), _f(r.gpu_util_pct),
             _f(gmem), _f(b.get("mean_batch"), 1)]
    return "| " + " | ".join(cells) + " |"


def bound_verdict(r: StepResult, cores: int, server_cpus: list[int] | None,
                  client_cpus: list[int] | None) -> tuple[str, list[str]]:
    """What limits this step, from its numbers: (one-line verdict, the evidence lines)."""
    srv_budget = 100.0 * (len(server_cpus) if server_cpus else cores)
    cl_budget = 100.0 * (len(client_cpus) if client_cpus else cores)
    ev: list[str] = []
    flags: set[str] = set()
    behind = r.fps_mean is not None and bool(r.sent_fps_mean) and r.fps_mean < 0.9 * r.sent_fps_mean
    if r.sent_fps_mean is not None and r.sent_fps_mean < 0.95 * r.fps:
        flags.add("clients")
        ev.append(f"clients send {r.sent_fps_mean:.1f} fps/session < {r.fps:g} requested (load generators behind)")
    if r.client_loop_max_pct is not None and r.client_loop_max_pct >= 90:
        flags.add("clients")
        ev.append(f"busiest client event-loop thread at {r.client_loop_max_pct:.0f}% of a core")
    if client_cpus and r.clients_cpu_pct is not None and r.clients_cpu_pct >= 0.9 * cl_budget:
        flags.add("clients")
        ev.append(f"clients use {r.clients_cpu_pct:.0f}% of their {cl_budget:.0f}% CPU")
    if r.server_loop_pct is not None and r.server_loop_pct >= 90:
        flags.add("server-loop")
        ev.append(f"server event-loop thread at {r.server_loop_pct:.0f}% of one core (aiortc RTP/SRTP, "
                  "pipeline scheduling all run on it)")
    if r.server_cpu_pct is not None and r.server_cpu_pct >= 0.85 * srv_budget:
        flags.add("server-cpu")
        ev.append(f"server CPU {r.server_cpu_pct:.0f}% of {srv_budget:.0f}% available")
    if r.machine_cpu_pct is not None and r.machine_cpu_pct >= 0.9 * 100 * cores and not (server_cpus or client_cpus):
        flags.add("machine-cpu")
        ev.append(f"whole machine {r.machine_cpu_pct:.0f}% of {100 * cores}% (server and clients share the cores)")
    if r.other_cpu_pct is not None and r.other_cpu_pct >= 25:
        ev.append(f"other processes (not server, not clients) used {r.other_cpu_pct:.0f}% of a core during "
                  "the window: the numbers are contended")
    if r.gpu_util_pct is not None and r.gpu_util_pct >= 80:
        flags.add("gpu")
        ev.append(f"GPU utilisation {r.gpu_util_pct:.0f}%")
    b = r.batcher or {}
    run = (b.get("run_ms") or {}).get("p50")
    if run is not None:
        wait = (b.get("queue_wait_ms") or {}).get("p50") or 0.0
        ev.append(f"batch run time p50 {run:.1f} ms (mean batch {_f(b.get('mean_batch'), 1)}), queue wait p50 "
                  f"{wait:.1f} ms: with one frame in flight per session that alone caps a session at "
                  f"~{1000 / max(run + wait, 1e-3):.0f} fps")
    if r.server_video:
        sv = r.server_video
        ev.append(f"server video counters in the window: received {sv.get('received')}, processed "
                  f"{sv.get('processed')}, dropped {sv.get('dropped')}")
    if not flags:
        verdict = ("not resource-bound: the server keeps up with the offered load" if not behind else
                   "no resource saturated, yet sessions get fewer frames than sent: per-session pipeline "
                   "latency (one frame in flight per session) limits the frame rate")
    else:
        order = ["gpu", "server-loop", "server-cpu", "machine-cpu", "clients"]
        names = {"gpu": "the GPU is busy", "server-loop": "the server's event-loop thread is saturated",
                 "server-cpu": "the server CPU is saturated",
                 "machine-cpu": "the machine's CPU is saturated (server + load generators"
                                + (f"; other processes took {r.other_cpu_pct:.0f}% of a core: re-run on an idle machine)"
                                   if r.other_cpu_pct is not None and r.other_cpu_pct >= 25 else ")"),
                 "clients": "the load generators are saturated (server numbers are a lower bound)"}
        first = [f for f in order if f in flags]
        verdict = "bound by: " + "; ".join(names[f] for f in first)
    return verdict, ev


def target_verdict(rows: list[StepResult]) -> tuple[bool, str]:
    t = TARGET
    cand = [r for r in rows if r.mode == "batched" and r.n >= t["sessions"] and r.width == t["width"]
            and r.height == t["height"] and r.fps >= t["send_fps"]]
    on_gpu = [r for r in cand if r.device.startswith("cuda")]
    for r in on_gpu:
        if (r.fps_min or 0) >= t["fps"] and r.lat_p95 is not None and r.lat_p95 <= t["p95_ms"]:
            return True, (f"MET: batched, N={r.n} at {r.width}x{r.height}@{r.fps:g} on {r.gpu_name or r.device}: "
                          f"min {r.fps_min:.1f} fps/session, p95 {r.lat_p95:.0f} ms")
    if on_gpu:
        r = max(on_gpu, key=lambda x: x.n)
        return False, (f"NOT MET: batched, N={r.n} at {r.width}x{r.height}@{r.fps:g} on {r.gpu_name or r.device}: "
                       f"min {_f(r.fps_min, 1)} fps/session (need >= {t['fps']:g}), "
                       f"p95 {_f(r.lat_p95)} ms (need <= {t['p95_ms']:g})")
    why = "no batched step with N >= 64 at 640x480 @ 30 fps on a CUDA device in this run"
    return False, f"NOT MET (not exercised): {why}"


def render_markdown(rows: list[StepResult], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    o = meta["options"]
    lines = [
        "# Video load benchmark: concurrent WebRTC face-detection sessions",
        "",
        f"- date: {meta['date']}",
        f"- machine: {m['cpu_model']}, {m['usable_cpus']} usable cores ({m['logical_cpus']} logical); "
        f"GPU: {m['gpu'] or 'none'}; Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- server device: {meta.get('device', '-')}" + (f" ({meta['gpu_name']})" if meta.get("gpu_name") else "")
        + f"; torch {meta.get('torch', '-')}",
        f"- command: `{meta['command']}`",
        f"- server: `{rows[0].server_command if rows else '-'}` (fresh process per step)",
        f"- load: {o['width']}x{o['height']} @ {o['fps']:g} fps per session, warm-up {o['warmup']:g} s, "
        f"measured {o['duration']:g} s; client processes up to {o['client_procs']}; server cpus "
        f"{o['server_cpus'] or 'all'}, client cpus {o['client_cpus'] or 'all'}; client receive jitter "
        f"buffer: {o['client_jitter']}; batched app sends per-frame AdditionalOutputs: "
        f"{'no' if o.get('no_outputs') else 'yes'}",
        f"- batcher: max batch {o['max_batch']}, max delay {o['max_delay_ms']:g} ms, deadline {o['deadline_ms']:g} ms",
        "",
        "Columns: sent = frames/s each client actually sent; returned = processed frames/s each session "
        "received (mean and min over sessions); e2e = arrival - send time of the same frame index "
        "(barcode), pooled over all sessions; dropped = frames sent in the window never returned (mean "
        "over sessions); box = returned frames with the green face box at the face; CPU % are % of one "
        "core (server loop = its event-loop thread alone); GPU mem = the server process's (else the "
        "device's) used memory.",
        "",
        TABLE_HEAD,
        TABLE_SEP,
    ]
    lines += [table_row(r) for r in rows]
    iv = 1000.0 / o["fps"]
    hops = 1 if o.get("client_jitter") == "marker" else 2
    lines += ["", f"Latency floor from the transport alone: aiortc's video jitter buffer completes a frame only "
              f"when the next frame's first packet arrives, so each aiortc receiver adds ~1 frame interval "
              f"({iv:.0f} ms at {o['fps']:g} fps). Here {hops} such receiver(s) are on the path "
              f"({'the server only: clients complete frames on the RTP marker bit' if hops == 1 else 'server and load generator'})"
              f": ~{hops * iv:.0f} ms of every e2e number is that, not processing (`--modes echo` measures it; "
              "a browser client completes frames on the marker bit and does not add its hop)."]
    lines += ["", "## What bounds the result (largest N per mode)", ""]
    for mode in dict.fromkeys(r.mode for r in rows):
        rs = [r for r in rows if r.mode == mode]
        r = max(rs, key=lambda x: x.n)
        verdict, ev = bound_verdict(r, m["usable_cpus"], o["server_cpus"], o["client_cpus"])
        lines.append(f"- **{mode}, N={r.n}**: {verdict}")
        lines += [f"  - {e}" for e in ev]
    ok, text = target_verdict(rows)
    lines += ["", "## Target", "",
              f"Target: on one H100/H200, >= {TARGET['sessions']} concurrent {TARGET['width']}x{TARGET['height']} "
              f"@ {TARGET['send_fps']} fps detection sessions at >= {TARGET['fps']:g} fps each with p95 frame "
              f"latency <= {TARGET['p95_ms']:g} ms.", "", f"**{text}**", ""]
    lines += ["## Details", ""]
    for r in rows:
        b = r.batcher or {}
        extra = []
        if b:
            extra.append(f"batches {b.get('batches')}, mean {_f(b.get('mean_batch'), 1)}, max {b.get('max_batch')}, "
                         f"flush {b.get('flush_reasons')}, run ms {_pp(b.get('run_ms'))}, "
                         f"queue wait ms {_pp(b.get('queue_wait_ms'))}, dropped late {b.get('dropped_late')}")
        if r.server_video:
            extra.append(f"server frames received/processed/dropped {r.server_video.get('received')}/"
                         f"{r.server_video.get('processed')}/{r.server_video.get('dropped')}")
        if r.faces_per_output is not None:
            extra.append(f"fetch_output {_f(r.outputs_per_s, 1)}/s/session, {r.faces_per_output:.2f} faces each")
        if r.cuda_max_allocated_mib is not None:
            extra.append(f"torch max allocated {r.cuda_max_allocated_mib:,.0f} MiB")
        extra.append(f"other CPU {_f(r.other_cpu_pct)}%; connected {r.connected}/{r.n} in {_f(r.connect_s, 1)} s, "
                     f"latencies n={r.lat_n}, "
                     f"unreadable barcodes {r.unreadable}, client procs {r.client_procs}, busiest client "
                     f"{_f(r.client_cpu_max_pct)}% (loop {_f(r.client_loop_max_pct)}%), step {r.wall_s:.0f} s")
        if r.errors:
            extra.append(f"errors ({len(r.errors)}): " + " | ".join(e[:160] for e in r.errors[:3]))
        lines.append(f"- {r.mode} N={r.n}: " + "; ".join(extra))
    lines.append("")
    return "\n".join(lines)


def _pp(p: dict | None) -> str:
    if not p:
        return "-"
    return "/".join(_f(p.get(k), 1) for k in ("p50", "p95", "p99")) + " (p50/p95/p99)"


def step_to_json(r: StepResult) -> dict[str, Any]:
    return asdict(r)


def write_results(md: str, rows: list[StepResult], meta: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    jpath = out.with_suffix(".json")
    jpath.write_text(json.dumps({"meta": meta, "rows": [step_to_json(r) for r in rows]}, indent=1, default=str))
    return out, jpath


# ================================================================================= CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_video",
        description=__doc__.split("\n\n")[0],
        epilog="Example (16-core GPU box): python -m benchmarks.bench_video --sessions 1,16,32,64,96 "
               "--client-procs 6 --server-cpus 0-9 --client-cpus 10-15",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=DEFAULT_MODES, help="comma list of " + ",".join(APPS) + f" (default {DEFAULT_MODES})")
    ap.add_argument("--sessions", default=None, help=f"comma list of N (default {DEFAULT_SESSIONS})")
    ap.add_argument("--width", type=int, default=None, help="frame width (default 640)")
    ap.add_argument("--height", type=int, default=None, help="frame height (default 480)")
    ap.add_argument("--fps", type=float, default=None, help="frames/s each session sends (default 30)")
    ap.add_argument("--duration", type=float, default=None, help="measured seconds per step (default 15)")
    ap.add_argument("--warmup", type=float, default=None, help="unmeasured seconds before (default 5)")
    ap.add_argument("--client-procs", type=int, default=max(1, (os.cpu_count() or 1) // 4),
                    help="load-generator processes, each its own asyncio loop (default max(1, cores//4))")
    ap.add_argument("--workers", type=int, default=2,
                    help="uvicorn --workers for the *-workers modes (front ends feeding one engine process; default 2)")
    ap.add_argument("--max-batch", type=int, default=64, help="BENCH_MAX_BATCH for the batched app (default 64)")
    ap.add_argument("--max-delay-ms", type=float, default=8.0, help="BENCH_MAX_DELAY_MS (default 8)")
    ap.add_argument("--deadline-ms", type=float, default=100.0, help="BENCH_DEADLINE_MS (late frames dropped) (default 100)")
    ap.add_argument("--concurrency", type=int, default=512, help="BENCH_CONCURRENCY (concurrency_limit) (default 512)")
    ap.add_argument("--device", default=None, help="force the server's device (BATCHRTC_DEVICE), e.g. cpu, cuda:0")
    ap.add_argument("--server-cpus", default=None, help="pin the server to these cpus, e.g. 0-9")
    ap.add_argument("--client-cpus", default=None, help="pin the load generators to these cpus, e.g. 10-15")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the server (repeatable), e.g. OMP_NUM_THREADS=4")
    ap.add_argument("--client-jitter", choices=("aiortc", "marker"), default="aiortc",
                    help="load generator's receive side: 'aiortc' (stock: a frame is complete when the next "
                         "frame's first packet arrives, +1 frame interval) or 'marker' (complete on the RTP "
                         "marker bit, as browsers do). The server is never changed. (default aiortc)")
    ap.add_argument("--no-outputs", action="store_true",
                    help="batched app returns frames only (no per-frame AdditionalOutputs / fetch_output "
                         "data-channel message, like the per-frame baseline)")
    ap.add_argument("--quick", action="store_true",
                    help="N=1,2 at 320x240, 10 fps, 4 s measured, 2 s warm-up (~1 min on 2 cores)")
    ap.add_argument("--out", default=None, help="markdown path (JSON written next to it); default "
                    "benchmarks/results/bench_video_<device>[_quick].md")
    ap.add_argument("--keep-server-log", action="store_true", help="keep each server's log file in /tmp")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else {"sessions": DEFAULT_SESSIONS, "width": 640, "height": 480, "fps": 30.0,
                                     "duration": 15.0, "warmup": 5.0}
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in APPS]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {sorted(APPS)}")
    args.sessions = [int(x) for x in str(args.sessions).split(",") if x.strip()]
    if not args.sessions or min(args.sessions) < 1:
        ap.error("--sessions needs positive integers")
    if args.duration <= 0 or args.warmup < 0 or args.fps <= 0:
        ap.error("--duration and --fps must be > 0, --warmup >= 0")
    args.server_cpus = parse_cpus(args.server_cpus)
    args.client_cpus = parse_cpus(args.client_cpus)
    env = {}
    for kv in args.server_env:
        if "=" not in kv:
            ap.error(f"--server-env needs KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        env[k] = v
    args.server_env = env
    return args


def options_from_args(args: argparse.Namespace) -> StepOptions:
    return StepOptions(width=args.width, height=args.height, fps=args.fps, duration=args.duration,
                       warmup=args.warmup, client_procs=args.client_procs, max_batch=args.max_batch,
                       max_delay_ms=args.max_delay_ms, deadline_ms=args.deadline_ms,
                       concurrency=args.concurrency, device=args.device, server_cpus=args.server_cpus,
                       client_cpus=args.client_cpus, server_env=args.server_env,
                       keep_server_log=args.keep_server_log, client_jitter=args.client_jitter,
                       outputs=not args.no_outputs, workers=args.workers)


def run(args: argparse.Namespace, argv: list[str] | None = None, log: Any = print) -> tuple[list[StepResult], dict[str, Any]]:
    """Every (mode, N) step of ``args``; returns the rows and the report's metadata."""
    opts = options_from_args(args)
    nvml = _NVML()
    cli = argv if argv is not None else sys.argv[1:]
    meta: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(nvml),
        "command": "python -m benchmarks.bench_video " + " ".join(shlex.quote(a) for a in cli),
        "options": {k: getattr(args, k) for k in ("width", "height", "fps", "duration", "warmup", "client_procs",
                                                  "max_batch", "max_delay_ms", "deadline_ms", "concurrency",
                                                  "device", "server_cpus", "client_cpus", "server_env",
                                                  "client_jitter", "no_outputs", "modes", "sessions", "quick")},
    }
    rows: list[StepResult] = []
    log(f"bench_video: modes {args.modes}, N {args.sessions}, {args.width}x{args.height} @ {args.fps:g} fps, "
        f"{args.warmup:g}+{args.duration:g} s, {args.client_procs} client procs")
    log(TABLE_HEAD)
    log(TABLE_SEP)
    for mode in args.modes:
        for n in args.sessions:
            try:
                r = run_step(mode, n, opts, nvml)
            except Exception as e:  # noqa: BLE001 - one failed step must not lose the others
                print(f"step {mode} N={n} failed: {type(e).__name__}: {str(e)[:2000]}", file=sys.stderr, flush=True)
                r = StepResult(mode, n, opts.width, opts.height, opts.fps, opts.duration,
                               errors=[f"step failed: {type(e).__name__}: {str(e)[:300]}"])
            rows.append(r)
            log(table_row(r))
    dev_rows = [r for r in rows if r.device not in ("-", "none")]
    meta["device"] = dev_rows[0].device if dev_rows else (args.device or "cpu")
    meta["gpu_name"] = next((r.gpu_name for r in rows if r.gpu_name), None)
    meta["torch"] = next((r.torch for r in rows if r.torch != "-"), "-")
    return rows, meta


def default_out(device: str, quick: bool) -> Path:
    tag = "cuda" if device.startswith("cuda") else device.replace(":", "")
    return RESULTS_DIR / f"bench_video_{tag}{'_quick' if quick else ''}.md"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, meta = run(args, argv, log=lambda line: print(line, flush=True))
    md = render_markdown(rows, meta)
    out = Path(args.out) if args.out else default_out(meta["device"], args.quick)
    md_path, json_path = write_results(md, rows, meta, out)
    print()
    print(md)
    print(f"wrote {md_path} and {json_path}")
    return 0 if rows and all(r.connected for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
