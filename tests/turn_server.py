"""A real coturn `turnserver` on loopback for tests: TURN REST (shared-secret) auth, UDP only,
loopback peers allowed, its log to a file the test can read."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aioice import stun

REALM = "batchrtc.test"


@dataclass
class TurnServer:
    host: str
    port: int
    secret: str
    log_path: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"turn:{self.host}:{self.port}?transport=udp"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _free_port() -> int:
    """A port free for both UDP and TCP on loopback (coturn listens on both)."""
    for _ in range(50):
        port = random.randint(20000, 40000)
        with contextlib.ExitStack() as stack:
            try:
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    s = stack.enter_context(socket.socket(socket.AF_INET, kind))
                    s.bind(("127.0.0.1", port))
                    # coturn's RFC 5780 alt port is port + 1; disabled below, checked anyway
                    s2 = stack.enter_context(socket.socket(socket.AF_INET, kind))
                    s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for turnserver")


def _answers_stun(port: int) -> bool:
    req = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        try:
            s.sendto(bytes(req), ("127.0.0.1", port))
            data, _ = s.recvfrom(2048)
        except OSError:
            return False
    return stun.parse_message(data).transaction_id == req.transaction_id


@contextlib.contextmanager
def run_turnserver(workdir: Path) -> Iterator[TurnServer]:
    exe = shutil.which("turnserver")
    if exe is None:
        raise FileNotFoundError("turnserver")
    port = _free_port()
    relay_lo = random.randrange(41000, 60000, 200)
    secret = secrets.token_hex(16)
    log_path = workdir / "turnserver.log"
    cmd = [
        exe, "-n",  # no config file: everything is on this line
        "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={port}",
        f"--min-port={relay_lo}", f"--max-port={relay_lo + 199}",
        "--use-auth-secret", f"--static-auth-secret={secret}", f"--realm={REALM}",
        "--no-tls", "--no-dtls", "--no-tcp-relay", "--no-rfc5780",
        "--allow-loopback-peers",  # both peers' relays are on 127.0.0.1
        "--no-cli", "--log-file=stdout", "--simple-log", "--verbose",
        f"--pidfile={workdir / 'turnserver.pid'}", f"--userdb={workdir / 'turndb'}",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not _answers_stun(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"turnserver did not start (rc={proc.poll()}):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield TurnServer("127.0.0.1", port, secret, log_path, proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
