"""End-to-end batched VAD engine: resample 48 kHz -> 16 kHz + re-frame + Silero, per batch.

Measures the engine's batch function (what the batcher worker runs, with the engine's own
torch thread count: 1 on CPU) at several numbers of streams, each pushing one 0.6 s
ReplyOnPause chunk at 48 kHz, and checks its probabilities against the package's TorchScript
model run one stream at a time (32 streams at 16 kHz, random chunk sizes).

    python -m benchmarks.bench_vad_engine --device cuda --streams 1,64,256,1024,4096,16384
    python -m benchmarks.bench_vad_engine --device cpu --streams 1,16,64,256

Writes ``benchmarks/results/bench_vad_engine_<device>.md`` and ``.json`` (with the command).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from server.vad_engine import VADEngine, _Work
from benchmarks.fixtures import SPEECH_FIXTURES, load_wav


def reference_probs(x16: np.ndarray) -> np.ndarray:
    import silero_vad

    threads = torch.get_num_threads()
    model = silero_vad.load_silero_vad()
    torch.set_num_threads(threads)
    model.reset_states()
    out = []
    for i in range(0, len(x16) - 511, 512):
        out.append(model(torch.from_numpy(x16[i : i + 512]), 16000).item())
    return np.array(out)


async def accuracy(device: str) -> float:
    """32 streams through the engine at 16 kHz with odd chunk sizes vs TorchScript."""
    eng = VADEngine(device=device, capacity=64)
    streams, refs, audio = [], [], []
    for i in range(32):
        _, x = load_wav(SPEECH_FIXTURES[i % len(SPEECH_FIXTURES)])
        x = x[i * 37 :].astype(np.float32) / 32768
        audio.append(x)
        refs.append(reference_probs(x))
        streams.append(eng.open_stream(16000))
    got = [[] for _ in streams]
    pos = [0] * 32
    rng = np.random.default_rng(0)
    while any(p < len(a) for p, a in zip(pos, audio)):
        tasks = []
        for i, s in enumerate(streams):
            n = int(rng.integers(100, 3000))
            chunk = audio[i][pos[i] : pos[i] + n]
            pos[i] += n
            if chunk.size:
                tasks.append((i, s.process(chunk)))
        for i, probs in zip([t[0] for t in tasks], await asyncio.gather(*(t[1] for t in tasks))):
            got[i].append(probs)
    err = 0.0
    for g, r in zip(got, refs):
        g = np.concatenate(g)[: len(r)]
        err = max(err, float(np.abs(g - r[: len(g)]).max()))
    eng.close()
    return err


@contextlib.contextmanager
def engine_threads(eng: VADEngine) -> Iterator[None]:
    """Run on this thread with the torch thread count the engine's worker thread uses."""
    before = torch.get_num_threads()
    if eng.threads is not None:
        torch.set_num_threads(eng.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def throughput(device: str, n_streams: int, iters: int) -> dict:
    eng = VADEngine(device=device, capacity=max(n_streams, 1))
    rng = np.random.default_rng(1)
    streams = [eng.open_stream(48000) for _ in range(n_streams)]
    chunk = 28800  # 0.6 s at 48 kHz
    times = []
    for it in range(iters + 3):
        items = []
        for s in streams:
            before = s._pending
            total = before + chunk // 3
            s._pending = total % 512
            x = (rng.standard_normal(chunk) * 0.05).astype(np.float32)
            items.append(_Work(s, 48000, x, before, total // 512, s.generation, s.hist_generation))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        with engine_threads(eng):
            t0 = time.perf_counter()
            eng._run_batch(items)  # returns host probabilities: includes the copy back
            dt = time.perf_counter() - t0
        if it >= 3:
            times.append(dt)
    threads = eng.threads
    eng.close()
    med = statistics.median(times)
    windows = n_streams * (chunk // 3) / 512
    return {
        "streams": n_streams,
        "batch_ms": med * 1000,
        "audio_s_per_s": n_streams * 0.6 / med,
        "windows_per_s": windows / med,
        "realtime_streams": n_streams * 0.6 / med,
        "iters": len(times),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
    }


def platform_cpu() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--streams", default="1,16,64,256,1024")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/bench_vad_engine_{device}.md")
    args = ap.parse_args()
    command = "python -m benchmarks.bench_vad_engine " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    dev = args.device
    err = asyncio.run(accuracy(dev))
    rows = [throughput(dev, int(n), args.iters) for n in args.streams.split(",")]
    if dev.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
    else:
        name = f"CPU ({platform_cpu()}, {rows[0]['torch_threads']} torch thread(s), the engine's setting)"
    lines = [
        f"# Batched VAD engine (resample + re-frame + Silero) on {name}, torch {torch.__version__}",
        "",
        f"Command: `{command}` ({args.iters} timed batches per row, median)",
        "",
        f"Accuracy: 32 streams, random chunk sizes, max |p - TorchScript| = {err:.2e}",
        "",
        "| streams (one 0.6 s chunk each) | batch ms (median) | VAD windows/s | real-time streams |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['streams']} | {r['batch_ms']:.2f} | {r['windows_per_s']:,.0f} | {r['realtime_streams']:,.0f} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out.format(device=dev.replace(":", "")))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "device": name, "torch": torch.__version__, "max_abs_err": err,
         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
