"""ODMR end to end: customers authenticate, send ATRN, and receive their mail."""

from __future__ import annotations

import base64
import os
import smtplib
import socket
import subprocess
import sys
import time

import ssl

import attrs
import pytest
import trustme

from harness import Daemon, daemon_environment, free_port, toml_config
from sink import run_sink

FETCHMAIL = "/usr/bin/fetchmail"
CUSTOMERS = {"customer": ("held.example", "c-secret"), "other": ("other.example", "o-secret")}


def add_user(path, name, domains, password) -> None:
    subprocess.run(
        [sys.executable, "-m", "trimta", "passwd", "--file", str(path), name,
         "--domains", domains, "--cram-md5"],
        input=password + "\n", text=True, check=True, capture_output=True,
        env=daemon_environment(),
    )


@attrs.define
class OdmrDaemon(Daemon):
    """A daemon with an SMTP listener and an ODMR listener."""

    odmr_port: int = 0


@pytest.fixture
def odmr_daemon(tmp_path, daemon_factory):
    folder = tmp_path / "odmr"
    folder.mkdir()
    credentials = folder / "users.json"
    for name, (domain, password) in CUSTOMERS.items():
        add_user(credentials, name, domain, password)
    os.chmod(credentials, 0o600)
    authority = trustme.CA()
    cert = authority.issue_cert("mx.trimta.test", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    authority.cert_pem.write_to_path(str(folder / "ca.pem"))
    port, odmr_port = free_port(), free_port()
    text = toml_config(
        folder, port, hold=("held.example", "other.example"),
        extra=f'[auth]\ncredentials = "{credentials}"\n',
    )
    text += (
        f'\n[[listener]]\naddress = "127.0.0.1:{odmr_port}"\nkind = "odmr"\n'
        "allow_plaintext_auth = true\n"
        f'tls_cert = "{folder / "cert.pem"}"\ntls_key = "{folder / "key.pem"}"\n'
        'tls = "starttls"\n'
    )
    (folder / "trimta.toml").write_text(text)
    daemon = OdmrDaemon(folder, port)
    daemon.odmr_port = odmr_port
    daemon.start()
    yield daemon
    if daemon.process.poll() is None:
        daemon.kill()


def queue_held(daemon, domain: str, count: int, body: bytes = b"held body\r\n.dot\r\n") -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        for index in range(count):
            client.sendmail("alice@example.org", [f"user{index}@{domain}"],
                            f"Subject: held {index}\r\n\r\n".encode() + body)


class Customer:
    """A scripted ODMR client on a raw socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buffer = b""
        assert self.reply().startswith(b"220")

    def reply(self) -> bytes:
        while True:
            lines = self.buffer.split(b"\r\n")
            for index, line in enumerate(lines[:-1]):
                if len(line) >= 4 and line[3:4] == b" ":
                    reply = b"\r\n".join(lines[: index + 1])
                    self.buffer = b"\r\n".join(lines[index + 1:])
                    return reply
            chunk = self.sock.recv(65536)
            if not chunk:
                return b""
            self.buffer += chunk

    def line(self) -> bytes:
        """Read one line the other side sent, as the SMTP server reads commands."""
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return b""
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def command(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def login(self, name: str) -> bytes:
        password = CUSTOMERS[name][1]
        token = base64.b64encode(f"\0{name}\0{password}".encode()).decode()
        assert self.command("EHLO customer.example").startswith(b"250")
        return self.command(f"AUTH PLAIN {token}")

    def close(self) -> None:
        self.sock.close()


def test_odmr_replies_before_turnaround(odmr_daemon):
    customer = Customer(odmr_daemon.odmr_port)
    ehlo = customer.command("EHLO customer.example")
    assert b"ATRN" in ehlo
    assert b"AUTH" in ehlo
    assert customer.command("ATRN").startswith(b"530 5.7.0")
    assert customer.command("MAIL FROM:<a@example.org>").startswith(b"502")
    assert customer.command("RCPT TO:<a@example.org>").startswith(b"502")
    assert customer.command("DATA").startswith(b"502")
    assert customer.login("customer").startswith(b"235")
    assert customer.command("ATRN").startswith(b"453")
    assert customer.command("ATRN other.example").startswith(b"450 4.7.1")
    assert customer.command("ATRN nosuch.example").startswith(b"450 4.7.1")
    assert customer.command("ATRN ../etc").startswith(b"501")
    customer.close()


def test_scripted_customer_receives_its_mail(odmr_daemon):
    queue_held(odmr_daemon, "held.example", 2)
    queue_held(odmr_daemon, "other.example", 1)
    customer = Customer(odmr_daemon.odmr_port)
    assert customer.login("customer").startswith(b"235")
    assert customer.command("ATRN held.example").startswith(b"250")
    # Roles reverse: the customer is now the SMTP server.
    customer.sock.sendall(b"220 customer.example ESMTP\r\n")
    received = []
    while True:
        line = customer.line()
        verb = line[:4].upper()
        if verb == b"EHLO":
            customer.sock.sendall(b"250 customer.example\r\n")
        elif verb in (b"MAIL", b"RCPT"):
            if verb == b"RCPT":
                received.append(line)
            customer.sock.sendall(b"250 2.0.0 ok\r\n")
        elif verb == b"DATA":
            customer.sock.sendall(b"354 go ahead\r\n")
            while not customer.buffer.endswith(b"\r\n.\r\n"):
                customer.buffer += customer.sock.recv(65536)
            customer.buffer = b""
            customer.sock.sendall(b"250 2.0.0 stored\r\n")
        elif verb == b"QUIT":
            customer.sock.sendall(b"221 bye\r\n")
            break
        else:
            raise AssertionError(f"unexpected line {line!r}")
    customer.close()
    assert sorted(received) == [b"RCPT TO:<user0@held.example>", b"RCPT TO:<user1@held.example>"]
    deadline = time.monotonic() + 10
    while odmr_daemon.spool_parts("held.example") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert odmr_daemon.spool_parts("held.example") == []
    assert len(odmr_daemon.spool_parts("other.example")) == 1


def test_dropped_turnaround_keeps_mail(odmr_daemon):
    queue_held(odmr_daemon, "held.example", 2)
    customer = Customer(odmr_daemon.odmr_port)
    assert customer.login("customer").startswith(b"235")
    assert customer.command("ATRN").startswith(b"250")
    customer.sock.sendall(b"220 customer.example ESMTP\r\n")
    assert customer.line().upper().startswith(b"EHLO")
    customer.close()
    time.sleep(1.0)
    parts = odmr_daemon.spool_parts("held.example")
    assert len(parts) == 2
    assert all(p["recipients"][0]["state"] == "pending" for p in parts)
    # The locks are free again: the next ATRN is served.
    again = Customer(odmr_daemon.odmr_port)
    assert again.login("customer").startswith(b"235")
    assert again.command("ATRN").startswith(b"250")
    again.close()


def test_release_running_gets_451(odmr_daemon):
    queue_held(odmr_daemon, "held.example", 1)
    first = Customer(odmr_daemon.odmr_port)
    assert first.login("customer").startswith(b"235")
    assert first.command("ATRN").startswith(b"250")  # then stalls: no 220
    second = Customer(odmr_daemon.odmr_port)
    assert second.login("customer").startswith(b"235")
    assert second.command("ATRN").startswith(b"451")
    with smtplib.SMTP("127.0.0.1", odmr_daemon.port, timeout=30) as client:
        client.ehlo("client.example.org")
        assert client.docmd("ETRN", "held.example")[0] == 250
    first.close()
    second.close()


@pytest.mark.skipif(not os.path.exists(FETCHMAIL), reason="fetchmail missing")
def test_fetchmail_odmr_delivers_held_mail(odmr_daemon, tmp_path):
    queue_held(odmr_daemon, "held.example", 3)
    queue_held(odmr_daemon, "other.example", 1)
    with run_sink() as sink:
        rc_file = tmp_path / "fetchmailrc"
        rc_file.write_text(
            f"poll 127.0.0.1 with protocol ODMR service {odmr_daemon.odmr_port}\n"
            f'    user "customer" there with password "{CUSTOMERS["customer"][1]}"\n'
            f'    fetchdomains held.example smtphost "127.0.0.1/{sink.port}"\n'
        )
        rc_file.chmod(0o600)
        result = subprocess.run(
            [FETCHMAIL, "-f", str(rc_file), "-v"],
            capture_output=True, text=True, timeout=120,
            env={"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "")},
        )
        messages = sink.wait_for(3)
    assert sorted(m.recipients[0] for m in messages) == [
        f"user{i}@held.example" for i in range(3)
    ], result.stdout + result.stderr
    for message in messages:
        assert message.message.replace(b"\r\n", b"\n").endswith(b"held body\n.dot\n")
    deadline = time.monotonic() + 10
    while odmr_daemon.spool_parts("held.example") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert odmr_daemon.spool_parts("held.example") == []
    assert len(odmr_daemon.spool_parts("other.example")) == 1


def test_two_customers_release_at_once(odmr_daemon):
    queue_held(odmr_daemon, "held.example", 1)
    queue_held(odmr_daemon, "other.example", 1)
    first, second = Customer(odmr_daemon.odmr_port), Customer(odmr_daemon.odmr_port)
    assert first.login("customer").startswith(b"235")
    assert second.login("other").startswith(b"235")
    assert first.command("ATRN").startswith(b"250")
    assert second.command("ATRN").startswith(b"250")
    for customer in (first, second):
        customer.sock.sendall(b"220 customer.example ESMTP\r\n")
        assert customer.line().upper().startswith(b"EHLO")
        customer.close()


def test_turnaround_keeps_tls_layer(odmr_daemon):
    queue_held(odmr_daemon, "held.example", 1)
    customer = Customer(odmr_daemon.odmr_port)
    assert b"STARTTLS" in customer.command("EHLO customer.example")
    assert customer.command("STARTTLS").startswith(b"220")
    context = ssl.create_default_context(cafile=str(odmr_daemon.folder / "ca.pem"))
    customer.sock = context.wrap_socket(customer.sock, server_hostname="mx.trimta.test")
    assert customer.command("EHLO customer.example").startswith(b"250")
    assert customer.command("AUTH LOGIN").startswith(b"334")
    assert customer.command(base64.b64encode(b"customer").decode()).startswith(b"334")
    password = CUSTOMERS["customer"][1].encode()
    assert customer.command(base64.b64encode(password).decode()).startswith(b"235")
    assert customer.command("ATRN").startswith(b"250")
    # The turnaround runs inside the same TLS session.
    customer.sock.sendall(b"220 customer.example ESMTP\r\n")
    assert customer.line().upper().startswith(b"EHLO")
    assert customer.sock.version() is not None
    customer.close()
