"""`trimta queue` against a running daemon and its spool."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time

from harness import daemon_environment, free_port, wait_until
from sink import run_sink


def queue_cli(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trimta", "queue", *args, "--config",
         str(daemon.folder / "trimta.toml")],
        capture_output=True, text=True, timeout=60, env=daemon_environment(),
    )


def send(daemon, sender: str, recipient: str, subject: str = "queued") -> str:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail(sender)
        client.rcpt(recipient)
        code, text = client.data(f"Subject: {subject}\r\n\r\nbody of {subject}\r\n".encode())
    assert code == 250
    return text.decode().rsplit(" ", 1)[-1]



def queue_daemon(daemon_factory, port: int):
    return daemon_factory(
        relay=("example.net",),
        hold=("held.example",),
        extra=f'[routes]\n"example.net" = ["127.0.0.1:{port}"]\n',
    )


def test_list_shows_states_and_summary(daemon_factory):
    daemon = queue_daemon(daemon_factory, free_port())
    held = send(daemon, "alice@example.org", "bob@held.example", "held one")
    deferred = send(daemon, "alice@example.org", "carol@example.net", "deferred one")
    wait_until(lambda: "deferred mid=" in daemon.log(), what="a saved deferral")

    result = queue_cli(daemon, "list", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert listing["version"] == 1
    states = {m["id"]: (m["domain"], m["state"]) for m in listing["messages"]}
    assert states == {held: ("held.example", "held"), deferred: ("example.net", "deferred")}
    entry = next(m for m in listing["messages"] if m["id"] == deferred)
    assert entry["next_attempt"] is not None
    assert "connect failed" in entry["last_error"]
    assert entry["recipients"][0]["address"] == "carol@example.net"

    text = queue_cli(daemon, "list", "held.example")
    assert held in text.stdout
    assert deferred not in text.stdout

    summary = json.loads(queue_cli(daemon, "list", "--summary", "--json").stdout)
    assert [row["domain"] for row in summary["domains"]] == ["example.net", "held.example"]
    assert all(row["count"] == 1 for row in summary["domains"])


def test_show_headers_and_body(daemon_factory):
    daemon = queue_daemon(daemon_factory, free_port())
    mid = send(daemon, "alice@example.org", "bob@held.example", "shown")
    result = queue_cli(daemon, "show", mid)
    assert result.returncode == 0, result.stderr
    assert "Subject: shown" in result.stdout
    assert "body of shown" not in result.stdout
    assert "body of shown" in queue_cli(daemon, "show", mid, "--body").stdout
    assert queue_cli(daemon, "show", "0" * 20).returncode == 1
    assert queue_cli(daemon, "show", "../../etc").returncode == 2


def test_flush_delivers_deferred_mail_now(daemon_factory):
    port = free_port()
    daemon = queue_daemon(daemon_factory, port)
    send(daemon, "alice@example.org", "carol@example.net")
    wait_until(lambda: "deferred mid=" in daemon.log(), what="a saved deferral")
    with run_sink(port=port) as sink:
        result = queue_cli(daemon, "flush", "example.net")
        assert result.returncode == 0, result.stderr
        assert "flush: 1 parts" in result.stdout
        sink.wait_for(1)
    wait_until(lambda: daemon.spool_parts("example.net") == [], what="spool to empty")


def test_flush_held_domain_releases_it(daemon_factory):
    port = free_port()
    daemon = daemon_factory(
        hold=("held.example",),
        extra=f'[routes]\n"held.example" = ["127.0.0.1:{port}"]\n',
    )
    send(daemon, "alice@example.org", "bob@held.example")
    with run_sink(port=port) as sink:
        assert queue_cli(daemon, "flush", "held.example").returncode == 0
        sink.wait_for(1)


def test_hold_and_release_message(daemon_factory):
    port = free_port()
    daemon = queue_daemon(daemon_factory, port)
    mid = send(daemon, "alice@example.org", "carol@example.net")
    wait_until(lambda: "deferred mid=" in daemon.log(), what="a saved deferral")
    assert queue_cli(daemon, "hold", mid).returncode == 0
    [envelope] = daemon.spool_parts("example.net")
    assert envelope["held"] is True
    with run_sink(port=port) as sink:
        assert queue_cli(daemon, "flush").returncode == 0
        time.sleep(1.0)
        assert sink.messages() == []
        listing = json.loads(queue_cli(daemon, "list", "--json").stdout)
        assert listing["messages"][0]["state"] == "held"
        assert queue_cli(daemon, "release", mid).returncode == 0
        sink.wait_for(1)


def test_delete_bounces_unless_silent(daemon_factory):
    daemon = queue_daemon(daemon_factory, free_port())
    loud = send(daemon, "alice@localhost", "bob@held.example", "loud")
    quiet = send(daemon, "dave@localhost", "bob@held.example", "quiet")
    assert queue_cli(daemon, "delete", loud).returncode == 0
    assert queue_cli(daemon, "delete", quiet, "--silent").returncode == 0
    assert daemon.spool_parts("held.example") == []
    [dsn] = daemon.wait_for_mailbox("localhost", "alice")
    assert b"Status: 5.0.0" in dsn
    assert b"deleted from the queue by the administrator" in dsn
    time.sleep(0.5)
    assert daemon.mailbox("localhost", "dave") == []
    assert queue_cli(daemon, "delete", loud).returncode == 1


def test_control_commands_need_a_daemon(daemon_factory):
    daemon = queue_daemon(daemon_factory, free_port())
    mid = send(daemon, "alice@example.org", "bob@held.example")
    assert daemon.stop() == 0
    result = queue_cli(daemon, "flush")
    assert result.returncode == 1
    assert "no trimta daemon is listening" in result.stderr
    assert queue_cli(daemon, "hold", mid).returncode == 1
    # Reading works without a daemon.
    assert mid in queue_cli(daemon, "list").stdout
