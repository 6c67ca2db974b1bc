"""Run a real trimta daemon in a child process for end-to-end tests.

Each daemon gets its own folder (config, spool, Maildirs) and a free port
on 127.0.0.1. Tests talk to it with real clients (smtplib, swaks,
run_case.py) and stop it by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import attrs

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def toml_config(
    folder: Path,
    port: int,
    *,
    local: tuple[str, ...] = ("localhost",),
    relay: tuple[str, ...] = (),
    hold: tuple[str, ...] = (),
    trusted: tuple[str, ...] = (),
    extra: str = "",
) -> str:
    """Build a TOML configuration for a daemon rooted in `folder`."""
    return f"""
hostname = "mx.trimta.test"
spool = {json.dumps(str(folder / "spool"))}

[[listener]]
address = "127.0.0.1:{port}"

[domains]
local = {json.dumps(list(local))}
relay = {json.dumps(list(relay))}
hold = {json.dumps(list(hold))}

[relay]
trusted_networks = {json.dumps(list(trusted))}

[local]
maildir_root = {json.dumps(str(folder / "mail"))}
{extra}
"""


@attrs.define
class Daemon:
    """A trimta daemon running as a child process.

    Attributes:
        folder: Holds trimta.toml, spool/, mail/ and the stderr log.
        port: The SMTP port on 127.0.0.1.
    """

    folder: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def spool(self) -> Path:
        return self.folder / "spool"

    @property
    def mail(self) -> Path:
        return self.folder / "mail"

    @property
    def log_path(self) -> Path:
        return self.folder / "trimta.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> None:
        """Start the daemon and wait until it logs that it started."""
        log = open(self.log_path, "ab")
        offset = log.tell()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trimta", "serve", "--config",
             str(self.folder / "trimta.toml"), "--log-level", "DEBUG"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=self.folder,
            env=daemon_environment(),
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"trimta exited at start:\n{self.log()}")
            if "started hostname=" in self.log()[offset:]:
                return
            time.sleep(0.05)
        raise RuntimeError(f"trimta did not start in {START_TIMEOUT}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send a signal to the daemon and return its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
            raise

    def kill(self) -> None:
        """SIGKILL the daemon, as a crash would end it."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(STOP_TIMEOUT)

    def spool_parts(self, domain: str) -> list[dict]:
        """Return the envelopes stored for one domain, oldest first."""
        folder = self.spool / "domains" / domain
        if not folder.is_dir():
            return []
        return [
            json.loads(path.read_text())
            for path in sorted(folder.glob("*.env"))
        ]

    def mailbox(self, domain: str, mailbox: str) -> list[bytes]:
        """Return the messages delivered into one Maildir's new/, oldest first."""
        folder = self.mail / domain / mailbox / "new"
        if not folder.is_dir():
            return []
        return [path.read_bytes() for path in sorted(folder.iterdir())]

    def wait_for_mailbox(self, domain: str, mailbox: str, count: int = 1,
                         timeout: float = 10.0) -> list[bytes]:
        """Wait until a Maildir contains `count` messages and return them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            messages = self.mailbox(domain, mailbox)
            if len(messages) >= count:
                return messages
            time.sleep(0.05)
        raise AssertionError(
            f"{domain}/{mailbox} holds {len(self.mailbox(domain, mailbox))} "
            f"messages after {timeout}s, expected {count}\n{self.log()}"
        )


def start_daemon(folder: Path, **config) -> Daemon:
    """Write a configuration into `folder` and start a daemon on it."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (folder / "trimta.toml").write_text(toml_config(folder, port, **config))
    daemon = Daemon(folder, port)
    daemon.start()
    return daemon


def daemon_environment() -> dict[str, str]:
    """Return the environment that runs this checkout's trimta, not an installed one."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def environment_without_proxy() -> dict[str, str]:
    """Return the environment for client tools, minus proxy settings."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `predicate` every 50 ms until it is true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
