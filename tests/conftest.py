"""Shared fixtures: real trimta daemons in child processes."""

from __future__ import annotations

import signal

import pytest

from harness import Daemon, start_daemon


@pytest.fixture
def daemon_factory(tmp_path):
    """Return a function that starts daemons; each is stopped after the test."""
    started: list[Daemon] = []

    def start(name: str = "daemon", **config) -> Daemon:
        daemon = start_daemon(tmp_path / name, **config)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.stop(signal.SIGKILL)
