"""Run Postfix's smtp-sink on loopback as a next hop that records messages.

smtp-sink (Debian package postfix) answers SMTP, and with -d writes each
transaction it accepts to a file: its envelope as X-Mail-Args and
X-Rcpt-Args lines, a Received: line of its own, then the message as it
arrived, dot-stuffing removed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest

SMTP_SINK = "/usr/sbin/smtp-sink"
START_TIMEOUT = 10.0


def require_smtp_sink() -> None:
    """Skip the test when smtp-sink is missing, or fail if peers are required."""
    if os.access(SMTP_SINK, os.X_OK):
        return
    if os.environ.get("TRIMTA_REQUIRE_PEERS"):
        pytest.fail(f"{SMTP_SINK} is missing and TRIMTA_REQUIRE_PEERS is set")
    pytest.skip(f"{SMTP_SINK} is missing; install the Debian package postfix")


@attrs.frozen
class SinkMessage:
    """One transaction recorded by smtp-sink."""

    sender: str
    recipients: tuple[str, ...]
    message: bytes


@attrs.define
class Sink:
    """A running smtp-sink and the folder it dumps messages into."""

    address: str
    port: int
    dumps: Path
    process: subprocess.Popen

    def messages(self) -> list[SinkMessage]:
        """Return every recorded transaction, oldest first."""
        found = []
        for path in sorted(self.dumps.iterdir(), key=lambda p: p.stat().st_mtime_ns):
            found.append(_parse_dump(path.read_bytes()))
        return found

    def wait_for(self, count: int, timeout: float = 20.0) -> list[SinkMessage]:
        """Wait until `count` transactions are recorded and return them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(list(self.dumps.iterdir())) >= count and self._dumps_settled():
                return self.messages()
            time.sleep(0.05)
        raise AssertionError(
            f"smtp-sink recorded {len(list(self.dumps.iterdir()))} messages "
            f"after {timeout}s, expected {count}"
        )

    def _dumps_settled(self) -> bool:
        """Return whether no dump grew in 0.1 s and each names a recipient.

        smtp-sink writes a dump while the transaction runs, so a dump that
        exists may still lack its recipients or the end of its message.
        """
        sizes = {path: path.stat().st_size for path in self.dumps.iterdir()}
        time.sleep(0.1)
        for path, size in sizes.items():
            if path.stat().st_size != size:
                return False
            if not _parse_dump(path.read_bytes()).recipients:
                return False
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def _parse_dump(raw: bytes) -> SinkMessage:
    sender = ""
    recipients = []
    lines = raw.split(b"\n")
    index = 0
    while index < len(lines) and lines[index].startswith(b"X-"):
        name, _, value = lines[index].partition(b": ")
        text = value.decode("utf-8", "replace").strip()
        if name == b"X-Mail-Args":
            sender = text.split()[0].strip("<>")
        elif name == b"X-Rcpt-Args":
            recipients.append(text.split()[0].strip("<>"))
        index += 1
    # Skip smtp-sink's own Received: header and its folded lines.
    index += 1
    while index < len(lines) and lines[index].startswith((b"\t", b" ")):
        index += 1
    message = b"\n".join(lines[index:])
    # smtp-sink ends each dump with one empty line of its own.
    if message.endswith(b"\n\n"):
        message = message[:-1]
    return SinkMessage(sender, tuple(recipients), message)


@contextmanager
def run_sink(
    folder: Path | None = None,
    *,
    address: str = "127.0.0.1",
    port: int | None = None,
    options: Sequence[str] = (),
) -> Iterator[Sink]:
    """Start smtp-sink on `address` and yield it; stop it by its PID after."""
    require_smtp_sink()
    # smtp-sink writes as the user "nobody", who cannot enter pytest's
    # private temporary folders, so the dumps go to a folder of their own.
    dumps = Path(tempfile.mkdtemp(prefix="trimta-sink-"))
    dumps.chmod(0o777)
    if port is None:
        port = _free_port(address)
    command = [
        SMTP_SINK, "-u", "nobody", "-d", f"{dumps}/%Y%m%d%H%M%S.",
        *options, f"{address}:{port}", "100",
    ]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    sink = Sink(address, port, dumps, process)
    try:
        _wait_until_listening(process, address, port)
        yield sink
    finally:
        sink.stop()
        shutil.rmtree(dumps, ignore_errors=True)


def _free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def _wait_until_listening(process: subprocess.Popen, address: str, port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"smtp-sink exited with {process.returncode} at start")
        try:
            with socket.create_connection((address, port), timeout=1) as probe:
                probe.recv(512)
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"smtp-sink did not listen on {address}:{port}")
