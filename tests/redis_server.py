"""A throwaway real ``redis-server`` for the tests: loopback only, no persistence, stopped at the end.

Used by the session fixture in test_bank.py (kept out of conftest.py on purpose). ``USERIP_REDIS_URL``
points the tests at an already running server instead; it must be a loopback address, because the tests
create and delete keys. Without redis-server the Redis tests skip locally, but fail under CI (``CI=true``),
so a CI machine that lost its redis-server cannot pass by silently testing nothing.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ENV_URL = "USERIP_REDIS_URL"
LOOPBACK = "127.0.0.1"
START_ATTEMPTS = 3
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server may still lose a race for it: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    """A loopback port nobody listens on (for 'server unreachable' tests)."""
    return free_port()


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def require_redis_server() -> str:
    """Path of redis-server; otherwise skip (locally) or fail (CI) with the reason and the fix."""
    path = shutil.which("redis-server")
    if path is None:
        reason = (
            "redis-server not found on PATH: the Redis bank tests need it "
            "(`make test` installs it: apt-get install -y redis-server), or set "
            f"{ENV_URL}=redis://127.0.0.1:PORT/0 to use a running server"
        )
        if in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path


@dataclass
class RedisServer:
    url: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)


def start_redis_server(workdir: Path) -> RedisServer:
    """Start ``redis-server`` on a free 127.0.0.1 port and wait until it answers PING."""
    exe = require_redis_server()
    workdir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    for attempt in range(START_ATTEMPTS):
        port = free_port()
        log = workdir / f"redis-{port}.log"
        cmd = [exe, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
        cmd += ["--daemonize", "no", "--dir", str(workdir), "--logfile", str(log)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        server = RedisServer(f"redis://{LOOPBACK}:{port}/0", proc, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if ping(LOOPBACK, port):
                return server
            time.sleep(0.05)
        server.stop()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
        problems.append(f"attempt {attempt + 1} (port {port}, exit {proc.returncode}): {err.strip()} {tail.strip()}")
    pytest.fail("could not start redis-server:\n" + "\n".join(problems), pytrace=False)


def redis_session(workdir: Path) -> Iterator[str]:
    """Body of the session fixture: yields a base URL ``redis://127.0.0.1:P/db`` for the Redis tests."""
    url = os.environ.get(ENV_URL, "").strip()
    if url:
        parts = urlsplit(url)
        if parts.scheme != "redis" or not is_loopback(parts.hostname) or parts.query:
            pytest.fail(f"{ENV_URL}={url!r} must be redis://<loopback host>:PORT/DB without parameters", pytrace=False)
        if not ping(parts.hostname or LOOPBACK, parts.port or 6379, timeout=2.0):
            pytest.fail(f"{ENV_URL}={url!r}: no Redis server answers PING there", pytrace=False)
        yield url
        return
    server = start_redis_server(workdir)
    try:
        yield server.url
    finally:
        server.stop()
