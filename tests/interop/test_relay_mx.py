"""MX routing end to end: trimta resolves through dnsmasq and relays to smtp-sink.

dnsmasq serves the zone below. trimta connects to MX hosts on port 25, so
each smtp-sink listens on port 25 of its own loopback address (127.0.0.2,
127.0.0.3); binding them needs root, and the tests skip without it.

    example.test    MX 10 mx1.example.test, MX 20 mx2.example.test
    mx1.example.test  A 127.0.0.2
    mx2.example.test  A 127.0.0.3
    plain.test      A 127.0.0.3 (no MX)
    nullmx.test     MX 0 "." (RFC 7505 null MX)
    loop.test       MX 5 mx.trimta.test (the daemon's own hostname),
                    MX 10 mx1.example.test
    mx.trimta.test  A 127.0.0.4
    broken.test     forwarded to a dnsmasq that answers REFUSED
    missing.test    NXDOMAIN
"""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
import socket

import pytest
from dnsmasq import run_dnsmasq
from harness import wait_until
from sink import run_sink

MX1 = "127.0.0.2"
MX2 = "127.0.0.3"
OWN_MX = "127.0.0.4"
RELAY_DOMAINS = (
    "example.test",
    "plain.test",
    "nullmx.test",
    "loop.test",
    "broken.test",
    "missing.test",
)
ZONE = [
    "--mx-host=example.test,mx1.example.test,10",
    "--mx-host=example.test,mx2.example.test,20",
    f"--host-record=mx1.example.test,{MX1}",
    f"--host-record=mx2.example.test,{MX2}",
    f"--host-record=plain.test,{MX2}",
    # RDATA of a null MX: preference 0, then the root name (one zero octet).
    "--dns-rr=nullmx.test,15,000000",
    "--mx-host=loop.test,mx.trimta.test,5",
    "--mx-host=loop.test,mx1.example.test,10",
    f"--host-record=mx.trimta.test,{OWN_MX}",
]


@pytest.fixture(scope="module")
def nameserver():
    """Yield the port of a dnsmasq serving ZONE on 127.0.0.1."""
    # The upstream serves nothing and answers REFUSED for broken.test,
    # which the front dnsmasq passes on as a failed lookup.
    with run_dnsmasq([], local="refusing.invalid") as refusing:
        forward = f"--server=/broken.test/127.0.0.1#{refusing}"
        with run_dnsmasq([*ZONE, forward]) as port:
            yield port


def require_port_25(address: str) -> None:
    """Skip the test unless this process may listen on `address`:25."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, 25))
        except OSError as exc:
            pytest.skip(f"cannot listen on {address}:25 ({exc.strerror}); needs root")


def mx_config(dns_port: int, extra: str = "") -> dict:
    return {
        "relay": RELAY_DOMAINS,
        "extra": (
            f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
            f'[delivery]\nmin_backoff = "1s"\nconnect_timeout = "5s"\n{extra}'
        ),
    }


def send(daemon, sender: str, recipient: str, subject: str) -> None:
    body = f"Subject: {subject}\r\nMessage-ID: <{subject}@example.org>\r\n\r\nx\r\n"
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.sendmail(sender, [recipient], body.encode())


def wait_for_deferral(daemon, domain: str) -> dict:
    """Wait until a part of `domain` was tried once, and return its envelope."""
    line = re.compile(rf"deferred mid=\S+ domain={re.escape(domain)} ")
    wait_until(lambda: line.search(daemon.log()), what=f"a deferral for {domain}")
    [envelope] = daemon.spool_parts(domain)
    return envelope


def dsn_status(raw: bytes) -> str:
    """Return the message/delivery-status part of a DSN as text."""
    report = email.message_from_bytes(raw, policy=email.policy.SMTPUTF8)
    assert report.get_content_type() == "multipart/report"
    return list(report.iter_parts())[1].as_string()


def test_best_mx_gets_mail(daemon_factory, nameserver, tmp_path):
    require_port_25(MX1)
    with (
        run_sink(address=MX1, port=25) as best,
        run_sink(address=MX2, port=25) as backup,
    ):
        daemon = daemon_factory(**mx_config(nameserver))
        for index in range(2):
            send(
                daemon, "alice@example.org", f"bob{index}@example.test", f"best{index}"
            )
        messages = best.wait_for(2)
        assert sorted(m.recipients[0] for m in messages) == [
            "bob0@example.test",
            "bob1@example.test",
        ]
        wait_until(
            lambda: daemon.spool_parts("example.test") == [], what="spool to empty"
        )
        assert backup.messages() == []


def test_second_mx_used_when_first_refuses(daemon_factory, nameserver):
    require_port_25(MX2)
    with run_sink(address=MX2, port=25) as backup:
        daemon = daemon_factory(**mx_config(nameserver))
        send(daemon, "alice@example.org", "bob@example.test", "fallback")
        [message] = backup.wait_for(1)
        assert message.recipients == ("bob@example.test",)
        wait_until(
            lambda: daemon.spool_parts("example.test") == [], what="spool to empty"
        )
    log = daemon.log()
    assert f"host=mx1.example.test address={MX1} port=25 error=connect failed" in log
    assert "host=mx2.example.test result=delivered" in log


def test_a_record_used_without_mx(daemon_factory, nameserver):
    require_port_25(MX2)
    with run_sink(address=MX2, port=25) as sink:
        daemon = daemon_factory(**mx_config(nameserver))
        send(daemon, "alice@example.org", "carol@plain.test", "implicit")
        [message] = sink.wait_for(1)
        assert message.recipients == ("carol@plain.test",)
        assert message.sender == "alice@example.org"
        wait_until(
            lambda: daemon.spool_parts("plain.test") == [], what="spool to empty"
        )


def test_null_mx_bounces_with_5_1_10(daemon_factory, nameserver):
    daemon = daemon_factory(**mx_config(nameserver))
    send(daemon, "alice@localhost", "dave@nullmx.test", "nullmx")
    [dsn] = daemon.wait_for_mailbox("localhost", "alice")
    status = dsn_status(dsn)
    assert "Final-Recipient: rfc822; dave@nullmx.test" in status
    assert "Action: failed" in status
    assert "Status: 5.1.10" in status
    wait_until(lambda: daemon.spool_parts("nullmx.test") == [], what="spool to empty")


def test_nxdomain_bounces_with_5_1_2(daemon_factory, nameserver):
    daemon = daemon_factory(**mx_config(nameserver))
    send(daemon, "alice@localhost", "erin@missing.test", "nxdomain")
    [dsn] = daemon.wait_for_mailbox("localhost", "alice")
    status = dsn_status(dsn)
    assert "Final-Recipient: rfc822; erin@missing.test" in status
    assert "Status: 5.1.2" in status
    assert "does not exist" in status


def test_refused_lookup_defers(daemon_factory, nameserver):
    daemon = daemon_factory(**mx_config(nameserver))
    send(daemon, "alice@localhost", "frank@broken.test", "refused")
    envelope = wait_for_deferral(daemon, "broken.test")
    [recipient] = envelope["recipients"]
    assert recipient["state"] == "pending"
    assert "MX lookup for broken.test failed" in recipient["last_error"]
    assert "REFUSED" in recipient["last_error"]
    assert "status=4.4.3" in daemon.log()
    assert daemon.mailbox("localhost", "alice") == []


def test_dns_timeout_defers(daemon_factory):
    # A UDP socket that never answers: every query runs into the
    # resolver's 10-second lifetime (MxResolver's default timeout).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        daemon = daemon_factory(**mx_config(silent.getsockname()[1]))
        send(daemon, "alice@localhost", "gina@example.test", "timeout")
        wait_until(
            lambda: "deferred mid=" in daemon.log(), what="a deferral", timeout=30
        )
    [envelope] = daemon.spool_parts("example.test")
    [recipient] = envelope["recipients"]
    assert recipient["state"] == "pending"
    assert "timed out" in recipient["last_error"]
    assert envelope["attempts"] == 1


def test_own_best_mx_defers_with_4_4_6(daemon_factory, nameserver):
    # trimta also listens on its MX address, port 25, so a delivery that
    # ignored the loop would show up as a second session in its own log.
    require_port_25(OWN_MX)
    require_port_25(MX1)
    listener = f'[[listener]]\naddress = "{OWN_MX}:25"\n'
    with run_sink(address=MX1, port=25) as worse_mx:
        daemon = daemon_factory(**mx_config(nameserver, extra=listener))
        send(daemon, "alice@localhost", "hank@loop.test", "loop")
        envelope = wait_for_deferral(daemon, "loop.test")
        assert worse_mx.messages() == []
    [recipient] = envelope["recipients"]
    assert recipient["state"] == "pending"
    assert "loops back to myself" in recipient["last_error"]
    log = daemon.log()
    assert "status=4.4.6" in log
    assert log.count("session opened") == 1
    assert "next hop failed" not in log
    assert envelope["last_error"] == recipient["last_error"]
