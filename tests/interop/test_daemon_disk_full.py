"""A full spool file system: 452 4.3.1, no partial files, service resumes."""

from __future__ import annotations

import os
import smtplib
import subprocess

import pytest

from harness import Daemon, free_port, toml_config


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a 4 MiB tmpfs that the test owns; skip where mounting is denied."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(path, chunk=64 * 1024) -> None:
    """Write zeros into `path` until the file system is full."""
    # Unbuffered, so that no unwritten rest makes close() fail once full
    # (the last write fits only in part when the free space is not a
    # multiple of the chunk).
    with open(path, "wb", buffering=0) as filler:
        try:
            while filler.write(b"\0" * chunk):
                pass
        except OSError:
            pass


def send(port: int, body: bytes):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        client.rcpt("bob@example.net")
        return client.data(body)


def test_full_spool_answers_452_and_recovers(tmp_path, small_tmpfs):
    folder = tmp_path / "daemon"
    folder.mkdir()
    port = free_port()
    config = toml_config(folder, port, relay=("example.net",))
    config = config.replace(str(folder / "spool"), str(small_tmpfs / "spool"))
    (folder / "trimta.toml").write_text(config)
    daemon = Daemon(folder, port)
    daemon.start()
    try:
        filler = small_tmpfs / "filler"
        fill(filler)
        body = b"Subject: full\r\n\r\n" + (b"y" * 998 + b"\r\n") * 300
        code, text = send(port, body)
        assert code == 452, text
        assert text.startswith(b"4.3.1")

        spool = small_tmpfs / "spool"
        assert os.listdir(spool / "tmp") == []
        domain = spool / "domains" / "example.net"
        leftovers = os.listdir(domain) if domain.exists() else []
        assert leftovers == []

        filler.unlink()
        code, text = send(port, body)
        assert code == 250, text
        assert len(list(domain.glob("*.env"))) == 1
        assert daemon.stop() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.kill()
