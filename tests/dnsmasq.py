"""Run a dnsmasq DNS server on 127.0.0.1 with given records, for tests.

Each server listens on its own free UDP and TCP port, serves only the
records it is started with, and is stopped by its PID. Tests that need it
skip when /usr/sbin/dnsmasq is missing. When the environment variable
TRIMTA_REQUIRE_PEERS is set they fail instead, so a CI run cannot pass by
skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

DNSMASQ = "/usr/sbin/dnsmasq"
START_TIMEOUT = 10.0


def require_dnsmasq() -> str:
    """Return the dnsmasq path, or skip the test when dnsmasq is missing.

    With TRIMTA_REQUIRE_PEERS set, a missing dnsmasq fails the test instead.
    """
    if os.access(DNSMASQ, os.X_OK):
        return DNSMASQ
    found = shutil.which("dnsmasq")
    if found:
        return found
    if os.environ.get("TRIMTA_REQUIRE_PEERS"):
        pytest.fail(f"{DNSMASQ} is missing and TRIMTA_REQUIRE_PEERS is set")
    pytest.skip(f"{DNSMASQ} is missing; install the Debian package dnsmasq")


def free_port() -> int:
    """Return a port on 127.0.0.1 that was free for both UDP and TCP."""
    for _attempt in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port on 127.0.0.1 was free for both UDP and TCP")


@contextmanager
def run_dnsmasq(options: Sequence[str], local: str = "test") -> Iterator[int]:
    """Start dnsmasq with extra `options` and yield its port.

    Args:
        options: dnsmasq options such as "--mx-host=a.test,mx.a.test,10".
        local: the domain that dnsmasq serves from its own records only,
            so unknown names under it get NXDOMAIN instead of forwarding.
    """
    binary = require_dnsmasq()
    port = free_port()
    command = [
        binary,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        f"--port={port}",
        f"--local=/{local}/",
        "--pid-file=",
        "--log-facility=-",
        *options,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _wait_until_listening(process, port)
        yield port
    finally:
        _stop(process)


def _wait_until_listening(process: subprocess.Popen, port: int) -> None:
    # dnsmasq binds its TCP socket together with the UDP one, so a TCP
    # connect that succeeds means dnsmasq is ready for queries.
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            error = process.stderr.read().decode(errors="replace")
            raise RuntimeError(f"dnsmasq exited with {process.returncode}: {error}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            time.sleep(0.02)
            continue
        return
    raise RuntimeError(f"dnsmasq did not listen on 127.0.0.1:{port} in time")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
    process.stderr.close()
