"""CPU cost of every stage of the WebRTC video path, per frame, and how it scales with threads.

Why: ``bench_video`` showed the GPU mostly idle at 64 sessions; the suspect is the CPU side
(aiortc's VP8 decode/encode, colour conversions, RTP/SRTP in Python under one GIL), and in that
run the load generators shared the machine. This benchmark takes the network, asyncio and the
model out and times the per-frame work itself, with aiortc's own classes used as aiortc uses
them (``Vp8Encoder.encode``, ``Vp8Decoder.decode(JitterFrame)``, ``RtpPacket`` with aiortc's
video header extensions, ``pylibsrtp.Session`` with the profile aiortc negotiates first).

* Content: ``bench_video.Scene`` (the astronaut's face on a grey canvas plus the index
  barcode, built in I420 like the load generator's), moving a few pixels every frame over
  ``--frames`` distinct frames that loop smoothly; all kept in memory.
* Stages: each is warmed up with one untimed pass over the frames, then timed over
  ``--rounds`` passes. Inputs that PyAV caches state on (a ``VideoFrame`` keeps the
  ``VideoReformatter`` of its first conversion) are rebuilt, untimed, before every pass, so
  each conversion pays what it pays on a fresh frame. The server's conversions are its own
  (``server.frames.FrameConverter``); PyAV's per-frame ones are comparison rows. CPU = ``process_time``
  (all threads: libvpx and swscale may use helper threads; nothing else runs meanwhile);
  ``thread_time`` (the calling thread alone) and wall time are reported next to it.
* Totals: server and load-generator ms/frame, and core-seconds per second for ``--sessions``
  x ``--fps``.
* Thread scaling: the server's codec chain (decode -> FrameConverter to rgb24 and back ->
  encode, own decoder, encoder and converter per thread) and, separately, its Python-only transport part (SRTP + RTP +
  depayload in, RTP + SRTP out) in K threads of one process: if the work releases the GIL,
  aggregate frames/s grows with K up to the core count.

Not included (so the numbers are a lower bound on the real path): asyncio, ICE/UDP syscalls,
aiortc's jitter buffer, NACK/RTCP, the barcode/box checks of bench_video, and the model.

Usage::

    python -m benchmarks.bench_video_codec                 # 640x480, 64 sessions x 30 fps
    python -m benchmarks.bench_video_codec --quick         # 160x120, ~15 s (smoke test)
    python -m benchmarks.bench_video_codec --codecs vp8,h264

Writes ``benchmarks/results/bench_video_codec_cpu[_quick].md`` and ``.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fractions
import json
import os
import random
import shlex
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import av
import numpy as np
import psutil
import pylibsrtp
from aiortc import clock
from aiortc.codecs import HEADER_EXTENSIONS
from aiortc.codecs.h264 import H264Decoder, H264Encoder, h264_depayload
from aiortc.codecs.vpx import Vp8Decoder, Vp8Encoder, vp8_depayload
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcdtlstransport import SRTP_PROFILES
from aiortc.rtcrtpparameters import RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from aiortc.utils import uint16_add, uint32_add
from av.video.reformatter import VideoReformatter
from pylibsrtp import Policy, Session

from benchmarks.bench_video import RESULTS_DIR, Scene, machine_info
from server.frames import FrameConverter

TIME_BASE = fractions.Fraction(1, 90000)  # aiortc's video clock
QUICK = {"width": 160, "height": 120, "frames": 30, "rounds": 2, "seconds": 1.0, "max_threads": 2}
BATCH = 16  # frames per stacked batch in the stack stage


# =============================================================================== transport
@dataclass(frozen=True)
class Codec:
    name: str
    encoder: Callable[[], Any]
    decoder: Callable[[], Any]
    depayload: Callable[[bytes], bytes]
    payload_type: int


CODECS = {
    "vp8": Codec("VP8", Vp8Encoder, Vp8Decoder, vp8_depayload, 97),
    "h264": Codec("H264", H264Encoder, H264Decoder, h264_depayload, 99),
}
EXT_MAP = HeaderExtensionsMap()
EXT_MAP.configure(RTCRtpParameters(headerExtensions=HEADER_EXTENSIONS["video"]))  # mid + abs-send-time
SRTP = SRTP_PROFILES[0]  # aiortc offers its profiles in this order, so two aiortc peers pick this one
SRTP_KEY = bytes(range(SRTP.key_length + SRTP.salt_length))


def srtp_session(outbound: bool) -> Session:
    """As ``RTCDtlsTransport._setup_srtp``, with a fixed test key."""
    policy = Policy(key=SRTP_KEY, srtp_profile=SRTP.libsrtp_profile,
                    ssrc_type=Policy.SSRC_ANY_OUTBOUND if outbound else Policy.SSRC_ANY_INBOUND)
    policy.allow_repeat_tx = True
    policy.window_size = 1024
    return Session(policy)


class RtpSender:
    """The per-packet work of ``RTCRtpSender._run_rtp`` + ``RTCDtlsTransport._send_rtp``."""

    def __init__(self, codec: Codec) -> None:
        self.pt = codec.payload_type
        self.ssrc = random.getrandbits(32)
        self.seq = random.getrandbits(16)
        self.ts0 = random.getrandbits(32)
        self.srtp = srtp_session(outbound=True)

    def send(self, encoded: tuple[list[bytes], int]) -> list[bytes]:
        payloads, timestamp = encoded
        out = []
        for i, payload in enumerate(payloads):
            p = RtpPacket(payload_type=self.pt, sequence_number=self.seq, timestamp=uint32_add(self.ts0, timestamp))
            p.ssrc = self.ssrc
            p.payload = payload
            p.marker = int(i == len(payloads) - 1)
            p.extensions.abs_send_time = (clock.current_ntp_time() >> 14) & 0x00FFFFFF
            p.extensions.mid = "0"
            out.append(self.srtp.protect(p.serialize(EXT_MAP)))
            self.seq = uint16_add(self.seq, 1)
        return out


class RtpReceiver:
    """SRTP unprotect + RTP parse + depayload of one frame's packets, joined as aiortc's jitter
    buffer joins them. A fresh SRTP session per pass: replaying a pass would trip replay checks."""

    def __init__(self, codec: Codec) -> None:
        self.depayload = codec.depayload
        self.srtp = srtp_session(outbound=False)

    def reset(self) -> None:
        self.srtp = srtp_session(outbound=False)

    def receive(self, packets: list[bytes]) -> JitterFrame:
        parts, ts = [], 0
        for data in packets:
            p = RtpPacket.parse(self.srtp.unprotect(data), EXT_MAP)
            parts.append(self.depayload(p.payload))
            ts = p.timestamp
        return JitterFrame(data=b"".join(parts), timestamp=ts)


class Pts:
    """Increasing 90 kHz timestamps at ``fps`` (libvpx's rate control reads them)."""

    def __init__(self, fps: float) -> None:
        self.step, self.n = int(round(90000 / fps)), 0

    def next(self) -> tuple[int, fractions.Fraction]:
        self.n += 1
        return (self.n - 1) * self.step, TIME_BASE

    def stamp(self, frame: av.VideoFrame) -> av.VideoFrame:
        frame.pts, frame.time_base = self.next()
        return frame


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used (to see whether others compete)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def sws_threads_per_context(n: int = 4) -> float | None:
    """Native threads a fresh frame conversion starts (PyAV asks swscale for auto threads)."""
    try:
        before = len(os.listdir("/proc/self/task"))
        frames = [av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24") for _ in range(n)]
        for f in frames:
            f.reformat(format="yuv420p")  # the frame keeps its reformatter (and its threads) while alive
        return (len(os.listdir("/proc/self/task")) - before) / n
    except OSError:
        return None


def decode_all(codec: Codec, jframes: Sequence[JitterFrame]) -> list[av.VideoFrame]:
    dec = codec.decoder()
    return [f for jf in jframes for f in dec.decode(jf)]


# ================================================================================ timing
@dataclass
class Stage:
    key: str
    side: str  # "server" | "client"
    label: str
    counted: bool  # part of the side's total (False: a comparison row)
    cpu_ms: float = 0.0  # process CPU (all threads) per frame
    thread_ms: float = 0.0  # the calling thread's CPU per frame
    wall_ms: float = 0.0
    frames: int = 0


def measure(stage: Stage, work: Callable[[Any], Any], inputs: Callable[[], Sequence[Any]], rounds: int,
            per_item: int = 1) -> list[Any]:
    """One untimed warm-up pass (its outputs are returned: for an encoder they start with the
    keyframe), then ``rounds`` timed passes, each over fresh ``inputs()`` built untimed."""
    first = [work(x) for x in inputs()]
    wall = thr = cpu = 0.0
    n = 0
    for _ in range(rounds):
        xs = inputs()[::-1]  # popped below: a fresh frame is freed (with its SwsContext) in the loop, as in the server
        count = len(xs)
        w0, t0, c0 = time.perf_counter(), time.thread_time(), time.process_time()
        while xs:
            work(xs.pop())
        wall += time.perf_counter() - w0
        thr += time.thread_time() - t0
        cpu += time.process_time() - c0
        n += count * per_item
    stage.cpu_ms, stage.thread_ms, stage.wall_ms, stage.frames = cpu / n * 1e3, thr / n * 1e3, wall / n * 1e3, n
    return first


def run_stages(codec: Codec, i420: list[np.ndarray], fps: float, rounds: int,
               target_cores: int) -> tuple[list[Stage], dict[str, Any]]:
    """Every stage of client -> server -> client for one codec, in data-flow order."""
    c = codec.name
    stages: list[Stage] = []

    def stage(key: str, side: str, label: str, counted: bool = True) -> Stage:
        stages.append(Stage(key, side, label, counted))
        return stages[-1]

    def yuv_frames() -> list[av.VideoFrame]:
        return [av.VideoFrame.from_ndarray(a, format="yuv420p") for a in i420]

    # -- load generator sends: I420 array -> frame -> encode -> RTP/SRTP
    pts = Pts(fps)
    measure(stage("c_from_yuv", "client", "from_ndarray(I420) -> VideoFrame"),
            lambda a: pts.stamp(av.VideoFrame.from_ndarray(a, format="yuv420p")), lambda: i420, rounds)
    enc = codec.encoder()
    up = measure(stage("c_encode", "client", f"{c} encode (yuv420p frame)"),
                 lambda f: enc.encode(pts.stamp(f)), yuv_frames, rounds)
    tx = RtpSender(codec)
    up_pkts = measure(stage("c_tx", "client", "RTP serialize + SRTP protect"), tx.send, lambda: up, rounds)

    # -- server receives: SRTP/RTP -> depayload -> decode
    rx = RtpReceiver(codec)
    up_jf = measure(stage("s_rx", "server", "SRTP unprotect + RTP parse + depayload"), rx.receive,
                    lambda: (rx.reset(), up_pkts)[1], rounds)
    dec = codec.decoder()
    measure(stage("s_decode", "server", f"{c} decode"), dec.decode, lambda: up_jf, rounds)

    # -- server converts for the handler (fresh decoded frames each pass: see module doc)
    fresh = lambda: decode_all(codec, up_jf)  # noqa: E731
    # The server's own conversions (server/frames.py: one reused single-threaded swscale context
    # per session, frames handed to the encoder as yuv420p); PyAV's per-frame ones for comparison.
    conv = FrameConverter()
    rgbs = measure(stage("s_rgb", "server", 'FrameConverter.to_ndarray(frame, "rgb24") (batched handler)'),
                   lambda f: conv.to_ndarray(f, "rgb24"), fresh, rounds)
    measure(stage("s_rgb_fresh", "server", 'to_ndarray(format="rgb24"): a fresh context per frame (comparison)', False),
            lambda f: f.to_ndarray(format="rgb24"), fresh, rounds)
    measure(stage("s_yuv", "server", "to_ndarray() yuv420p planes (comparison)", False),
            lambda f: f.to_ndarray(), fresh, rounds)
    buf = np.empty((BATCH, *rgbs[0].shape), np.uint8)
    groups = [[rgbs[(g * BATCH + j) % len(rgbs)] for j in range(BATCH)] for g in range(-(-len(rgbs) // BATCH))]
    measure(stage("s_stack", "server", f"np.stack of {BATCH} frames into a preallocated batch, per frame"),
            lambda g: np.stack(g, out=buf), lambda: groups, rounds, per_item=BATCH)

    # -- server sends the handler's RGB result back
    spts = Pts(fps)
    out_conv = FrameConverter()
    yuv_out = measure(stage("s_from_rgb", "server", 'FrameConverter.to_frame(rgb, "rgb24"): from_ndarray + yuv420p'),
                      lambda a: out_conv.to_frame(a, "rgb24", *spts.next()), lambda: rgbs, rounds)
    senc, epts = codec.encoder(), Pts(fps)
    down = measure(stage("s_encode", "server", f"{c} encode (the converter's yuv420p frame)"),
                   lambda f: senc.encode(epts.stamp(f)), lambda: yuv_out, rounds)
    rgb_frames = lambda: [av.VideoFrame.from_ndarray(a, format="rgb24") for a in rgbs]  # noqa: E731
    renc, rpts = codec.encoder(), Pts(fps)
    measure(stage("s_encode_rgb", "server", f"{c} encode of an rgb24 frame: aiortc reformats inside (comparison)",
                  False), lambda f: renc.encode(rpts.stamp(f)), rgb_frames, rounds)
    measure(stage("s_reformat", "server", "of which: rgb24 -> yuv420p, a fresh context per frame (comparison)", False),
            lambda f: f.reformat(format="yuv420p"), rgb_frames, rounds)
    measure(stage("s_reformat_t", "server", f"rgb24 -> yuv420p, fresh VideoReformatter, threads={target_cores} "
                  f"(auto threads on a {target_cores}-core machine; comparison)", False),
            lambda f: VideoReformatter().reformat(f, format="yuv420p", threads=target_cores), rgb_frames, rounds)
    stx = RtpSender(codec)
    down_pkts = measure(stage("s_tx", "server", "RTP serialize + SRTP protect"), stx.send, lambda: down, rounds)

    # -- load generator receives
    crx = RtpReceiver(codec)
    down_jf = measure(stage("c_rx", "client", "SRTP unprotect + RTP parse + depayload"), crx.receive,
                      lambda: (crx.reset(), down_pkts)[1], rounds)
    cdec = codec.decoder()
    measure(stage("c_decode", "client", f"{c} decode"), cdec.decode, lambda: down_jf, rounds)
    measure(stage("c_read_y", "client", "to_ndarray() of the decoded frame (reads the Y plane)"),
            lambda f: f.to_ndarray(), lambda: decode_all(codec, down_jf), rounds)

    def stream(pkts: list[list[bytes]], encoded: list[tuple[list[bytes], int]]) -> dict[str, float]:
        steady = slice(1, None)  # without the first frame: the keyframe
        return {"srtp_bytes_per_frame": float(np.mean([sum(map(len, p)) for p in pkts[steady]])),
                "packets_per_frame": float(np.mean([len(p) for p in pkts[steady]])),
                "keyframe_bytes": float(sum(map(len, encoded[0][0]))),
                "kbit_s_at_fps": float(np.mean([sum(map(len, p)) for p in pkts[steady]]) * 8 * fps / 1000)}

    return stages, {"client_to_server": stream(up_pkts, up), "server_to_client": stream(down_pkts, down),
                    "_up_jf": up_jf, "_up_pkts": up_pkts, "_down": down}


# ========================================================================= thread scaling
def codec_chain(codec: Codec, jframes: list[JitterFrame], fps: float) -> Callable[[], Callable[[], None]]:
    """The server's per-frame codec work, one decoder + encoder per thread (as per session)."""
    def make() -> Callable[[], None]:
        dec, enc, pts, conv = codec.decoder(), codec.encoder(), Pts(fps), FrameConverter()
        it = iter(range(0))

        def step() -> None:
            nonlocal it
            i = next(it, None)
            if i is None:
                it = iter(range(len(jframes)))  # loops back to frame 0, the keyframe
                i = next(it)
            for f in dec.decode(jframes[i]):
                enc.encode(conv.to_frame(conv.to_ndarray(f, "rgb24"), "rgb24", *pts.next()))
        return step
    return make


def python_chain(codec: Codec, up_pkts: list[list[bytes]], down: list[tuple[list[bytes], int]]
                 ) -> Callable[[], Callable[[], None]]:
    """The server's per-frame Python transport work: receive one frame's packets, send one."""
    def make() -> Callable[[], None]:
        rx, tx = RtpReceiver(codec), RtpSender(codec)
        state = {"i": 0}

        def step() -> None:
            i = state["i"]
            if i == 0:
                rx.reset()
            rx.receive(up_pkts[i])
            tx.send(down[i])
            state["i"] = (i + 1) % len(up_pkts)
        return step
    return make


def scale(make: Callable[[], Callable[[], None]], k: int, seconds: float, warm: int = 5) -> dict[str, float]:
    """K threads run ``step`` as fast as they can; frames and process CPU over the same window."""
    counts = [0] * k
    stop = threading.Event()
    ready = threading.Barrier(k + 1)

    def worker(idx: int) -> None:
        step = make()
        for _ in range(warm):  # encoder init, first conversions
            step()
        ready.wait()
        while not stop.is_set():
            step()
            counts[idx] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(k)]
    for t in threads:
        t.start()
    ready.wait()
    w0, c0, m0, n0 = time.perf_counter(), time.process_time(), machine_busy_s(), sum(counts)
    time.sleep(seconds)
    wall, cpu, frames = time.perf_counter() - w0, time.process_time() - c0, sum(counts) - n0
    others = machine_busy_s() - m0 - cpu
    stop.set()
    for t in threads:
        t.join()
    return {"threads": k, "frames": frames, "fps": frames / wall, "fps_per_thread": frames / wall / k,
            "cpu_pct": 100 * cpu / wall, "others_cpu_pct": max(0.0, 100 * others / wall),
            "cpu_ms_per_frame": 1e3 * cpu / max(frames, 1), "wall_s": wall}


def thread_counts(max_threads: int) -> list[int]:
    ks, k = [], 1
    while k <= max_threads:
        ks.append(k)
        k *= 2
    if ks[-1] != max_threads:
        ks.append(max_threads)
    return ks


# ============================================================================== reporting
def totals(stages: list[Stage], sessions: int, fps: float) -> dict[str, dict[str, float]]:
    out = {}
    for side in ("server", "client"):
        mine = [s for s in stages if s.side == side and s.counted]
        ms = sum(s.cpu_ms for s in mine)
        out[side] = {"cpu_ms_per_frame": ms, "wall_ms_per_frame": sum(s.wall_ms for s in mine),
                     "core_s_per_s": ms * sessions * fps / 1000}
    # mode="send" (camera in, detections out as AdditionalOutputs): no frame goes back, so the
    # server skips the conversion back, the encode and the outgoing RTP (server/frontends/webrtc/video.py).
    mine = [s for s in stages if s.side == "server" and s.counted and s.key not in SEND_BACK_STAGES]
    ms = sum(s.cpu_ms for s in mine)
    out["server_send"] = {"cpu_ms_per_frame": ms, "wall_ms_per_frame": sum(s.wall_ms for s in mine),
                          "core_s_per_s": ms * sessions * fps / 1000}
    return out


SEND_BACK_STAGES = ("s_from_rgb", "s_encode", "s_tx")


def _by(stages: list[Stage], *keys: str) -> float:
    return sum(s.cpu_ms for s in stages if s.key in keys)


def verdict(res: dict[str, Any], sessions: int, fps: float, cores: int, target_cores: int) -> list[str]:
    """'What this means', from the numbers."""
    st, tot, sc = res["stages"], res["totals"], res["scaling"]
    srv, cli = tot["server"]["core_s_per_s"], tot["client"]["core_s_per_s"]
    load = sessions * fps
    ms = tot["server"]["cpu_ms_per_frame"]
    parts = {"codec (decode + encode)": _by(st, "s_decode", "s_encode"),
             "conversions (to rgb24, back to yuv420p, stack)": _by(st, "s_rgb", "s_from_rgb", "s_stack"),
             "Python transport (SRTP + RTP + depayload, in and out)": _by(st, "s_rx", "s_tx")}
    lines = [
        f"- **{res['codec']}, {sessions} sessions x {fps:g} fps = {load:g} frames/s each way.** Server: "
        f"{ms:.2f} ms of CPU per frame -> **{srv:.1f} core-s/s**; load generators: "
        f"{tot['client']['cpu_ms_per_frame']:.2f} ms/frame -> **{cli:.1f} core-s/s**; together {srv + cli:.1f}. "
        f"This machine has {cores} usable cores; the target machine has {target_cores}: the server alone "
        f"needs {100 * srv / target_cores:.0f}% of it, server + load generators on the same machine "
        f"{100 * (srv + cli) / target_cores:.0f}% (before asyncio, UDP, jitter buffer, RTCP and the model).",
        "- Server per frame: " + "; ".join(f"{k} {v:.2f} ms ({100 * v / ms:.0f}%)" for k, v in parts.items()) + ".",
    ]
    old_in, new_in = _by(st, "s_rgb_fresh"), _by(st, "s_rgb")
    old_out = _by(st, "s_encode_rgb") - _by(st, "s_encode")
    new_out = _by(st, "s_from_rgb")
    per = res.get("sws_threads_per_context")
    lines.append(
        f"- PyAV's own conversions build a new SwsContext with auto threads for every frame (here each one "
        f"started {f'{per:g}' if per is not None else '?'} native threads): to rgb24 {old_in:.2f} ms, and aiortc's "
        f"rgb24->yuv420p inside encode {old_out:.2f} ms more than encoding yuv420p. The server's FrameConverter "
        f"(one single-threaded context per session): {new_in:.2f} ms in, {new_out:.2f} ms out (incl. from_ndarray), "
        f"i.e. {(old_in - new_in + old_out - new_out) * load / 1000:.1f} core-s/s less at this load.")
    t_ms = _by(st, "s_reformat_t")
    if t_ms > 0:
        lines.append(
            f"- On a {target_cores}-core machine auto threads means a {target_cores}-thread pool per fresh "
            f"conversion; emulated here (threads={target_cores}): {t_ms:.2f} ms CPU per rgb24->yuv420p conversion "
            f"(vs {_by(st, 's_reformat'):.2f} with auto threads on these {cores} cores). If both per-frame conversions "
            f"cost that, they alone would take ~{2 * t_ms * load / 1000:.1f} core-s/s at this load.")
    codec_sc, py_sc = sc.get("codec_chain") or [], sc.get("python_chain") or []
    noisy = [r for rows in sc.values() for r in rows if r["others_cpu_pct"] > 25]
    if noisy:
        lines.append(f"- Caution: other processes used up to {max(r['others_cpu_pct'] for r in noisy):.0f}% of a core "
                     f"during {len(noisy)} thread-scaling window(s): those frames/s and speed-ups are contended.")
    if codec_sc:
        k = max((r for r in codec_sc if r["threads"] <= cores), key=lambda r: r["threads"])
        base = codec_sc[0]["fps"]
        sp = k["fps"] / base
        gil = "runs in parallel in one process (releases the GIL)" if sp >= 0.7 * k["threads"] else (
            "does not scale with threads in one process (GIL-bound or contended)")
        lines.append(
            f"- Codec chain in {k['threads']} threads of one process: {k['fps']:.0f} frames/s = {sp:.2f}x one "
            f"thread ({k['cpu_pct']:.0f}% CPU): it {gil}. One thread does {base:.0f} frames/s = "
            f"{base / fps:.1f} sessions at {fps:g} fps per core.")
    if py_sc:
        base, last = py_sc[0]["fps"], py_sc[-1]
        bound = ("it scales with threads" if last["fps"] >= 1.3 * base else
                 "GIL-bound: more threads add no throughput" + (" (GIL hand-offs even lower it)" if last["fps"] < 0.9 * base else ""))
        rx_cap = 1000 / max(_by(st, "s_rx"), 1e-9)
        lines.append(
            f"- Python transport part: one thread {base:.0f} frames/s; {last['threads']} threads "
            f"{last['fps']:.0f} frames/s ({last['fps'] / base:.2f}x, {last['cpu_pct']:.0f}% CPU): {bound}. It is small "
            f"per frame ({_by(st, 's_rx', 's_tx') * 1000:.0f} us in + out): the receive half, which aiortc runs on the "
            f"event-loop thread, caps that thread at {rx_cap:.0f} frames/s ({rx_cap / fps:.0f} sessions at {fps:g} fps); "
            f"aiortc's per-packet asyncio, ICE, jitter-buffer and RTCP work on the same thread is not measured here.")
    return lines


def _f(v: float, nd: int = 2) -> str:
    return f"{v:,.{nd}f}"


def _ms(v: float) -> str:
    return f"{v:.3f}" if v >= 0.01 else f"{v:.4f}"  # tiny stages (RTP, stack at 160x120) stay non-zero


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    m, o = meta["machine"], meta["options"]
    sessions, fps = o["sessions"], o["fps"]
    lines = [
        "# Video codec path: CPU per frame and thread scaling",
        "",
        f"- date: {meta['date']}",
        f"- machine: {m['cpu_model']}, {m['usable_cpus']} usable cores ({m['logical_cpus']} logical); "
        f"Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- command: `{meta['command']}`",
        f"- frames: {o['width']}x{o['height']}, {o['frames']} distinct moving frames (bench_video's scene), "
        f"warm-up pass + {o['rounds']} timed passes per stage; SRTP {meta['srtp_profile']}; "
        f"thread scaling {o['seconds']:g} s per K",
        "",
        "CPU = process CPU time per frame (all threads: libvpx and swscale may use helper threads); "
        "thread = the calling thread's own CPU; wall = elapsed. Rows marked (comparison) are not in the totals.",
    ]
    for res in results:
        st = [Stage(**s) for s in res["stages"]]
        others = res["others_cpu_pct_during_stages"]
        lines += ["", f"## {res['codec']}: per-stage cost", "",
                  f"Other processes used {others:.0f}% of a core on average while the stages were timed "
                  f"({'contended: treat wall times with care' if others > 25 else 'quiet enough'}).",
                  "",
                  "| side | stage | CPU ms/frame | thread ms | wall ms |", "|---|---|---:|---:|---:|"]
        for s in st:
            lines.append(f"| {s.side} | {s.label} | {_ms(s.cpu_ms)} | {_ms(s.thread_ms)} | {_ms(s.wall_ms)} |")
        lines += ["", "| stream | SRTP bytes/frame | packets/frame | kbit/s | keyframe bytes |",
                  "|---|---:|---:|---:|---:|"]
        for name, v in res["streams"].items():
            lines.append(f"| {name.replace('_', ' ')} | {_f(v['srtp_bytes_per_frame'], 0)} "
                         f"| {_f(v['packets_per_frame'], 1)} "
                         f"| {_f(v['kbit_s_at_fps'], 0)} | {_f(v['keyframe_bytes'], 0)} |")
        t = res["totals"]
        lines += ["", f"### {res['codec']}: totals for {sessions} sessions x {fps:g} fps", "",
                  "| side | CPU ms/frame | wall ms/frame | core-s/s needed | usable cores here | target machine cores |",
                  "|---|---:|---:|---:|---:|---:|"]
        sides = [("server", "server (send-receive)"), ("client", "load generators")]
        if "server_send" in t:
            sides.insert(1, ("server_send", 'server, mode="send" (no video back: no conversion back, encode or RTP out)'))
        for side, name in sides:
            lines.append(f"| {name} | {_f(t[side]['cpu_ms_per_frame'])} | {_f(t[side]['wall_ms_per_frame'])} "
                         f"| {_f(t[side]['core_s_per_s'], 1)} | {m['usable_cpus']} | {o['target_cores']} |")
        both = t["server"]["core_s_per_s"] + t["client"]["core_s_per_s"]
        lines.append(f"| both | {_f(t['server']['cpu_ms_per_frame'] + t['client']['cpu_ms_per_frame'])} | - "
                     f"| {_f(both, 1)} | {m['usable_cpus']} | {o['target_cores']} |")
        lines += ["", f"### {res['codec']}: thread scaling in one process", "",
                  "| work | K threads | frames/s | frames/s per thread | speed-up vs K=1 | process CPU % | CPU ms/frame "
                  "| other processes CPU % |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for work, rows in res["scaling"].items():
            base = rows[0]["fps"] if rows else 0.0
            for r in rows:
                lines.append(f"| {work.replace('_', ' ')} | {r['threads']} | {_f(r['fps'], 1)} "
                             f"| {_f(r['fps_per_thread'], 1)} | {_f(r['fps'] / base if base else 0.0)} "
                             f"| {_f(r['cpu_pct'], 0)} | {_f(r['cpu_ms_per_frame'], 3)} "
                             f"| {_f(r['others_cpu_pct'], 0)} |")
        lines += ["", "codec chain = decode -> FrameConverter to rgb24 and back to yuv420p -> encode (own decoder/encoder per "
                  "thread); python chain = SRTP unprotect + RTP parse + depayload of one frame's packets, then RTP "
                  "serialize + SRTP protect of one frame's packets. CPU % is of one core; other processes = the rest of "
                  "the machine's CPU in the same window (if large, the numbers are contended)."]
        lines += ["", f"### {res['codec']}: what this means", ""] + res["verdict"]
    lines += ["", "Per-frame CPU was measured on this machine's cores; the target machine's cores may be faster or "
              "slower, so scale by a single-core comparison before applying the core-s/s numbers there.", ""]
    return "\n".join(lines)


# =================================================================================== main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=120, help="distinct frames (one loop of the scene)")
    p.add_argument("--rounds", type=int, default=3, help="timed passes over the frames per stage")
    p.add_argument("--codecs", default="vp8", help="comma list of: " + ",".join(CODECS))
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--target-cores", type=int, default=16, help="cores of the machine the target is for")
    p.add_argument("--seconds", type=float, default=3.0, help="run time per thread count in the scaling test")
    p.add_argument("--max-threads", type=int, default=None, help="default: 2 x usable cores, at most 32")
    p.add_argument("--quick", action="store_true", help="160x120, 30 frames, K up to 2 (smoke test)")
    p.add_argument("--out", type=Path, default=None, help="report path (.md; the .json goes next to it)")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if p.get_default(k) == getattr(args, k):
                setattr(args, k, v)
    bad = [c for c in args.codecs.split(",") if c not in CODECS]
    if bad:
        p.error(f"unknown codec(s) {bad}; choose from {list(CODECS)}")
    if args.frames < 2 or args.rounds < 1:
        p.error("--frames must be >= 2 and --rounds >= 1")
    return args


def run(args: argparse.Namespace, argv: list[str],
        log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    machine = machine_info()
    machine["versions"]["pylibsrtp"] = pylibsrtp.__version__
    machine["versions"]["FFmpeg"] = av.ffmpeg_version_info
    cores = machine["usable_cpus"]
    max_k = args.max_threads or min(32, 2 * cores)
    scene = Scene(args.width, args.height, args.fps, period_s=args.frames / args.fps, positions=args.frames)
    i420 = [scene.make_i420(i) for i in range(args.frames)]
    sws_threads = sws_threads_per_context()
    results = []
    for name in args.codecs.split(","):
        codec = CODECS[name]
        log(f"[{codec.name}] stages: {args.width}x{args.height}, {args.frames} frames x {args.rounds} rounds")
        w0, c0, m0 = time.perf_counter(), time.process_time(), machine_busy_s()
        stages, streams = run_stages(codec, i420, args.fps, args.rounds, args.target_cores)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        stage_others = max(0.0, 100 * (machine_busy_s() - m0 - cpu) / wall)
        scaling: dict[str, list[dict[str, float]]] = {"codec_chain": [], "python_chain": []}
        makers = {"codec_chain": codec_chain(codec, streams.pop("_up_jf"), args.fps),
                  "python_chain": python_chain(codec, streams.pop("_up_pkts"), streams.pop("_down"))}
        for work, make in makers.items():
            for k in thread_counts(max_k):
                r = scale(make, k, args.seconds)
                scaling[work].append(r)
                log(f"[{codec.name}] {work} K={k}: {r['fps']:.1f} frames/s, {r['cpu_pct']:.0f}% CPU")
        res = {"codec": codec.name, "stages": [asdict(s) for s in stages], "streams": streams,
               "totals": totals(stages, args.sessions, args.fps), "scaling": scaling}
        res["sws_threads_per_context"] = sws_threads
        res["others_cpu_pct_during_stages"] = stage_others
        res["verdict"] = verdict({**res, "stages": stages}, args.sessions, args.fps, cores, args.target_cores)
        results.append(res)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
            "command": "python -m benchmarks.bench_video_codec" + (" " + shlex.join(argv) if argv else ""),
            "srtp_profile": SRTP.openssl_profile.decode(),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"max_threads": max_k}}
    return results, meta


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    results, meta = run(args, argv)
    md = render(results, meta)
    out = args.out or RESULTS_DIR / f"bench_video_codec_cpu{'_quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(md)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
