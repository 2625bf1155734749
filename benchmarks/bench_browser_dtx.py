"""Idle browser sessions: what a real browser sends while its microphone hears silence, and
what that costs the server, with Opus DTX (the server's answer) and without it.

    python -m benchmarks.bench_browser_dtx [--pages 5] [--seconds 8]

Headless Chromium (the one the `/ui` tests use, fake microphone fed from a WAV of digital
silence) opens `--pages` WebRTC audio sessions with the echo app (`server.echo_app:stream`)
through `POST /webrtc/offer`, as FastRTC's client code does. Per row: the pages' outbound RTP
packets per second (`RTCPeerConnection.getStats()`) and the server process's CPU over
`--seconds` (psutil), minus its CPU with no session, per session. Rows: the answer as the
server sends it (`usedtx=1` in its Opus `fmtp`, RFC 7587: the receiver asks the sender for
discontinuous transmission; `server/frontends/webrtc/dtx.py`), and the same answer with
`usedtx` taken out in the page (what the server answered before).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import REPO_ROOT, RESULTS_DIR, code_version, machine_info, write_report
from benchmarks.server_process import UvicornProcess

OFFER_JS = """async (strip) => {
 const pc = new RTCPeerConnection();
 const mic = await navigator.mediaDevices.getUserMedia({audio: true});
 mic.getTracks().forEach(t => pc.addTrack(t, mic));
 pc.createDataChannel("text");
 await pc.setLocalDescription(await pc.createOffer());
 await new Promise(r => { if (pc.iceGatheringState === "complete") r();
   else pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === "complete") r(); }; });
 const resp = await fetch("/webrtc/offer", {method: "POST", headers: {"Content-Type": "application/json"},
   body: JSON.stringify({sdp: pc.localDescription.sdp, type: "offer",
                         webrtc_id: "dtx" + Math.random().toString(36).slice(2)})});
 const ans = await resp.json();
 let sdp = ans.sdp;
 if (strip) sdp = sdp.replace(/a=fmtp:\\d+ usedtx=1\\r\\n/, "").replace(/;usedtx=1/, "");
 await pc.setRemoteDescription({type: "answer", sdp});
 window._pc = pc;
 return sdp.split("\\r\\n").filter(l => l.includes("opus") || l.startsWith("a=fmtp")).join("; ");
}"""
STATS_JS = """async () => { const st = await window._pc.getStats(); let out = null;
 st.forEach(r => { if (r.type === "outbound-rtp" && r.kind === "audio") out = {packets: r.packetsSent, bytes: r.bytesSent}; });
 return out; }"""


def _cpu_s(proc: Any) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: list[str] | None = None) -> int:
    import psutil

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", default=str(RESULTS_DIR / "bench_browser_dtx.md"))
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import ui_support  # the /ui tests' Chromium launcher (fake devices, loopback only)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "silence.wav"
        with wave.open(str(wav), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(48000)
            w.writeframes(np.zeros(48000 * 10, np.int16).tobytes())
        server = UvicornProcess(["server.echo_app:stream", "--log-level", "warning"],
                                {"BATCHRTC_ICE_HOSTS": "127.0.0.1"}, name="bench_browser_dtx")
        with server, ui_support.launch_chromium(audio_file=wav) as browser:
            proc = psutil.Process(server.pid)
            time.sleep(2.0)
            c0 = _cpu_s(proc)
            time.sleep(a.seconds)
            base_pct = (_cpu_s(proc) - c0) / a.seconds * 100
            for strip in (False, True):
                pages = [browser.new_page() for _ in range(a.pages)]
                opus = ""
                for page in pages:
                    page.goto(f"http://127.0.0.1:{server.port}/")
                    opus = page.evaluate(OFFER_JS, strip)
                time.sleep(3.0)  # past the connections' start
                s0 = [page.evaluate(STATS_JS) for page in pages]
                c0 = _cpu_s(proc)
                time.sleep(a.seconds)
                cpu = (_cpu_s(proc) - c0) / a.seconds * 100
                s1 = [page.evaluate(STATS_JS) for page in pages]
                for page in pages:
                    page.close()
                pkts = sum(y["packets"] - x["packets"] for x, y in zip(s0, s1)) / a.seconds / a.pages
                rows.append({"usedtx": not strip, "answer_opus_lines": opus, "pages": a.pages,
                             "packets_per_s": pkts, "server_cpu_pct": cpu, "base_cpu_pct": base_pct,
                             "per_session_pct": (cpu - base_pct) / a.pages})
                print(rows[-1], flush=True)
                time.sleep(3.0)  # the sessions close
    m = machine_info()
    lines = [
        "# Idle browser sessions (microphone hearing silence): packets and server CPU, with and without Opus DTX",
        "",
        f"- machine: {m['cpu_model']}, {m['usable_cpus']} CPUs; code: {code_version()}",
        f"- command: `python -m benchmarks.bench_browser_dtx --pages {a.pages} --seconds {a.seconds:g}`; "
        "headless Chromium (Debian's, as the /ui tests), fake microphone playing digital silence, "
        f"{a.pages} sessions with `server.echo_app:stream` over loopback; packets from the browser's "
        f"`getStats()`, server CPU (psutil) over {a.seconds:g} s, 3 s after connecting, minus "
        f"{base_pct:.2f} % with no session",
        "",
        "| answer | Opus lines in the answer | packets/s per session | server CPU per session (% of a core) |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        label = "as the server sends it (Opus DTX asked)" if r["usedtx"] else "`usedtx` taken out in the page (no DTX)"
        lines.append(f"| {label} | `{r['answer_opus_lines']}` | {r['packets_per_s']:.1f} | {r['per_session_pct']:.2f} |")
    write_report(a.out, "\n".join(lines) + "\n", {"rows": rows, "machine": m})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
