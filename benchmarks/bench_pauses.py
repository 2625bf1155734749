"""Pause detection accuracy and delay, sliding vs tumbling, on real speech (audio time).

    python -m benchmarks.bench_pauses [--frame-ms 20] [--out benchmarks/results/bench_pauses.md]

Each recording is fed to a `ReplyOnPause` (the shared batched Silero VAD, in this process) in
frames of `--frame-ms`, as fast as the VAD answers; every `pause_detected` is stamped with the
audio time fed so far, so the numbers do not depend on the machine's load. Recordings: the
four speech fixtures (turns separated by 0.7-2.5 s of silence or noise; 2 s of silence added
at the end), and sentences with
commas that espeak-ng speaks at 80, 130 and 175 words a minute, each one turn followed by 2 s
of silence (espeak-ng and sox are needed, as for the tests). For each turn:

- a pause found inside the turn's speech is a **false pause** (a mid-sentence cut);
- the first pause after the turn's speech ends gives the **delay** (end of speech -> pause);
- a turn with no pause before the next one starts (or the recording ends) is **missed**.

The verdict is issue 16's rule for the default: sliding has no more false pauses than
tumbling.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.fixtures import SPEECH_FIXTURES, load_wav, speech_spans
from server.reply_on_pause import AlgoOptions, ReplyOnPause

SENTENCES = (
    "Well, I was thinking, maybe, we could go to the park, and then, if it is sunny, "
    "have a picnic by the lake.",
    "First, open the box, take out the manual, read it carefully, and, only after that, "
    "plug it in.",
    "My phone number is five, five, five, one, two, three, four, and my name is Sam.",
    "I would like, let me see, a coffee, no sugar, with a little milk, please.",
)
VOICES = ("en-us", "en-gb")
SPEEDS = (80, 130, 175)
RATE = 16000


@dataclass
class Recording:
    name: str
    audio: np.ndarray  # int16 at RATE
    turns: list[tuple[float, float]]  # speech spans, one per turn


def espeak(text: str, voice: str, speed: int, tmp: Path) -> np.ndarray:
    raw, out = tmp / "raw.wav", tmp / "out.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
    # 16 kHz mono int16, leading and trailing silence trimmed (as make_fixtures.sh does).
    subprocess.run(["sox", "-R", "-D", str(raw), "-r", str(RATE), "-c", "1", "-b", "16",
                    "-e", "signed-integer", str(out), "silence", "1", "0.005", "0.1%",
                    "reverse", "silence", "1", "0.005", "0.1%", "reverse"], check=True)
    return load_wav(str(out))[1]


def fixture(name: str) -> Recording:
    """A speech fixture with 2 s of silence added, so its last turn can end in it."""
    sr, audio = load_wav(name)
    assert sr == RATE
    return Recording(name, np.concatenate([audio, np.zeros(2 * RATE, np.int16)]),
                     speech_spans(name))


def recordings() -> list[Recording]:
    recs = []
    for name in SPEECH_FIXTURES:
        recs.append(fixture(name))
    with tempfile.TemporaryDirectory() as d:
        for i, text in enumerate(SENTENCES):
            for voice in VOICES:
                for speed in SPEEDS:
                    speech = espeak(text, voice, speed, Path(d))
                    lead, tail = np.zeros(RATE // 2, np.int16), np.zeros(2 * RATE, np.int16)
                    audio = np.concatenate([lead, speech, tail])
                    span = (0.5, 0.5 + speech.size / RATE)
                    recs.append(Recording(f"sentence{i + 1}-{voice}-{speed}wpm", audio, [span]))
    return recs


class _Log:
    """Stands in for the session's channel: stamps each pause with the audio time fed."""

    def __init__(self) -> None:
        self.fed_s = 0.0
        self.pauses: list[float] = []

    def send(self, msg: str) -> None:
        if "pause_detected" in msg:
            self.pauses.append(self.fed_s)


def options(mode: str) -> AlgoOptions:
    """"tumbling", "sliding" (the defaults), "sliding@SECONDS" (another window length);
    "-wait" after a sliding mode: no early decision (the pause is found when the window
    that holds it has been heard)."""
    base, wait = (mode[:-5], True) if mode.endswith("-wait") else (mode, False)
    if base.startswith("sliding@"):
        return AlgoOptions(pause_window="sliding", sliding_window_s=float(base.split("@")[1]),
                           decide_early=not wait)
    if wait and base != "sliding":
        raise ValueError(f"-wait applies to sliding modes only: {mode!r}")
    return AlgoOptions(pause_window=base, decide_early=not wait)  # type: ignore[arg-type]


async def pauses(audio: np.ndarray, mode: str, frame_ms: int) -> list[float]:
    """Audio times (s) at which `ReplyOnPause` with the mode's options found a pause."""
    handler = ReplyOnPause(lambda a: None, algo_options=options(mode), input_sample_rate=RATE)
    log = _Log()
    handler.set_channel(log)  # type: ignore[arg-type]
    step = RATE * frame_ms // 1000
    try:
        for i in range(0, audio.size - step + 1, step):
            log.fed_s = (i + step) / RATE
            frame = (RATE, audio[None, i:i + step])
            if not handler.receive_nowait(frame):  # as `Session.receive` feeds it
                await handler.receive(frame)
    finally:
        handler.shutdown()
    return log.pauses


def score(rec: Recording, found: list[float]) -> dict:
    false, delays, missed = 0, [], 0
    for k, (start, end) in enumerate(rec.turns):
        nxt = rec.turns[k + 1][0] if k + 1 < len(rec.turns) else float("inf")
        false += sum(1 for t in found if start < t < end)
        after = [t for t in found if end <= t < nxt]
        if after:
            delays.append(after[0] - end)
        else:
            missed += 1
    return {"false": false, "delays": delays, "missed": missed, "turns": len(rec.turns)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, q))


async def run(frame_ms: int, modes: list[str]) -> dict:
    recs = recordings()
    out: dict = {"recordings": [], "modes": {}}
    for mode in modes:
        tot = {"false": 0, "delays": [], "missed": 0, "turns": 0}
        for rec in recs:
            s = score(rec, await pauses(rec.audio, mode, frame_ms))
            out["recordings"].append({"name": rec.name, "mode": mode, **s})
            for k in ("false", "missed", "turns"):
                tot[k] += s[k]
            tot["delays"] += s["delays"]
        out["modes"][mode] = tot
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frame-ms", type=int, default=20)
    ap.add_argument("--modes", default="sliding,tumbling",
                    help="comma-separated: sliding, tumbling, sliding@SECONDS (window length); "
                         "-wait after a sliding mode: without the early decision")
    ap.add_argument("--out", default="benchmarks/results/bench_pauses.md")
    args = ap.parse_args()
    command = "python -m benchmarks.bench_pauses " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    mode_list = args.modes.split(",")
    res = asyncio.run(run(args.frame_ms, mode_list))
    modes = res["modes"]
    lines = [
        f"# Pause detection on real speech, sliding vs tumbling ({args.frame_ms} ms frames)",
        "",
        f"Command: `{command}`. {len(res['recordings']) // len(mode_list)} recordings: the 4 speech "
        f"fixtures and {len(SENTENCES)} comma-rich sentences x {len(VOICES)} espeak-ng voices "
        f"x {len(SPEEDS)} speeds ({', '.join(map(str, SPEEDS))} wpm); times are audio time.",
        "",
        "| pause window | turns | false pauses (mid-speech cuts) | missed turns | "
        "delay p50 | delay p95 | delay max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, t in modes.items():
        d = t["delays"]
        lines.append(f"| {mode} | {t['turns']} | {t['false']} | {t['missed']} | "
                     f"{pct(d, 50) * 1e3:.0f} ms | {pct(d, 95) * 1e3:.0f} ms | "
                     f"{max(d) * 1e3 if d else float('nan'):.0f} ms |")
    lines += ["", "Per recording (false pauses / delays in ms):", "",
              "| recording | " + " | ".join(mode_list) + " |",
              "|---|" + "---|" * len(mode_list)]
    by = {(r["name"], r["mode"]): r for r in res["recordings"]}
    for name in dict.fromkeys(r["name"] for r in res["recordings"]):
        cells = []
        for mode in mode_list:
            r = by[(name, mode)]
            cells.append(f"{r['false']} / " + ", ".join(f"{x * 1e3:.0f}" for x in r["delays"])
                         + (f" ({r['missed']} missed)" if r["missed"] else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "sliding" in modes and "tumbling" in modes:
        ok = modes["sliding"]["false"] <= modes["tumbling"]["false"]
        faster = statistics.median(modes["sliding"]["delays"]) < statistics.median(
            modes["tumbling"]["delays"])
        lines += ["", "| target (the default, `sliding`, against `tumbling`) | verdict |",
                  "|---|---|",
                  f"| no more false pauses | {'MET' if ok else 'NOT MET'} |",
                  f"| shorter median delay | {'MET' if faster else 'NOT MET'} |"]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, **res}, indent=1))


if __name__ == "__main__":
    main()
