"""Next hops that stop replying, or reply differently to each recipient.

The next hop is a scripted SMTP server on 127.0.0.1 that the test runs in
threads. It can go silent at any step of a session: before its greeting,
after a command, while the message data arrives (it stops reading), or
after the final dot. Each reply timeout of `[delivery]` gets its own
value, so the timeout named in the deferral shows which key applied, and
every wait ends within seconds instead of the RFC 5321 minutes.
"""

from __future__ import annotations

import base64
import json
import os
import smtplib
import socket
import subprocess
import sys
import threading
import time

import attrs
import pytest

from harness import Daemon, daemon_environment, free_port, toml_config, wait_until
from sink import run_sink

# One value per reply timeout. The values differ, so an error text such as
# "within 1.4s" shows which key applied.
TIMEOUTS = {
    "greeting_timeout": 1.0,
    "command_timeout": 1.2,
    "mail_timeout": 1.4,
    "rcpt_timeout": 1.6,
    "data_init_timeout": 1.8,
    "data_block_timeout": 2.0,
    "data_end_timeout": 2.2,
}
# Upper bound of any wait for the scripted hop or the daemon, in seconds.
WAIT_LIMIT = 60.0
MAX_COMMANDS = 200
# A message larger than the sender's socket buffer (tcp_wmem max is 4 MiB
# on common Linux defaults) plus the hop's small receive buffer, so a hop
# that stops reading blocks the send of the message data.
LARGE_BODY_LINES = 6500
SMALL_RECEIVE_BUFFER = 16384


@attrs.define
class HopTransaction:
    """One mail transaction as the scripted hop saw it."""

    sender: str
    recipients: list[str] = attrs.Factory(list)
    accepted: list[str] = attrs.Factory(list)
    body: bytes | None = None


class ScriptedHop:
    """An SMTP next hop on 127.0.0.1 that follows a script and records sessions.

    Args:
        silent_at: The step after which the hop sends nothing more:
            "connect" (no greeting), "EHLO", "MAIL", "RCPT", "DATA" (no
            354), "body" (after the 354 it stops reading) or "dot" (it
            reads the message and never replies). "drip" sends the greeting
            one octet every 0.25 s, so no read waits long but the whole
            reply takes 7 s. None serves normally.
        rcpt_replies: Reply line per recipient address; others get 250.
            The test may change it while the hop runs.
        receive_buffer: SO_RCVBUF of accepted connections, in octets.
    """

    def __init__(self, silent_at=None, rcpt_replies=None, receive_buffer=None):
        self.silent_at = silent_at
        self.rcpt_replies = dict(rcpt_replies or {})
        self.transactions: list[HopTransaction] = []
        self.connections = 0
        self.went_silent = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if receive_buffer is not None:
            # Accepted sockets inherit the listener's receive buffer.
            self._listener.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer
            )
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._start_thread(self._accept_loop)

    def stop(self) -> None:
        """Close the listener and every connection, then join the threads."""
        self._stopped.set()
        self._listener.close()
        with self._lock:
            for conn in self._sockets:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(10)

    def _start_thread(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + 10 * WAIT_LIMIT
        while not self._stopped.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # the listener was closed by stop()
            with self._lock:
                self.connections += 1
                self._sockets.append(conn)
            self._start_thread(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT_LIMIT)
        try:
            _Conversation(self, conn).run()
        except OSError:
            pass  # the daemon closed the connection after its timeout
        finally:
            conn.close()

    def go_silent(self) -> None:
        """Send nothing more until the test stops the hop."""
        self.went_silent.set()
        self._stopped.wait(WAIT_LIMIT)


class _Conversation:
    """One SMTP session of the scripted hop."""

    def __init__(self, hop: ScriptedHop, conn: socket.socket) -> None:
        self.hop = hop
        self.conn = conn
        self.buffer = b""
        self.transaction: HopTransaction | None = None

    def run(self) -> None:
        if self.hop.silent_at == "connect":
            return self.hop.go_silent()
        if self.hop.silent_at == "drip":
            return self.drip_greeting()
        self.send("220 hop.test ESMTP scripted")
        for _ in range(MAX_COMMANDS):
            line = self.read_line()
            if line is None:
                return
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode()
            if verb == self.hop.silent_at:
                return self.hop.go_silent()
            if not self.handle(verb, line):
                return

    def handle(self, verb: str, line: bytes) -> bool:
        """Reply to one command, and return False when the session is over."""
        if verb in ("EHLO", "HELO"):
            self.send("250 hop.test")
        elif verb == "MAIL":
            self.transaction = HopTransaction(sender=_address(line))
            self.hop.transactions.append(self.transaction)
            self.send("250 2.1.0 sender ok")
        elif verb == "RCPT":
            self.answer_rcpt(_address(line))
        elif verb == "DATA":
            return self.receive_data()
        elif verb == "QUIT":
            self.send("221 2.0.0 bye")
            return False
        else:  # RSET, NOOP
            self.send("250 2.0.0 ok")
        return True

    def answer_rcpt(self, address: str) -> None:
        reply = self.hop.rcpt_replies.get(address, "250 2.1.5 recipient ok")
        assert self.transaction is not None
        self.transaction.recipients.append(address)
        if reply.startswith("250"):
            self.transaction.accepted.append(address)
        self.send(reply)

    def receive_data(self) -> bool:
        self.send("354 end with <CRLF>.<CRLF>")
        if self.hop.silent_at == "body":
            self.hop.go_silent()
            return False
        body = self.read_until(b"\r\n.\r\n")
        if body is None:
            return False
        assert self.transaction is not None
        self.transaction.body = body
        if self.hop.silent_at == "dot":
            self.hop.go_silent()
            return False
        self.send("250 2.0.0 stored")
        return True

    def drip_greeting(self) -> None:
        """Send the greeting one octet every 0.25 s, then nothing more."""
        self.hop.went_silent.set()
        for octet in b"220 hop.test ESMTP scripted\r\n":
            if self.hop._stopped.wait(0.25):
                return
            self.conn.sendall(bytes([octet]))
        self.hop.go_silent()

    def send(self, line: str) -> None:
        self.conn.sendall(line.encode() + b"\r\n")

    def read_line(self) -> bytes | None:
        line = self.read_until(b"\r\n")
        return None if line is None else line.removesuffix(b"\r\n")

    def read_until(self, end: bytes) -> bytes | None:
        """Return the bytes up to and including `end`, or None at EOF."""
        while end not in self.buffer:
            chunk = self.conn.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        index = self.buffer.index(end) + len(end)
        data, self.buffer = self.buffer[:index], self.buffer[index:]
        return data


def _address(line: bytes) -> str:
    text = line.decode("utf-8", "replace")
    return text[text.index("<") + 1 : text.index(">")]


def relay_config(port: int, delivery: str = "") -> dict:
    timeouts = "\n".join(f'{key} = "{value:g}s"' for key, value in TIMEOUTS.items())
    return dict(
        local=("localhost",),
        relay=("example.net",),
        extra=(
            f'[routes]\n"example.net" = ["127.0.0.1:{port}"]\n'
            f'[delivery]\nmin_backoff = "1s"\nmax_backoff = "2s"\n{timeouts}\n'
            f"{delivery}\n"
        ),
    )


def send(daemon, recipients: list[str], body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=WAIT_LIMIT) as client:
        client.sendmail("alice@localhost", recipients, body)


def queue_list(daemon) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "trimta", "queue", "list", "--json", "--config",
         str(daemon.folder / "trimta.toml")],
        capture_output=True, text=True, timeout=WAIT_LIMIT, env=daemon_environment(),
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def large_body(marker: bytes) -> bytes:
    line = b"x" * 998 + b"\r\n"
    return b"Subject: " + marker + b"\r\n\r\n" + line * LARGE_BODY_LINES


# (where the hop goes silent, the error text the deferral must contain)
SILENCES = [
    ("connect", f"no reply from 127.0.0.1 within {TIMEOUTS['greeting_timeout']:g}s"),
    ("drip", f"no reply from 127.0.0.1 within {TIMEOUTS['greeting_timeout']:g}s"),
    ("EHLO", f"no reply from 127.0.0.1 within {TIMEOUTS['command_timeout']:g}s"),
    ("MAIL", f"no reply from 127.0.0.1 within {TIMEOUTS['mail_timeout']:g}s"),
    ("RCPT", f"no reply from 127.0.0.1 within {TIMEOUTS['rcpt_timeout']:g}s"),
    ("DATA", f"no reply from 127.0.0.1 within {TIMEOUTS['data_init_timeout']:g}s"),
    (
        "body",
        f"sending to 127.0.0.1 timed out after {TIMEOUTS['data_block_timeout']:g}s",
    ),
    ("dot", f"no reply from 127.0.0.1 within {TIMEOUTS['data_end_timeout']:g}s"),
]


@pytest.mark.parametrize(("silent_at", "reason"), SILENCES)
def test_silent_hop_defers_then_delivers_once(
    daemon_factory, tmp_path, silent_at, reason
):
    large = silent_at == "body"
    hop = ScriptedHop(
        silent_at, receive_buffer=SMALL_RECEIVE_BUFFER if large else None
    )
    try:
        daemon = daemon_factory(**relay_config(hop.port))
        marker = f"silent-{silent_at}".encode()
        body = large_body(marker) if large else b"Subject: " + marker + b"\r\n\r\nx\r\n"
        started = time.monotonic()
        send(daemon, ["bob@example.net"], body)

        def deferred_with_reason() -> bool:
            parts = daemon.spool_parts("example.net")
            return bool(parts) and reason in (parts[0]["last_error"] or "")

        wait_until(deferred_with_reason, timeout=30, what=f"deferral: {reason}")
        # The RFC 5321 defaults are 2 to 10 minutes; the configured ones apply.
        assert time.monotonic() - started < 30
        assert hop.went_silent.is_set()
        [entry] = queue_list(daemon)["messages"]
        assert entry["state"] == "deferred"
        assert reason in entry["last_error"]
        assert entry["recipients"][0]["state"] == "pending"
        assert entry["recipients"][0]["address"] == "bob@example.net"
        if silent_at == "dot":
            assert hop.transactions[0].body is not None  # the hop got it all
    finally:
        hop.stop()

    with run_sink(tmp_path / "sink", port=hop.port) as sink:
        [message] = sink.wait_for(1, timeout=30)
        wait_until(
            lambda: daemon.spool_parts("example.net") == [], what="spool to empty"
        )
        time.sleep(2.5)  # longer than max_backoff: no second copy follows
        assert len(sink.messages()) == 1
    assert message.recipients == ("bob@example.net",)
    assert marker in message.message
    assert daemon.mailbox("localhost", "alice") == []  # nothing bounced
    log = daemon.log()
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert any(reason in line for line in warnings), warnings
    assert "deferred mid=" in log
    assert "Traceback" not in log


def test_rcpt_250_450_550_in_one_transaction(daemon_factory):
    hop = ScriptedHop(
        rcpt_replies={
            "later@example.net": "450 4.2.1 mailbox busy, try later",
            "gone@example.net": "550 5.1.1 no such user here",
        }
    )
    try:
        daemon = daemon_factory(**relay_config(hop.port))
        body = b"Subject: mixed\r\nMessage-ID: <mixed@localhost>\r\n\r\nmixed\r\n"
        recipients = ["ok@example.net", "later@example.net", "gone@example.net"]
        send(daemon, recipients, body)

        [dsn] = daemon.wait_for_mailbox("localhost", "alice", timeout=30)
        wait_until(lambda: len(hop.transactions) >= 2, what="a retry")
        [part] = daemon.spool_parts("example.net")
        states = {r["address"]: r["state"] for r in part["recipients"]}
        assert states["ok@example.net"] == "delivered"
        assert states["later@example.net"] == "pending"
        assert states["gone@example.net"] == "failed"
        assert part["last_error"].startswith("450 4.2.1")

        hop.rcpt_replies.pop("later@example.net")
        wait_until(
            lambda: daemon.spool_parts("example.net") == [], what="spool to empty"
        )
    finally:
        hop.stop()

    first, *retries = hop.transactions
    assert first.recipients == recipients
    assert first.accepted == ["ok@example.net"]
    assert first.body is not None and b"mixed" in first.body
    assert retries
    for retry in retries:
        assert retry.recipients == ["later@example.net"]
    assert retries[-1].accepted == ["later@example.net"]
    assert retries[-1].body is not None
    delivered = [t for t in hop.transactions if t.accepted and t.body is not None]
    assert len(delivered) == 2  # ok@ once, later@ once

    text = dsn.decode("utf-8", "replace")
    assert "Final-Recipient: rfc822; gone@example.net" in text
    assert "550 5.1.1 no such user here" in text
    assert "ok@example.net" not in text
    assert "later@example.net" not in text
    assert len(daemon.mailbox("localhost", "alice")) == 1


# ATRN: the customer becomes the SMTP server and may stop replying too.


def add_user(path, name: str, domain: str, password: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "trimta", "passwd", "--file", str(path), name,
         "--domains", domain],
        input=password + "\n", text=True, check=True, capture_output=True,
        env=daemon_environment(), timeout=WAIT_LIMIT,
    )


def start_odmr_daemon(folder) -> tuple[Daemon, int]:
    folder.mkdir()
    credentials = folder / "users.json"
    add_user(credentials, "customer", "held.example", "c-secret")
    os.chmod(credentials, 0o600)
    port, odmr_port = free_port(), free_port()
    timeouts = "\n".join(f'{key} = "{value:g}s"' for key, value in TIMEOUTS.items())
    text = toml_config(
        folder, port, hold=("held.example",),
        extra=f'[auth]\ncredentials = "{credentials}"\n[delivery]\n{timeouts}\n',
    )
    text += (
        f'\n[[listener]]\naddress = "127.0.0.1:{odmr_port}"\nkind = "odmr"\n'
        "allow_plaintext_auth = true\n"
    )
    (folder / "trimta.toml").write_text(text)
    daemon = Daemon(folder, port)
    daemon.start()
    return daemon, odmr_port


def read_reply(conn: socket.socket) -> bytes:
    data = b""
    while not (data.endswith(b"\r\n") and data.split(b"\r\n")[-2][3:4] == b" "):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_silent_atrn_customer_times_out(tmp_path):
    daemon, odmr_port = start_odmr_daemon(tmp_path / "odmr")
    try:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=WAIT_LIMIT) as client:
            body = b"Subject: held\r\n\r\nx\r\n"
            client.sendmail("alice@example.org", ["user@held.example"], body)
        conn = socket.create_connection(("127.0.0.1", odmr_port), timeout=WAIT_LIMIT)
        with conn:
            assert read_reply(conn).startswith(b"220")
            conn.sendall(b"EHLO customer.example\r\n")
            assert read_reply(conn).startswith(b"250")
            token = base64.b64encode(b"\0customer\0c-secret")
            conn.sendall(b"AUTH PLAIN " + token + b"\r\n")
            assert read_reply(conn).startswith(b"235")
            conn.sendall(b"ATRN held.example\r\n")
            assert read_reply(conn).startswith(b"250")
            # Roles reverse, and the customer never sends its 220 greeting.
            started = time.monotonic()
            assert conn.recv(4096) == b""  # trimta gives up and closes
            waited = time.monotonic() - started
        assert TIMEOUTS["greeting_timeout"] - 0.1 <= waited < 30
        wait_until(lambda: "turnaround failed" in daemon.log(), what="turnaround log")
        greeting = TIMEOUTS["greeting_timeout"]
        assert f"within {greeting:g}s" in daemon.log()
        [part] = daemon.spool_parts("held.example")
        assert part["recipients"][0]["state"] == "pending"
        assert daemon.stop() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.kill()
