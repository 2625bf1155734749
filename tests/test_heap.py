"""`models.device.release_freed_memory`: large freed blocks go back to the OS, so a voice
server's RSS does not keep the holes its bursts leave (each case in its own process: glibc's
settings are process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A 4 MiB block mapped and freed (glibc then raises its mmap threshold to 4 MiB), then 64
# blocks of 1 MiB, each followed by a small block that stays alive (as session objects do
# between audio buffers), then the 1 MiB blocks freed: how many MiB stay resident?
_HOLES = """
import ctypes, sys
import psutil
from models.device import release_freed_memory
print(release_freed_memory() if sys.argv[1] == "release" else "default")
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def touched(n):
    p = libc.malloc(n)
    libc.memset(p, 1, n)
    return p
libc.free(touched(4 << 20))
proc = psutil.Process()
before = proc.memory_info().rss
blocks, pins = [], []
for _ in range(64):
    blocks.append(touched(1 << 20))
    pins.append(touched(1000))
for b in blocks:
    libc.free(b)
print((proc.memory_info().rss - before) >> 20)
"""


def _run(script: str, *args: str, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_large_blocks_leave_no_resident_holes() -> None:
    released = _run(_HOLES, "release")
    default = _run(_HOLES, "default")
    off = _run(_HOLES, "release", BATCHRTC_KEEP_HEAP="0")
    assert released[0] == "True" and int(released[1]) < 8, released
    # The control: glibc's default keeps the 64 MiB of holes resident.
    assert int(default[1]) > 48, default
    assert off[0] == "False" and int(off[1]) > 48, off  # BATCHRTC_KEEP_HEAP=0: glibc's defaults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_process_that_keeps_freed_memory_is_left_as_it_is() -> None:
    """A CPU detector's `keep_freed_memory` wins over the voice path's release, whichever
    comes first."""
    script = ("from models.device import keep_freed_memory, release_freed_memory\n"
              "import sys\n"
              "if sys.argv[1] == 'keep-first':\n"
              "    print(keep_freed_memory(), release_freed_memory())\n"
              "else:\n"
              "    print(release_freed_memory(), keep_freed_memory())\n")
    assert _run(script, "keep-first") == ["True", "False"]
    assert _run(script, "release-first") == ["True", "True"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_the_vad_engine_and_an_audio_stream_apply_it() -> None:
    """Any process that runs the VAD (the server, an engine process, a Ray replica) and any
    audio `Stream` at startup (front-end workers too) release freed memory; a video one does
    not (its detector may keep it)."""
    script = """
import asyncio, sys
import models.device as device
if sys.argv[1] == "engine":
    from server.vad_engine import VADEngine
    VADEngine(device="cpu").close()
else:
    from server import Stream
    from server.handlers import StreamHandler
    class Quiet(StreamHandler):
        def receive(self, frame): pass
        def emit(self): return None
        def copy(self): return Quiet()
    def frames(frame): return frame
    stream = Stream(Quiet() if sys.argv[1] == "audio" else frames,
                    modality="audio" if sys.argv[1] == "audio" else "video", mode="send-receive")
    async def start():
        async with stream.router.lifespan_context(stream):
            pass
    asyncio.run(start())
print(device._heap_released)
"""
    assert _run(script, "engine") == ["True"]
    assert _run(script, "audio") == ["True"]
    assert _run(script, "video") == ["None"]
