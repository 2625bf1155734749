"""Telephone load benchmark: N concurrent simulated Twilio Media Streams calls against the
ReplyOnPause echo app, end of speech -> first reply media byte.

* Server: a SEPARATE process per N, ``python -m uvicorn server.echo_app:stream --port P
  --log-level warning --ws-per-message-deflate false`` with ``BATCHRTC_CONCURRENCY=N+8``;
  one unmeasured warm-up call loads the VAD first. Its CPU (psutil ``cpu_times`` delta over
  the streaming window / wall time, % of one core) and peak RSS are sampled from this process.
* Load: ONE spawned load-generator process, one asyncio loop, N calls on
  ``/telephone/handler`` started uniformly over ``--stagger-s``. Each call sends ``connected``,
  ``start`` (``streamSid``), then ``speech_pause_speech_16k.wav`` resampled to 8 kHz
  (``resample_poly(x, 1, 2)``) + 2 s of silence as mu-law base64 ``media`` frames of
  ``--frame-ms``; frame i (audio [i*f, (i+1)*f)) is sent at call start + (i+1)*f. It listens
  ``--listen-s`` after the last frame, then sends ``stop``.
* Per call: replies (a reply = a ``media`` event that arrives more than 0.4 s after the
  previous reply's audio would have finished playing, as in ``tests/test_telephone.py``),
  e2r = first media of reply k minus the end of speech span k (``speech_spans.json``) on the
  call's timeline. Errors: ``{"type": "error"}`` messages, refusals (``status: failed``),
  connect failures, missing replies, unexpected closes (code other than 1000/1001/none).

Usage: ``python -m benchmarks.bench_phone --calls 25,50,100 [--frame-ms 20]``
Writes ``benchmarks/results/bench_phone.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as _dt
import json
import multiprocessing as mp
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_reply import _f
from benchmarks.harness import child_main, code_version, machine_info
from benchmarks.server_process import UvicornProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
FIXTURE = "speech_pause_speech_16k.wav"
RATE = 8000
REPLY_GAP_S = 0.4
TABLE_HEADER = (
    "| N | calls ok | replies ok/expected | errors | e2r p50 ms | e2r p95 ms | e2r p99 ms "
    "| server CPU % | RSS MB | send lag p99 ms |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


# =============================================================================== workload
def build_payloads(frame_ms: int, tail_s: float = 2.0) -> tuple[list[str], float]:
    """Base64 mu-law payloads of the fixture at 8 kHz + `tail_s` silence, one per frame."""
    from scipy.signal import resample_poly

    from server.codecs import ulaw_encode
    from benchmarks.fixtures import load_wav

    sr, x = load_wav(FIXTURE)
    assert sr == 16000, sr
    y = resample_poly(x.astype(np.float64), 1, 2)
    y = np.concatenate([y, np.zeros(int(tail_s * RATE))])
    pcm = np.clip(np.round(y), -32768, 32767).astype(np.int16)
    step = RATE * frame_ms // 1000
    payloads = [base64.b64encode(ulaw_encode(pcm[s : s + step])).decode("ascii") for s in range(0, pcm.size, step)]
    return payloads, pcm.size / RATE


def start_msg(sid: str) -> str:
    return json.dumps({
        "event": "start", "sequenceNumber": "1", "streamSid": sid,
        "start": {
            "accountSid": "AC0001", "streamSid": sid, "callSid": "CA" + sid, "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {},
        },
    })


CONNECTED = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


# ========================================================================== load generator
async def one_call(url: str, sid: str, payloads: list[str], frame_s: float, offset_s: float,
                   t_base: float, listen_s: float, budget_s: float) -> dict[str, Any]:
    import websockets

    res: dict[str, Any] = {"sid": sid, "t0": None, "media": [], "errors": [], "close_code": None, "lag": []}
    await asyncio.sleep(max(0.0, t_base + offset_s - time.monotonic()))
    deadline = time.monotonic() + budget_s
    try:
        async with websockets.connect(url, max_size=None, compression=None, open_timeout=20) as ws:
            await ws.send(CONNECTED)
            await ws.send(start_msg(sid))
            t0 = time.monotonic()
            res["t0"] = t0

            async def reader() -> None:
                try:
                    async for raw in ws:
                        now = time.monotonic() - t0
                        msg = json.loads(raw)
                        if msg.get("event") == "media":
                            n = len(base64.b64decode(msg["media"]["payload"]))  # mu-law: 1 byte/sample
                            res["media"].append((now, n))
                            if msg.get("streamSid") != sid:
                                res["errors"].append(f"media with streamSid {msg.get('streamSid')!r}")
                        elif msg.get("type") == "error":
                            res["errors"].append(f"error: {str(msg.get('message'))[:120]}")
                        elif msg.get("status") == "failed":
                            res["errors"].append(f"refused: {msg.get('meta')}")
                except websockets.ConnectionClosed as e:
                    res["close_code"] = e.rcvd.code if e.rcvd else None
                else:
                    res["close_code"] = ws.close_code

            task = asyncio.create_task(reader())
            prefix = '{"event": "media", "streamSid": "' + sid + '", "media": {"track": "inbound", "payload": "'
            for i, p in enumerate(payloads):
                due = t0 + (i + 1) * frame_s
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                res["lag"].append(time.monotonic() - due)
                if time.monotonic() > deadline:
                    res["errors"].append("call budget exceeded while streaming")
                    break
                try:
                    await ws.send(prefix + p + '"}}')
                except websockets.ConnectionClosed:
                    res["errors"].append("closed while streaming")
                    break
            await asyncio.sleep(listen_s)
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(json.dumps({"event": "stop", "streamSid": sid, "stop": {"callSid": "CA" + sid}}))
            try:
                await asyncio.wait_for(task, 5)
            except asyncio.TimeoutError:
                task.cancel()
    except Exception as e:  # connect failures, handshake refusals, ...
        res["errors"].append(f"{type(e).__name__}: {str(e)[:120]}")
    return res


def _worker_main(conn: Any, url: str, n: int, payloads: list[str], frame_s: float,
                 stagger_s: float, listen_s: float, budget_s: float) -> None:
    """Entry of a load-generator process: `n` calls, their results back to the parent."""

    async def go(conn: Any) -> None:
        t_base = time.monotonic() + 0.2
        conn.send(("t_base", t_base))
        offsets = [stagger_s * i / max(1, n - 1) for i in range(n)]
        results = await asyncio.wait_for(
            asyncio.gather(*[
                one_call(url, f"MZ{i:04d}", payloads, frame_s, offsets[i], t_base, listen_s, budget_s)
                for i in range(n)
            ]),
            budget_s + stagger_s + 30,
        )
        conn.send(("done", results))

    child_main(conn, go)


# ================================================================================= server
class Server(UvicornProcess):
    def __init__(self, n: int) -> None:
        super().__init__(
            ["server.echo_app:stream", "--log-level", "warning", "--ws-per-message-deflate", "false"],
            {"BATCHRTC_CONCURRENCY": str(n + 8)},
            name="bench_phone_server",
        )

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/telephone/handler"

    @property
    def command(self) -> str:
        return self.command_line(("BATCHRTC_CONCURRENCY",))

    def warning_lines(self) -> list[str]:
        return [l for l in self.log_text().splitlines() if any(k in l for k in ("WARNING", "ERROR", "Traceback"))]


class Sampler(threading.Thread):
    """Samples the server's cumulative CPU seconds and RSS every `period_s` (bounded)."""

    def __init__(self, pid: int, period_s: float = 0.25, max_s: float = 600.0) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.period_s, self.max_s = period_s, max_s
        self.samples: list[tuple[float, float, float]] = []  # (monotonic, cpu s, rss bytes)
        self._halt = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.max_s
        while not self._halt.is_set() and time.monotonic() < end:
            with contextlib.suppress(Exception):
                ct = self.proc.cpu_times()
                self.samples.append((time.monotonic(), ct.user + ct.system, self.proc.memory_info().rss))
            self._halt.wait(self.period_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def cpu_pct(self, ta: float, tb: float) -> float | None:
        s = [x for x in self.samples if ta <= x[0] <= tb]
        if len(s) < 2:
            return None
        return 100.0 * (s[-1][1] - s[0][1]) / (s[-1][0] - s[0][0])

    def peak_rss_mb(self) -> float | None:
        peak = max((x[2] for x in self.samples), default=None)
        return None if peak is None else peak / 2**20


# ================================================================================== a step
def warmup(url: str, payloads: list[str]) -> None:
    """One unmeasured call, sent faster than real time, until its first reply (or 20 s)."""
    import websockets

    async def go() -> None:
        async with websockets.connect(url, max_size=None, compression=None) as ws:
            await ws.send(start_msg("MZwarm"))
            for p in payloads:
                await ws.send('{"event": "media", "streamSid": "MZwarm", "media": {"payload": "' + p + '"}}')
                await asyncio.sleep(0.002)
            end = time.monotonic() + 20
            while time.monotonic() < end:
                msg = json.loads(await asyncio.wait_for(ws.recv(), end - time.monotonic()))
                if msg.get("event") == "media":
                    break
            await ws.send(json.dumps({"event": "stop", "streamSid": "MZwarm"}))

    with contextlib.suppress(Exception):
        asyncio.run(asyncio.wait_for(go(), 40))


def replies_of(media: list[tuple[float, int]]) -> list[float]:
    starts, play_end = [], -1e9
    for t, n in media:
        if t > play_end + REPLY_GAP_S:
            starts.append(t)
            play_end = t
        play_end = max(play_end, t) + n / RATE
    return starts


def run_step(n: int, payloads: list[str], audio_s: float, a: argparse.Namespace,
             spans: list[tuple[float, float]]) -> dict[str, Any]:
    srv = Server(n)
    row: dict[str, Any] = {"n": n, "server_command": srv.command}
    sampler = None
    worker = None
    try:
        srv.start()
        warmup(srv.url, payloads)
        sampler = Sampler(srv.proc.pid)
        sampler.start()
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        budget_s = audio_s + a.listen_s + 30
        worker = ctx.Process(target=_worker_main, args=(child, srv.url, n, payloads, a.frame_ms / 1000,
                                                        a.stagger_s, a.listen_s, budget_s), daemon=True)
        worker.start()
        child.close()
        results = None
        t_base = None
        deadline = time.monotonic() + budget_s + a.stagger_s + 90
        while time.monotonic() < deadline:
            if not parent.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                if not worker.is_alive():
                    raise RuntimeError(f"load generator exited {worker.exitcode}")
                continue
            kind, val = parent.recv()
            if kind == "t_base":
                t_base = val
            elif kind == "done":
                results = val
                break
            else:
                raise RuntimeError(f"load generator failed:\n{val}")
        if results is None:
            raise RuntimeError("load generator did not finish in time")
        sampler.stop()
        # CPU window: all calls streaming -> the last call's last frame (CLOCK_MONOTONIC is shared).
        t0s = [r["t0"] for r in results if r["t0"] is not None]
        ta = (max(t0s) if t0s else t_base)
        tb = (max(t0s) if t0s else t_base) + audio_s - a.stagger_s
        if tb - ta < 2:
            ta, tb = t_base, t_base + a.stagger_s + audio_s
        row["cpu_window_s"] = round(tb - ta, 2)
        row["server_cpu_pct"] = sampler.cpu_pct(ta, tb)
        row["server_rss_mb"] = sampler.peak_rss_mb()
        # score
        e2r, errs, ok, got, lags = [], [], 0, 0, []
        for r in results:
            rs = replies_of(r["media"])
            call_errs = list(r["errors"])
            if r["close_code"] not in (None, 1000, 1001):
                call_errs.append(f"unexpected close {r['close_code']}")
            if r["t0"] is not None and len(rs) < len(spans):
                call_errs.append(f"missing replies: {len(rs)}/{len(spans)}")
            if r["t0"] is not None and len(rs) > len(spans):
                call_errs.append(f"extra replies: {len(rs)}/{len(spans)}")
            for t, (_, s1) in zip(rs, spans):
                e2r.append((t - s1) * 1e3)
            got += min(len(rs), len(spans))
            lags += r["lag"]
            ok += not call_errs
            errs += [f"{r['sid']}: {e}" for e in call_errs]
        row.update(
            calls_ok=ok, replies_ok=got, replies_expected=n * len(spans), errors=len(errs),
            error_samples=errs[:5], e2r_ms=[round(x, 1) for x in e2r],
            e2r_p50=float(np.percentile(e2r, 50)) if e2r else None,
            e2r_p95=float(np.percentile(e2r, 95)) if e2r else None,
            e2r_p99=float(np.percentile(e2r, 99)) if e2r else None,
            e2r_max=float(np.max(e2r)) if e2r else None,
            send_lag_p99_ms=float(np.percentile(lags, 99) * 1e3) if lags else None,
        )
    except Exception as e:
        row.update(calls_ok=0, replies_ok=0, replies_expected=n * len(spans), errors=max(1, n),
                   error_samples=[f"step failed: {type(e).__name__}: {str(e)[:300]}"])
        print(f"  step N={n} failed: {e}\n{srv.log_tail(10)}", file=sys.stderr, flush=True)
    finally:
        srv.stop()
        if sampler is not None:
            sampler.stop()
        if worker is not None and worker.is_alive():
            worker.terminate()  # our own child
            worker.join(5)
        warn = srv.warning_lines()
        row["server_log_warnings"] = len(warn)
        row["server_log_sample"] = warn[:3]
        with contextlib.suppress(OSError):
            srv.cleanup_log()
    return row


def table_row(r: dict[str, Any]) -> str:
    return (f"| {r['n']} | {r['calls_ok']}/{r['n']} | {r['replies_ok']}/{r['replies_expected']} | {r['errors']} "
            f"| {_f(r.get('e2r_p50'))} | {_f(r.get('e2r_p95'))} | {_f(r.get('e2r_p99'))} "
            f"| {_f(r.get('server_cpu_pct'))} | {_f(r.get('server_rss_mb'))} | {_f(r.get('send_lag_p99_ms'), 1)} |")


# ================================================================================== main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", default="25,50,100", help="comma-separated N list")
    ap.add_argument("--frame-ms", type=int, default=20, choices=(20, 40, 60, 80, 100))
    ap.add_argument("--stagger-s", type=float, default=0.6)
    ap.add_argument("--listen-s", type=float, default=1.5, help="listen after the last frame, then `stop`")
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_phone.md"))
    a = ap.parse_args(argv)
    calls = [int(x) for x in a.calls.split(",") if x.strip()]
    command = "python -m benchmarks.bench_phone " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    from benchmarks.fixtures import speech_spans

    spans = speech_spans(FIXTURE)
    payloads, audio_s = build_payloads(a.frame_ms)
    print(f"{FIXTURE} at 8 kHz + 2 s silence: {audio_s:.2f} s, {len(payloads)} frames of {a.frame_ms} ms; "
          f"speech spans {spans}", flush=True)
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(), "command": command, "code_version": code_version(),
        "frame_ms": a.frame_ms, "stagger_s": a.stagger_s, "listen_s": a.listen_s,
        "audio_s": audio_s, "spans": spans,
    }
    print(TABLE_HEADER, flush=True)
    rows = []
    for n in calls:
        r = run_step(n, payloads, audio_s, a, spans)
        rows.append(r)
        print(table_row(r), flush=True)
    m = meta["machine"]
    lines = [
        "# bench_phone: concurrent simulated Twilio phone calls, ReplyOnPause echo",
        "",
        f"- date: {meta['date']}",
        f"- machine: {m['cpu_model']}, {m['usable_cpus']} usable cores ({m['logical_cpus']} logical), "
        f"{m.get('memory_gib', '?')} GiB; Python {m['python']}, torch {m.get('torch')}, websockets "
        f"{m.get('websockets')}, uvicorn {m.get('uvicorn')}; no GPU; load average at start {m.get('loadavg_at_start')}",
        f"- command: `{command}`; code: {meta['code_version']}",
        "- server: `BATCHRTC_CONCURRENCY=N+8 python -m uvicorn server.echo_app:stream --port P --log-level warning "
        "--ws-per-message-deflate false` (fresh process per row, one unmeasured warm-up call)",
        f"- clients: 1 spawned load-generator process (asyncio), calls on `/telephone/handler` started over "
        f"{a.stagger_s} s; each streams {FIXTURE} -> 8 kHz mu-law + 2 s silence ({audio_s:.2f} s) in "
        f"{a.frame_ms} ms `media` frames at real time, listens {a.listen_s} s, sends `stop`",
        f"- expected: {len(spans)} replies per call (speech ends at {[s1 for _, s1 in spans]} s)",
        "",
        "Columns: e2r = end of speech span -> first `media` of its reply (ms, replies that arrived); "
        "server CPU = % of one core over the window where all calls stream (the box has "
        f"{100 * m['usable_cpus']} %; the load generator shares it); RSS = server peak; send lag = how late "
        "the load generator sent frames (p99, ms).",
        "",
        TABLE_HEADER,
        *[table_row(r) for r in rows],
    ]
    notes = [f"- N={r['n']} errors, e.g.: {'; '.join(r['error_samples'][:3])}" for r in rows if r.get("error_samples")]
    notes += [f"- N={r['n']}: {r['server_log_warnings']} server log warning line(s), e.g. `{r['server_log_sample'][0][:160]}`"
              for r in rows if r.get("server_log_warnings")]
    if notes:
        lines += ["", "Notes:", *notes]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}, {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
