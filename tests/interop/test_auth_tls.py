"""STARTTLS, implicit TLS, AUTH and submission against a live daemon.

Clients are real: swaks (Net::SSLeay, Authen::SASL), smtplib and a raw
socket wrapped with ssl. Certificates come from trustme.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest
import trustme

from harness import (
    Daemon,
    daemon_environment,
    environment_without_proxy,
    free_port,
    toml_config,
)

SWAKS = "/usr/bin/swaks"
USER = "alice@example.test"
PASSWORD = "correct-horse"
needs_swaks = pytest.mark.skipif(not os.path.exists(SWAKS), reason="swaks missing")


@pytest.fixture(scope="module")
def authority():
    return trustme.CA()


class AuthDaemon(Daemon):
    """A daemon with an smtp (STARTTLS), a submission and an implicit-TLS listener."""

    submission_port: int = 0
    implicit_port: int = 0


def write_credentials(folder, mode=0o600) -> None:
    subprocess.run(
        [sys.executable, "-m", "trimta", "passwd", "--file", str(folder / "users.json"),
         USER, "--domains", "example.test", "--cram-md5"],
        input=PASSWORD + "\n", text=True, check=True, capture_output=True,
        env=daemon_environment(),
    )
    os.chmod(folder / "users.json", mode)


def configure(folder, authority, *, smtp_keys: str = "") -> AuthDaemon:
    """Write the certificate, credentials and configuration; return the daemon."""
    folder.mkdir(parents=True, exist_ok=True)
    cert = authority.issue_cert("mx.trimta.test", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    tls = f'tls_cert = "{folder / "cert.pem"}"\ntls_key = "{folder / "key.pem"}"\n'
    port, submission, implicit = free_port(), free_port(), free_port()
    text = toml_config(
        folder, port, local=("example.test",), relay=("relay.example.net",),
        extra=f'[auth]\ncredentials = "{folder / "users.json"}"\n',
    )
    text = text.replace(
        f'address = "127.0.0.1:{port}"\n',
        f'address = "127.0.0.1:{port}"\n{tls}{smtp_keys}\n',
    )
    text += (
        f'\n[[listener]]\naddress = "127.0.0.1:{submission}"\nkind = "submission"\n{tls}'
        f'\n[[listener]]\naddress = "127.0.0.1:{implicit}"\ntls = "implicit"\n{tls}'
    )
    (folder / "trimta.toml").write_text(text)
    daemon = AuthDaemon(folder, port)
    daemon.submission_port, daemon.implicit_port = submission, implicit
    return daemon


@pytest.fixture
def auth_daemon(tmp_path, authority):
    folder = tmp_path / "auth"
    daemon = configure(folder, authority)
    write_credentials(folder)
    daemon.start()
    yield daemon
    if daemon.process.poll() is None:
        daemon.stop(signal.SIGKILL)


def client_context(authority) -> ssl.SSLContext:
    context = ssl.create_default_context()
    authority.configure_trust(context)
    return context


def swaks(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SWAKS, "--server", f"127.0.0.1:{port}", "--from", "alice@example.test",
         "--helo", "client.example.net", *args],
        capture_output=True, text=True, timeout=60, env=environment_without_proxy(),
    )


def read_reply(sock) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@needs_swaks
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_swaks_starttls_auth_delivers(auth_daemon, mechanism):
    result = swaks(
        auth_daemon.port, "--tls", "--auth", mechanism, "--auth-user", USER,
        "--auth-password", PASSWORD, "--to", "bob@example.test",
        "--header", f"Subject: {mechanism}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [message] = auth_daemon.wait_for_mailbox("example.test", "bob")
    assert b"with ESMTPSA id" in message
    assert f"Subject: {mechanism}".encode() in message


@needs_swaks
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_swaks_submission_auth_delivers(auth_daemon, mechanism):
    result = swaks(
        auth_daemon.submission_port, "--tls", "--auth", mechanism, "--auth-user",
        USER, "--auth-password", PASSWORD, "--to", "bob@example.test",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    auth_daemon.wait_for_mailbox("example.test", "bob")


@needs_swaks
def test_swaks_implicit_tls_auth(auth_daemon):
    result = swaks(
        auth_daemon.implicit_port, "--tlsc", "--auth", "PLAIN", "--auth-user", USER,
        "--auth-password", PASSWORD, "--to", "bob@example.test",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [message] = auth_daemon.wait_for_mailbox("example.test", "bob")
    assert b"with ESMTPSA id" in message


@needs_swaks
def test_swaks_wrong_password_exits_28(auth_daemon):
    result = swaks(
        auth_daemon.port, "--tls", "--auth", "PLAIN", "--auth-user", USER,
        "--auth-password", "wrong-horse", "--to", "bob@example.test",
    )
    assert result.returncode == 28, result.stdout + result.stderr
    assert "535 5.7.8" in result.stdout
    assert "auth failed" in auth_daemon.log()


@needs_swaks
def test_plain_refused_without_tls(auth_daemon):
    result = swaks(
        auth_daemon.port, "--auth", "PLAIN", "--auth-user", USER,
        "--auth-password", PASSWORD, "--to", "bob@example.test",
    )
    assert result.returncode != 0
    assert "235" not in result.stdout


def test_smtplib_starttls_login_relays(auth_daemon, authority):
    with smtplib.SMTP("127.0.0.1", auth_daemon.port, timeout=30) as client:
        client.starttls(context=client_context(authority))
        client.login(USER, PASSWORD)
        refused = client.sendmail(
            "alice@example.test", ["carol@relay.example.net"], b"Subject: out\r\n\r\nx\r\n"
        )
    assert refused == {}
    assert auth_daemon.spool_parts("relay.example.net")


def test_unauthenticated_relay_refused(auth_daemon, authority):
    with smtplib.SMTP("127.0.0.1", auth_daemon.port, timeout=30) as client:
        client.starttls(context=client_context(authority))
        client.ehlo()
        client.mail("alice@example.test")
        code, text = client.rcpt("carol@elsewhere.example.net")
    assert code == 550
    assert b"5.7.1" in text


def test_authenticated_relay_to_any_domain(auth_daemon, authority):
    with smtplib.SMTP("127.0.0.1", auth_daemon.port, timeout=30) as client:
        client.starttls(context=client_context(authority))
        client.login(USER, PASSWORD)
        client.mail("alice@example.test")
        code, _ = client.rcpt("carol@elsewhere.example.net")
    assert code == 250


def test_submission_mail_before_auth_530(auth_daemon, authority):
    with smtplib.SMTP("127.0.0.1", auth_daemon.submission_port, timeout=30) as client:
        client.starttls(context=client_context(authority))
        client.ehlo()
        code, text = client.mail("alice@example.test")
    assert code == 530
    assert text.startswith(b"5.7.0")


def test_submission_adds_message_id_and_date(auth_daemon, authority):
    with smtplib.SMTP("127.0.0.1", auth_daemon.submission_port, timeout=30) as client:
        client.starttls(context=client_context(authority))
        client.login(USER, PASSWORD)
        client.sendmail(
            "alice@example.test", ["bob@example.test"], b"Subject: bare\r\n\r\nbody\r\n"
        )
        client.sendmail(
            "alice@example.test",
            ["bob@example.test"],
            b"Subject: full\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            b"Message-ID: <kept@example.test>\r\n\r\nbody\r\n",
        )
    bare, full = auth_daemon.wait_for_mailbox("example.test", "bob", count=2)
    if b"Subject: full" in bare:
        bare, full = full, bare
    header, _, body = bare.partition(b"\r\n\r\n")
    assert b"\r\nMessage-ID: <" in header
    assert b"@mx.trimta.test>" in header
    assert b"\r\nDate: " in header
    assert body == b"body\r\n"
    full_header = full.partition(b"\r\n\r\n")[0]
    assert full_header.count(b"Message-ID:") == 1
    assert b"<kept@example.test>" in full_header
    assert full_header.count(b"Date:") == 1


# The long form injects more than one slice of pipelined commands.
@pytest.mark.parametrize("padding", [0, 2000])
def test_starttls_injection_never_processed(auth_daemon, authority, padding):
    with socket.create_connection(("127.0.0.1", auth_daemon.port), timeout=30) as raw:
        assert read_reply(raw).startswith(b"220")
        raw.sendall(b"EHLO client.example.net\r\n")
        assert b"STARTTLS" in read_reply(raw)
        injected = b"NOOP\r\n" * padding + b"MAIL FROM:<evil@x.example>\r\n"
        raw.sendall(b"STARTTLS\r\n" + injected)
        # Exactly one reply: the injected MAIL got none in plaintext.
        assert read_reply(raw) == b"220 2.0.0 ready to start TLS\r\n"
        context = client_context(authority)
        with context.wrap_socket(raw, server_hostname="mx.trimta.test") as tls:
            tls.sendall(b"RCPT TO:<bob@example.test>\r\n")
            assert read_reply(tls).startswith(b"503")
            tls.sendall(b"MAIL FROM:<alice@example.test>\r\n")
            assert read_reply(tls).startswith(b"503")
            tls.sendall(b"EHLO client.example.net\r\n")
            lines = read_reply(tls)
            assert b"STARTTLS" not in lines
            assert b"AUTH PLAIN LOGIN CRAM-MD5" in lines
            tls.sendall(b"QUIT\r\n")
            assert read_reply(tls).startswith(b"221")


def test_late_starttls_gets_whole_timeout_for_handshake(tmp_path, authority):
    daemon = configure(tmp_path / "late", authority)
    config = daemon.folder / "trimta.toml"
    config.write_text(config.read_text() + '\n[limits]\ncommand_timeout = "2s"\n')
    write_credentials(daemon.folder)
    daemon.start()
    try:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as raw:
            read_reply(raw)
            raw.sendall(b"EHLO client.example.net\r\n")
            read_reply(raw)
            time.sleep(1.5)
            raw.sendall(b"STARTTLS\r\n")
            assert read_reply(raw).startswith(b"220 2.0.0")
            # 2.5 s after the EHLO reply, but only 1 s after the 220.
            time.sleep(1.0)
            context = client_context(authority)
            with context.wrap_socket(raw, server_hostname="mx.trimta.test") as tls:
                tls.sendall(b"EHLO client.example.net\r\n")
                assert read_reply(tls).startswith(b"250")
    finally:
        daemon.stop(signal.SIGKILL)


def test_handshake_failure_logged_once(auth_daemon):
    with socket.create_connection(("127.0.0.1", auth_daemon.port), timeout=30) as raw:
        read_reply(raw)
        raw.sendall(b"EHLO client.example.net\r\n")
        read_reply(raw)
        raw.sendall(b"STARTTLS\r\n")
        assert read_reply(raw).startswith(b"220 2.0.0")
        raw.sendall(b"this is no TLS client hello\r\n" * 4)
        # The daemon closes the session; a TLS alert may come first.
        for _ in range(10):
            if not raw.recv(4096):
                break
    for _ in range(200):
        if "session closed" in auth_daemon.log():
            break
        time.sleep(0.05)
    log = auth_daemon.log()
    assert log.count("tls failed") == 1
    assert "session closed" in log


def test_log_holds_no_secrets(auth_daemon, authority):
    with smtplib.SMTP("127.0.0.1", auth_daemon.port, timeout=30) as client:
        client.starttls(context=client_context(authority))
        client.ehlo()
        for password in ("wrong-horse", PASSWORD):
            try:
                client.login(USER, password)
            except smtplib.SMTPAuthenticationError:
                pass
    log = auth_daemon.log()
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, "wrong-horse", token, token[:20]):
        assert secret not in log
    assert "auth succeeded" in log


def test_readable_credentials_refused(tmp_path, authority):
    folder = tmp_path / "loose"
    daemon = configure(folder, authority)
    write_credentials(folder, mode=0o644)
    with pytest.raises(RuntimeError) as caught:
        daemon.start()
    assert f"credentials file {folder / 'users.json'}" in str(caught.value)
    assert "chmod 600" in str(caught.value)


def test_passwd_replaces_user_atomically(tmp_path):
    write_credentials(tmp_path)
    before = json.loads((tmp_path / "users.json").read_text())
    write_credentials(tmp_path)
    after = json.loads((tmp_path / "users.json").read_text())
    assert list(after["users"]) == [USER]
    assert after["users"][USER]["password"] != before["users"][USER]["password"]
    assert (tmp_path / "users.json").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["users.json"]
