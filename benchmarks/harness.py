"""What every benchmark here shares: the machine it ran on, the code it measured, a guard
against other load, the report it writes (with its command and commit), a load-generator
process's entry point, and an in-process server.

The server in its own process is `benchmarks.server_process.UvicornProcess`; speech
fixtures are `benchmarks.fixtures`. Nothing here imports the tests (the tests import this).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


# -- the machine and the code -------------------------------------------------------------------
def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info(packages: tuple[str, ...] = ("torch", "onnxruntime", "silero-vad", "websockets", "uvicorn", "uvloop", "httptools", "aiortc")) -> dict[str, Any]:
    """CPU, memory, Python, the versions of `packages`, the GPU (when torch sees one)."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": None,
    }
    with contextlib.suppress(Exception):
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    for pkg in packages:
        info[pkg.replace("-", "_")] = None
        with contextlib.suppress(Exception):
            info[pkg.replace("-", "_")] = version(pkg)
    if "torch" in sys.modules:  # only where the benchmark itself uses torch
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    return info


def code_version(root: Path = REPO_ROOT) -> str:
    """HEAD commit of the source tree `root` (this checkout by default) and whether the
    measured code differs from it (read-only git calls)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "server", "batching", "models"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted server/batching/models changes' if dirty else ''}"


def command_line(module: str | None = None) -> str:
    """How this benchmark was started, as one shell line (`python -m benchmarks.x ...`)."""
    if module is None:
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        module = spec.name if spec is not None else None
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    head = f"python -m {module}" if module else f"python {shlex.quote(sys.argv[0])}"
    return f"{head} {args}".strip()


# -- other load on the machine -----------------------------------------------------------------
def _proc_stat() -> tuple[int, int] | None:
    """(total, idle) jiffies summed over all CPUs, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)


class OtherLoad:
    """CPU load of *other* processes while a block runs: machine-wide busy time from
    /proc/stat minus this process's own CPU time, as a fraction of all CPUs."""

    def __enter__(self) -> OtherLoad:
        self.value: float | None = None
        self._a = _proc_stat()
        self._cpu = time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        b = _proc_stat()
        if self._a is None or b is None or b[0] <= self._a[0]:
            return
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        total = (b[0] - self._a[0]) / hz
        busy = total - (b[1] - self._a[1]) / hz
        self.value = max(0.0, min(1.0, (busy - (time.process_time() - self._cpu)) / total))


def system_busy(interval_s: float = 0.5) -> float | None:
    """Fraction of all CPUs busy over interval_s while this process sleeps, i.e. the load
    from *other* processes (from /proc/stat; None where unavailable)."""
    a = _proc_stat()
    time.sleep(interval_s)
    b = _proc_stat()
    if a is None or b is None or b[0] == a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


def wait_for_idle(max_wait_s: float, threshold: float = 0.10) -> float | None:
    """Wait (up to max_wait_s) until other processes use < threshold of the CPUs."""
    deadline = time.monotonic() + max_wait_s
    busy = system_busy(0.25)
    while busy is not None and busy >= threshold and time.monotonic() < deadline:
        busy = system_busy(0.25)
    return busy


# -- reports -----------------------------------------------------------------------------------
def write_report(md_path: Path, markdown: str, data: dict[str, Any]) -> tuple[Path, Path]:
    """`md_path` and a `.json` beside it; the JSON records the command, the code and when."""
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    data = {"command": command_line(), "code": code_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **data}
    json_path = md_path.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return md_path, json_path


# -- load-generator processes -------------------------------------------------------------------
def client_loop() -> str:
    """The event loop the load-generator processes run (see `child_main`)."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return f"uvloop {uvloop.__version__}"


def child_main(conn: Any, work: Callable[[Any], Awaitable[Any]]) -> None:
    """Entry of a load-generator process: run `work(conn)` on a fresh event loop (uvloop's
    when installed: on a small machine the load generator shares the cores with the server
    it measures, so its own cost should be low); an error goes back to the parent as
    ("error", traceback) instead of dying silently."""
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(work(conn))
        else:
            uvloop.run(work(conn))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            conn.close()


# -- a server in this process ------------------------------------------------------------------
class ServerThread:
    """A real uvicorn server for `app` on a free loopback port, in a background thread."""

    def __init__(self, app: object, **config: Any) -> None:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        config = {"log_level": "warning", "lifespan": "on", "ws_ping_interval": None, **config}
        self.config = uvicorn.Config(app, host="127.0.0.1", port=self.port, **config)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


async def settle(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait until `cond()` holds (polling), or fail."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("did not settle")
        await asyncio.sleep(0.1)
