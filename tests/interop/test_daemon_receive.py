"""The daemon end to end: real clients in, spool and Maildir out."""

from __future__ import annotations

import email
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time

import pytest

from harness import daemon_environment, environment_without_proxy, wait_until

SWAKS = "/usr/bin/swaks"


def send(daemon, sender, recipients, body: bytes, source: str = "127.0.0.1"):
    with smtplib.SMTP("127.0.0.1", daemon.port, source_address=(source, 0),
                      timeout=30) as client:
        return client.sendmail(sender, recipients, body)


def queue_id_of(reply_text: str) -> str:
    return reply_text.rsplit(" ", 1)[-1]


@pytest.mark.skipif(not __import__("os").path.exists(SWAKS), reason="swaks missing")
def test_swaks_message_lands_in_maildir(daemon_factory):
    daemon = daemon_factory()
    result = subprocess.run(
        [SWAKS, "--to", "user@localhost", "--server", f"127.0.0.1:{daemon.port}",
         "--body", "hello from swaks\nsecond line"],
        capture_output=True, text=True, timeout=60, env=environment_without_proxy(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0" in result.stdout
    assert "queued as" in result.stdout

    messages = daemon.wait_for_mailbox("localhost", "user")
    assert len(messages) == 1
    text = messages[0]
    assert text.startswith(b"Return-Path: <")
    assert b"Delivered-To: user@localhost\r\n" in text or b"Delivered-To: user@localhost\n" in text
    assert b"hello from swaks" in text
    assert b"second line" in text


def test_smtplib_multiple_mailboxes(daemon_factory):
    daemon = daemon_factory()
    body = b"Subject: two\r\n\r\nline one\r\n.leading dot\r\n"
    refused = send(daemon, "alice@example.net", ["bob@localhost", "carol@localhost"], body)
    assert refused == {}
    for mailbox in ("bob", "carol"):
        [message] = daemon.wait_for_mailbox("localhost", mailbox)
        parsed = email.message_from_bytes(message)
        assert parsed["Return-Path"] == "<alice@example.net>"
        assert parsed["Delivered-To"] == f"{mailbox}@localhost"
        assert parsed["Subject"] == "two"
        assert b"line one\r\n.leading dot\r\n" in message or b"line one\n.leading dot\n" in message
        assert parsed["Received"].startswith("from ")


def test_final_reply_names_queue_id(daemon_factory):
    daemon = daemon_factory(relay=("example.net",))
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        client.rcpt("bob@example.net")
        code, text = client.data(b"Subject: id\r\n\r\nbody\r\n")
    assert code == 250
    mid = queue_id_of(text.decode())
    [envelope] = daemon.spool_parts("example.net")
    assert envelope["id"] == mid
    assert envelope["sender"] == "alice@example.org"
    assert [r["address"] for r in envelope["recipients"]] == ["bob@example.net"]


def test_relay_refused_for_untrusted_client(daemon_factory):
    daemon = daemon_factory(trusted=("127.0.0.1/32",))
    with smtplib.SMTP("127.0.0.1", daemon.port, source_address=("127.0.0.2", 0),
                      timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        code, text = client.rcpt("bob@example.net")
    assert code == 550
    assert text.startswith(b"5.7.1")
    assert daemon.spool_parts("example.net") == []


def test_relay_allowed_for_trusted_client(daemon_factory):
    daemon = daemon_factory(trusted=("127.0.0.1/32",))
    refused = send(daemon, "alice@example.org", ["bob@example.net"], b"Subject: r\r\n\r\nx\r\n")
    assert refused == {}
    [envelope] = daemon.spool_parts("example.net")
    assert envelope["recipients"][0]["address"] == "bob@example.net"


@pytest.mark.parametrize(
    "recipient",
    [
        "user%example.net@localhost",
        '"user@example.net"@localhost',
        "example.net!user@localhost",
    ],
)
def test_relay_tricks_stay_local(daemon_factory, recipient):
    daemon = daemon_factory()
    refused = send(daemon, "a@example.org", [recipient], b"Subject: t\r\n\r\nx\r\n")
    assert refused == {}
    assert not (daemon.spool / "domains" / "example.net").exists()


@pytest.mark.parametrize(
    "recipient",
    ["user@example.net@localhost", "@localhost:user@example.net", "user@EXAMPLE.NET."],
)
def test_relay_tricks_refused(daemon_factory, recipient):
    daemon = daemon_factory()
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail("a@example.org")
        code, _ = client.rcpt(recipient)
    assert code >= 500
    assert not (daemon.spool / "domains" / "example.net").exists()


# Look-alikes of the local domain "localhost" (a Cyrillic "о", in UTF-8
# and as its A-label), and an upper-case remote domain.
@pytest.mark.parametrize(
    "recipient",
    ["user@l\u043ecalhost", "user@xn--lcalhost-nbh", "user@EXAMPLE.NET"],
)
def test_look_alike_domains_not_relayed(daemon_factory, recipient):
    daemon = daemon_factory()
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail("a@example.org", ["SMTPUTF8"])
        code, text = client.rcpt(recipient)
    assert code == 550
    assert text.startswith(b"5.7.1")
    assert os.listdir(daemon.spool / "domains") == []


def test_unknown_user_rejected(daemon_factory):
    daemon = daemon_factory(extra='[local.users]\n"localhost" = ["alice"]\n')
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail("a@example.org")
        unknown = client.rcpt("mallory@localhost")
        known = client.rcpt("ALICE@localhost")
        postmaster = client.rcpt("postmaster@localhost")
    assert unknown[0] == 550
    assert unknown[1].startswith(b"5.1.1")
    assert known[0] == 250
    assert postmaster[0] == 250


@pytest.mark.parametrize(
    "local_part",
    ['"../../etc"', '".hidden"', '"A/B"', '".."', '"a\\\\b"', "Zoë"],
)
def test_hostile_local_parts_stay_inside_root(daemon_factory, local_part):
    daemon = daemon_factory()
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.example.org")
        options = ["SMTPUTF8"] if not local_part.isascii() else []
        client.mail("a@example.org", options)
        code, _ = client.rcpt(f"{local_part}@localhost")
        assert code == 250
        code, _ = client.data(b"Subject: hostile\r\n\r\nx\r\n")
        assert code == 250
    root = (daemon.mail / "localhost").resolve()
    deadline_messages = []
    for _ in range(200):
        deadline_messages = [p for p in daemon.mail.rglob("*") if p.parent.name == "new"]
        if deadline_messages:
            break
        __import__("time").sleep(0.05)
    assert len(deadline_messages) == 1
    delivered = deadline_messages[0].resolve()
    assert root in delivered.parents
    mailbox = delivered.parent.parent
    assert mailbox.parent == root
    assert not mailbox.name.startswith(".")
    assert sorted(p.name for p in daemon.folder.iterdir()) == [
        "mail", "spool", "trimta.log", "trimta.toml"
    ]


def test_message_survives_sigkill_after_250(daemon_factory):
    daemon = daemon_factory(relay=("example.net",))
    body = b"Subject: durable\r\n\r\n" + (b"x" * 998 + b"\r\n") * 100
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        client.rcpt("bob@example.net")
        client.rcpt("carol@localhost")
        code, text = client.data(body)
        assert code == 250
        # Kill before QUIT and before local delivery can be relied upon.
        daemon.kill()
    mid = queue_id_of(text.decode())
    [envelope] = daemon.spool_parts("example.net")
    assert envelope["id"] == mid
    stored = (daemon.spool / "domains" / "example.net" / f"{mid}.eml").read_bytes()
    assert stored.endswith(body)

    daemon.start()
    [message] = daemon.wait_for_mailbox("localhost", "carol")
    assert message.endswith(body)
    assert daemon.stop() == 0


def test_sigterm_stops_cleanly(daemon_factory):
    daemon = daemon_factory()
    client = smtplib.SMTP("127.0.0.1", daemon.port, timeout=30)
    client.ehlo("client.example.org")
    assert daemon.stop(signal.SIGTERM) == 0
    # The idle session was told the server is going away.
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
        client.noop()
    assert "stopping on SIGTERM" in daemon.log()


def test_port_in_use_exits_1(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "trimta.toml"
        config.write_text(
            f'spool = "{tmp_path}/spool"\n[[listener]]\naddress = "127.0.0.1:{port}"\n'
        )
        result = subprocess.run(
            [sys.executable, "-m", "trimta", "serve", "--config", str(config)],
            capture_output=True, text=True, timeout=60, env=daemon_environment(),
        )
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_session_limit_per_client(daemon_factory):
    daemon = daemon_factory(extra="[limits]\nmax_sessions_per_client = 2\n")
    first = smtplib.SMTP("127.0.0.1", daemon.port, timeout=30)
    second = smtplib.SMTP("127.0.0.1", daemon.port, timeout=30)
    with pytest.raises(smtplib.SMTPConnectError) as caught:
        smtplib.SMTP("127.0.0.1", daemon.port, timeout=30)
    assert caught.value.smtp_code == 421
    other = smtplib.SMTP("127.0.0.1", daemon.port, source_address=("127.0.0.3", 0),
                         timeout=30)
    assert other.noop()[0] == 250
    for client in (first, second, other):
        client.quit()


def test_slow_client_closed_by_command_deadline(daemon_factory):
    daemon = daemon_factory(extra='[limits]\ncommand_timeout = "2s"\n')
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        assert sock.recv(1024).startswith(b"220")
        # One byte every half second never completes a line within 2s.
        received = b""
        for byte in b"NOOP and more text":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            __import__("time").sleep(0.5)
            sock.setblocking(False)
            try:
                received += sock.recv(1024)
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
            if received:
                break
    assert received.startswith(b"421 4.4.2")


def test_client_that_never_reads_is_closed(daemon_factory):
    daemon = daemon_factory(extra='[limits]\ncommand_timeout = "2s"\n')
    sock = socket.socket()
    # A small receive window makes the daemon's replies back up quickly.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", daemon.port))
    sock.setblocking(False)
    noops = b"NOOP\r\n" * 1000
    closed = False
    deadline = time.monotonic() + 30
    with sock:
        while not closed and time.monotonic() < deadline:
            try:
                sock.send(noops)
            except BlockingIOError:
                time.sleep(0.05)
            except OSError:
                closed = True
    assert closed, "the session stayed open although the client never read"
    wait_until(lambda: "timeout sid=" in daemon.log(), what="the timeout log line")


def test_command_flood_leaves_other_sessions_served(daemon_factory):
    daemon = daemon_factory()
    flood = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    replies = 0
    stop = threading.Event()

    def read_flood_replies():
        nonlocal replies
        while not stop.is_set():
            try:
                data = flood.recv(65536)
            except OSError:
                return
            if not data:
                return
            replies += data.count(b"\r\n250 ")

    def send_flood():
        try:
            flood.sendall(b"NOOP\r\n" * 1_000_000)
        except OSError:
            pass

    threads = [threading.Thread(target=read_flood_replies), threading.Thread(target=send_flood)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: replies > 1000, what="the flood to be answered")
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=60) as client:
            client.sendmail("a@example.org", ["user@localhost"], b"Subject: probe\r\n\r\nx\r\n")
        answered_before_probe_done = replies
    finally:
        stop.set()
        # shutdown wakes the thread blocked in sendall; close alone does not.
        flood.shutdown(socket.SHUT_RDWR)
        flood.close()
        for thread in threads:
            thread.join(30)
    # A session's turn is one slice of commands (about 700 NOOPs), so the
    # probe's few steps cost the flood a few thousand replies, not a read
    # of 64 KiB (11,000 NOOPs) per step.
    assert answered_before_probe_done < 50_000, answered_before_probe_done


def test_engine_replies_restart_command_deadline(daemon_factory):
    daemon = daemon_factory(extra='[limits]\ncommand_timeout = "2s"\n')
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        # Each NOOP comes 1 s after the previous reply: 5 s in all, well
        # past one command_timeout, and the session stays open.
        for _ in range(5):
            time.sleep(1.0)
            assert client.noop()[0] == 250
        # Then silence: the 421 is waiting when the next command goes out.
        time.sleep(3.0)
        assert client.noop()[0] == 421


def test_transaction_past_shutdown_grace_gets_421(daemon_factory):
    daemon = daemon_factory(relay=("example.net",), extra='[limits]\nshutdown_grace = "1s"\n')
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as client:
        assert client.recv(1024).startswith(b"220")
        client.sendall(b"EHLO busy.example.org\r\n")
        assert client.recv(4096).startswith(b"250")
        client.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
        received = b""
        while received.count(b"\r\n") < 2:
            received += client.recv(4096)
        daemon.process.send_signal(signal.SIGTERM)
        # The session stays in its transaction until the grace is over.
        assert client.recv(1024).startswith(b"421 4.3.2")
    assert daemon.process.wait(30) == 0
    assert daemon.spool_parts("example.net") == []


def test_sigterm_gives_open_transaction_grace(daemon_factory):
    daemon = daemon_factory(relay=("example.net",), extra='[limits]\nshutdown_grace = "20s"\n')
    idle = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    assert idle.recv(1024).startswith(b"220")
    idle.sendall(b"EHLO idle.example.org\r\n")
    assert idle.recv(4096).startswith(b"250")

    busy = smtplib.SMTP("127.0.0.1", daemon.port, timeout=30)
    busy.ehlo("busy.example.org")
    busy.mail("alice@example.org")
    busy.rcpt("bob@example.net")

    daemon.process.send_signal(signal.SIGTERM)
    # The idle session is told at once that the server is going away.
    assert idle.recv(1024).startswith(b"421 4.3.2")
    idle.close()

    # The session in a transaction may still finish its message.
    code, _ = busy.data(b"Subject: grace\r\n\r\nbody\r\n")
    assert code == 250
    busy.close()
    assert daemon.process.wait(30) == 0
    assert len(daemon.spool_parts("example.net")) == 1


def test_sigterm_right_after_accept_loses_and_repeats_nothing(daemon_factory):
    daemon = daemon_factory()
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        for index in range(5):
            client.sendmail("a@example.org", [f"race{index}@localhost"], b"Subject: race\r\n\r\nx\r\n")
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(30) == 0, daemon.log()
    assert "Traceback" not in daemon.log()
    daemon.start()
    for index in range(5):
        daemon.wait_for_mailbox("localhost", f"race{index}")
    __import__("time").sleep(0.5)
    for index in range(5):
        assert len(daemon.mailbox("localhost", f"race{index}")) == 1
    assert daemon.stop() == 0
