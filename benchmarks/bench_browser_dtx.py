"""What a real browser sends while its microphone hears silence, with and without Opus DTX.

    python -m benchmarks.bench_browser_dtx [--seconds 5]

Headless Chromium (the one the `/ui` tests use, fake microphone fed from a WAV of digital
silence) opens a WebRTC audio session with the echo app (`server.echo_app:stream`) through
`POST /webrtc/offer`, as FastRTC's client code does. Its outbound RTP packets per second are
read from `RTCPeerConnection.getStats()`, once with the server's answer as it is, once with
`usedtx=1` added to the answer's Opus `fmtp` in the page (RFC 7587: the receiver asks the
sender to use discontinuous transmission). The server does not offer DTX itself yet: it would
have to fill the gaps in the audio it hands `ReplyOnPause` with silence, or a pause would be
found only when the next DTX packet arrives (see README, idle connections).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

from benchmarks.harness import REPO_ROOT, RESULTS_DIR, code_version, machine_info, write_report
from benchmarks.server_process import UvicornProcess

OFFER_JS = """async (dtx) => {
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
 if (dtx) sdp = sdp.replace(/a=rtpmap:(\\d+) opus\\/48000\\/2\\r\\n/, (m, pt) => m + "a=fmtp:" + pt + " usedtx=1\\r\\n");
 await pc.setRemoteDescription({type: "answer", sdp});
 window._pc = pc;
 return sdp.split("\\r\\n").filter(l => l.includes("opus") || l.startsWith("a=fmtp")).join("; ");
}"""
STATS_JS = """async () => { const st = await window._pc.getStats(); let out = null;
 st.forEach(r => { if (r.type === "outbound-rtp" && r.kind === "audio") out = {packets: r.packetsSent, bytes: r.bytesSent}; });
 return out; }"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
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
            for dtx in (False, True):
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{server.port}/")
                opus = page.evaluate(OFFER_JS, dtx)
                time.sleep(3.0)  # past the connection's start
                s0 = page.evaluate(STATS_JS)
                time.sleep(a.seconds)
                s1 = page.evaluate(STATS_JS)
                page.close()
                rows.append({"usedtx": dtx, "answer_opus_lines": opus,
                             "packets_per_s": (s1["packets"] - s0["packets"]) / a.seconds,
                             "bytes_per_s": (s1["bytes"] - s0["bytes"]) / a.seconds})
                print(rows[-1], flush=True)
    m = machine_info()
    lines = [
        "# A real browser's microphone in silence: RTP packets it sends, without and with Opus DTX",
        "",
        f"- machine: {m['cpu_model']}, {m['usable_cpus']} CPUs; code: {code_version()}",
        f"- command: `python -m benchmarks.bench_browser_dtx --seconds {a.seconds:g}`; headless Chromium "
        "(Debian's, as the /ui tests), fake microphone playing digital silence, one session with "
        "`server.echo_app:stream` over loopback; counts from the browser's `getStats()` over "
        f"{a.seconds:g} s, 3 s after connecting",
        "",
        "| answer | Opus lines in the answer | packets/s | bytes/s |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        label = "`usedtx=1` added in the page" if r["usedtx"] else "as the server sends it"
        lines.append(f"| {label} | `{r['answer_opus_lines']}` | {r['packets_per_s']:.1f} | {r['bytes_per_s']:.0f} |")
    write_report(a.out, "\n".join(lines) + "\n", {"rows": rows, "machine": m})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
