"""A uvicorn server in its own process, on a free loopback port, for the load benchmarks.

The server is a separate process so its CPU is measured apart from the load generators'.
It runs in its own session (a Ctrl-C to the benchmark does not hit it first), logs to a
temporary file, and is stopped by its own pid.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UvicornProcess:
    def __init__(
        self,
        app_args: list[str],
        env: dict[str, str],
        *,
        name: str,
        prefix: list[str] | None = None,
        log_dir: Path | None = None,
        start_timeout_s: float = 60.0,
        python: str | None = None,
        root: Path | None = None,
    ) -> None:
        """`app_args`: uvicorn's arguments without `--port`; `prefix`: e.g. `taskset -c 0-3`;
        `python`: another environment's interpreter (default: this one); `root`: the source
        tree the server imports from (default: this checkout; e.g. a `git worktree` of an
        earlier commit, to compare against it in one run)."""
        self.port = free_port()
        self.python = python or sys.executable
        self.root = root or REPO_ROOT
        self.argv = [*(prefix or []), self.python, "-m", "uvicorn", *app_args, "--port", str(self.port)]
        self.env = {**os.environ, **env}
        self.env["PYTHONPATH"] = str(self.root) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.name = name
        self.log_dir = log_dir
        self.start_timeout_s = start_timeout_s
        self.log_path: Path | None = None
        self.proc: subprocess.Popen | None = None

    def command_line(self, env_keys: tuple[str, ...]) -> str:
        """The command as a person would type it, with the environment that matters."""
        envs = " ".join(f"{k}={self.env[k]}" for k in env_keys if k in self.env)
        i = self.argv.index(self.python)
        pre = " ".join(shlex.quote(a) for a in self.argv[:i])
        rest = " ".join(shlex.quote(a) for a in self.argv[i + 1 :])
        python = "python" if self.python == sys.executable else self.python
        return " ".join(p for p in (envs, pre, python, rest) if p)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _spawned(self) -> None:
        """Hook: runs right after the process starts, before it accepts connections."""

    def start(self) -> UvicornProcess:
        fd, name = tempfile.mkstemp(prefix=f"{self.name}_", suffix=".log", dir=self.log_dir)
        self.log_path = Path(name)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self._spawned()
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} at start:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not accept connections in {self.start_timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.terminate()  # only our own child, by its pid
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def cleanup_log(self) -> None:
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> UvicornProcess:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_workers(base_url: str, workers: int, timeout_s: float) -> dict:
    """Poll `/health` until the engine process answers with `workers` front ends connected
    (`uvicorn --workers N` binds the port before its workers have loaded the app)."""
    import json
    import urllib.request

    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as r:
                body = json.loads(r.read())
            engine = body.get("engine") or {}
            if engine.get("up") and engine.get("workers") == workers:
                return body
            last = body
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.25)
    raise RuntimeError(f"{workers} workers and the engine were not up in {timeout_s} s: {last}")
