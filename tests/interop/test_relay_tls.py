"""TLS and AUTH towards a next hop: a private Postfix with trustme certificates.

Postfix offers STARTTLS on its main port (smtpd_tls_security_level =
may) and TLS from the first byte on a second, port-465-style port
(smtpd_tls_wrappermode). For AUTH it checks passwords in a Cyrus SASL
sasldb and relays only for clients that authenticated. Whatever Postfix
accepts it passes on to an smtp-sink, so a test can read the Received:
header that Postfix wrote, which names the TLS version when TLS was used.
"""

from __future__ import annotations

import base64
import re
import smtplib
from pathlib import Path

import pytest
import trustme
from postfix import SaslUser, TlsFiles, run_postfix
from harness import wait_until
from sink import run_sink

from trimta.config.load import load_file

REPO = Path(__file__).resolve().parents[2]
SASL_USER = SaslUser("trimta", "Sm4rt-h0st-secret")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Path]:
    """Write a server certificate for 127.0.0.1, its CA, and an unrelated CA."""
    folder = tmp_path_factory.mktemp("certificates")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = {
        "ca": folder / "ca.pem",
        "other_ca": folder / "other-ca.pem",
        "cert": folder / "server-chain.pem",
        "key": folder / "server-key.pem",
    }
    ca.cert_pem.write_to_path(paths["ca"])
    trustme.CA().cert_pem.write_to_path(paths["other_ca"])
    for index, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(paths["cert"], append=index > 0)
    server.private_key_pem.write_to_path(paths["key"])
    return paths


def tls_files(certificates) -> TlsFiles:
    return TlsFiles(certificates["cert"], certificates["key"])


def route_config(route: str) -> dict:
    return {
        "relay": ("example.net",),
        "extra": (
            f"[routes]\n{route}\n"
            '[delivery]\nmin_backoff = "1s"\nconnect_timeout = "5s"\n'
        ),
    }


def table_route(key: str, port: int, **fields: str) -> str:
    items = [f'hosts = ["127.0.0.1:{port}"]']
    items += [f'{name} = "{value}"' for name, value in fields.items()]
    return f'"{key}" = {{ {", ".join(items)} }}'


def send(daemon, sender: str, recipient: str, subject: str) -> None:
    body = f"Subject: {subject}\r\n\r\nsecret body of {subject}\r\n".encode()
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.sendmail(sender, [recipient], body)


def wait_for_deferral(daemon, domain: str = "example.net") -> dict:
    """Wait until a part was tried once and deferred, and return its recipient."""
    wait_until(lambda: "deferred mid=" in daemon.log(), what="a deferral")
    [envelope] = daemon.spool_parts(domain)
    [recipient] = envelope["recipients"]
    assert recipient["state"] == "pending"
    return recipient


def received_by_postfix(message) -> str:
    """Return the first Received: header (Postfix's), unfolded."""
    header = re.match(rb"Received: (.*?)\n(?=\S)", message.message, re.DOTALL)
    assert header is not None, message.message
    return re.sub(r"\s+", " ", header.group(1).decode())


def test_opportunistic_tls_used_when_offered(daemon_factory, certificates):
    with (
        run_sink() as sink,
        run_postfix(("127.0.0.1", sink.port), tls=tls_files(certificates)) as postfix,
    ):
        daemon = daemon_factory(
            **route_config(f'"example.net" = ["127.0.0.1:{postfix.port}"]')
        )
        send(daemon, "alice@example.org", "bob@example.net", "opportunistic")
        [message] = sink.wait_for(1)
        postfix_log = postfix.log()
    assert "using TLS" in received_by_postfix(message)
    assert "TLS connection established from" in postfix_log
    assert message.recipients == ("bob@example.net",)


def test_required_tls_with_trusted_ca_delivers(daemon_factory, certificates):
    with (
        run_sink() as sink,
        run_postfix(("127.0.0.1", sink.port), tls=tls_files(certificates)) as postfix,
    ):
        route = table_route(
            "example.net", postfix.port, tls="required", ca_file=certificates["ca"]
        )
        daemon = daemon_factory(**route_config(route))
        send(daemon, "alice@example.org", "bob@example.net", "required")
        [message] = sink.wait_for(1)
        wait_until(
            lambda: daemon.spool_parts("example.net") == [], what="spool to empty"
        )
    assert "using TLS" in received_by_postfix(message)
    assert b"secret body of required" in message.message


def test_required_tls_with_wrong_ca_defers(daemon_factory, certificates):
    with (
        run_sink() as sink,
        run_postfix(("127.0.0.1", sink.port), tls=tls_files(certificates)) as postfix,
    ):
        route = table_route(
            "example.net",
            postfix.port,
            tls="required",
            ca_file=certificates["other_ca"],
        )
        daemon = daemon_factory(**route_config(route))
        send(daemon, "alice@example.org", "bob@example.net", "wrongca")
        recipient = wait_for_deferral(daemon)
        postfix.wait_for_log(r"disconnect from \S+ ehlo=1 starttls=")
        assert sink.messages() == []
        postfix_log = postfix.log()
    assert "TLS handshake failed" in recipient["last_error"]
    assert "certificate verify failed" in recipient["last_error"]
    # Postfix counts each command in its disconnect line: no MAIL FROM
    # or DATA was sent after the failed handshake, in clear or not.
    assert postfix.queue_ids() == []
    assert "mail=" not in postfix_log
    assert "data=" not in postfix_log


def test_implicit_tls_delivers(daemon_factory, certificates):
    with (
        run_sink() as sink,
        run_postfix(
            ("127.0.0.1", sink.port), tls=tls_files(certificates), wrapper_port=True
        ) as postfix,
    ):
        route = table_route(
            "example.net",
            postfix.wrapper_port,
            tls="implicit",
            ca_file=certificates["ca"],
        )
        daemon = daemon_factory(**route_config(route))
        send(daemon, "alice@example.org", "bob@example.net", "implicit")
        [message] = sink.wait_for(1)
        postfix_log = postfix.log()
    assert "using TLS" in received_by_postfix(message)
    # With wrapper mode the handshake comes first, so no STARTTLS is logged.
    assert "starttls=" not in postfix_log
    assert "TLS connection established from" in postfix_log


def smarthost_route(port: int, certificates, password_file: Path) -> str:
    return table_route(
        "*",
        port,
        tls="required",
        ca_file=certificates["ca"],
        auth_user=SASL_USER.name,
        auth_password_file=password_file,
    )


def write_password(folder: Path, password: str, mode: int = 0o600) -> Path:
    path = folder / "smarthost.password"
    path.write_text(password + "\n")
    path.chmod(mode)
    return path


def secret_forms(user: str, password: str) -> list[str]:
    """Return the password and the AUTH PLAIN and LOGIN forms that carry it."""
    plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    login = base64.b64encode(password.encode()).decode()
    return [password, plain, login]


def test_smarthost_auth_delivers(daemon_factory, certificates, tmp_path):
    password_file = write_password(tmp_path, SASL_USER.password)
    with (
        run_sink() as sink,
        run_postfix(
            ("127.0.0.1", sink.port), tls=tls_files(certificates), sasl_user=SASL_USER
        ) as postfix,
    ):
        daemon = daemon_factory(
            **route_config(smarthost_route(postfix.port, certificates, password_file))
        )
        send(daemon, "alice@example.org", "bob@example.net", "smarthost")
        [message] = sink.wait_for(1)
        postfix_log = postfix.log()
    assert f"sasl_username={SASL_USER.name}" in postfix_log
    assert "using TLS" in received_by_postfix(message)
    for secret in secret_forms(SASL_USER.name, SASL_USER.password):
        assert secret not in daemon.log()


def test_postfix_rejects_relay_without_auth(certificates):
    # The peer of the AUTH tests really demands AUTH before it relays.
    with (
        run_sink() as sink,
        run_postfix(
            ("127.0.0.1", sink.port), tls=tls_files(certificates), sasl_user=SASL_USER
        ) as postfix,
        smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as client,
    ):
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("alice@example.org", ["bob@example.net"], b"x\r\n")
    [(code, text)] = refused.value.recipients.values()
    assert code == 554
    assert b"Relay access denied" in text


def test_smarthost_wrong_password_defers(daemon_factory, certificates, tmp_path):
    wrong = "Wr0ng-pa55word-here"
    password_file = write_password(tmp_path, wrong)
    with (
        run_sink() as sink,
        run_postfix(
            ("127.0.0.1", sink.port), tls=tls_files(certificates), sasl_user=SASL_USER
        ) as postfix,
    ):
        daemon = daemon_factory(
            **route_config(smarthost_route(postfix.port, certificates, password_file))
        )
        send(daemon, "alice@example.org", "bob@example.net", "wrongpassword")
        recipient = wait_for_deferral(daemon)
        assert sink.messages() == []
    assert f"AUTH as {SASL_USER.name} failed: 535 5.7.8" in recipient["last_error"]
    for secret in secret_forms(SASL_USER.name, wrong):
        assert secret not in daemon.log()


def test_readable_password_file_refused(daemon_factory, certificates, tmp_path):
    password_file = write_password(tmp_path, SASL_USER.password, mode=0o644)
    with (
        run_sink() as sink,
        run_postfix(
            ("127.0.0.1", sink.port), tls=tls_files(certificates), sasl_user=SASL_USER
        ) as postfix,
    ):
        daemon = daemon_factory(
            **route_config(smarthost_route(postfix.port, certificates, password_file))
        )
        send(daemon, "alice@example.org", "bob@example.net", "readable")
        recipient = wait_for_deferral(daemon)
        assert sink.messages() == []
        postfix_log = postfix.log()
    assert "readable by other users" in recipient["last_error"]
    assert f"chmod 600 {password_file}" in recipient["last_error"]
    assert "auth=" not in postfix_log
    for secret in secret_forms(SASL_USER.name, SASL_USER.password):
        assert secret not in daemon.log()


def test_smarthost_example_config_loads():
    config = load_file(REPO / "conf" / "smarthost.toml")
    route = config.routes["*"]
    assert route.tls == "implicit"
    assert [(hop.host, hop.port) for hop in route.hosts] == [
        ("smtp.provider.example", 465)
    ]
    assert route.auth_user == "satellite@example.org"
    assert route.auth_password_file == Path("/etc/trimta/smarthost.password")
    assert config.routes.keys() == {"*"}
