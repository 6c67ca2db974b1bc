"""Relaying to Postfix peers: smtp-sink behind a counting proxy, and Postfix itself.

The burst test checks delivery.per_domain_concurrency from outside trimta,
at a proxy that counts connections. The other tests route a relay domain
to a private Postfix instance (tests/postfix.py) that accepts or rejects
and passes what it accepts on to an smtp-sink.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import threading

from counting_proxy import run_counting_proxy
from postfix import run_postfix
from harness import wait_until
from sink import run_sink

BURST = 1000
BURST_SENDERS = 4
PER_DOMAIN_LIMIT = 3


def route_config(port: int, delivery: str = "") -> dict:
    return {
        "relay": ("example.net",),
        "extra": (
            f'[routes]\n"example.net" = ["127.0.0.1:{port}"]\n'
            f'[delivery]\nmin_backoff = "1s"\n{delivery}\n'
        ),
    }


def send(daemon, sender: str, recipients: list[str], body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.sendmail(sender, recipients, body)


def send_burst(daemon, first: int, count: int) -> None:
    """Send `count` one-recipient messages over one SMTP session."""
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=60) as client:
        for index in range(first, first + count):
            body = f"Subject: burst {index}\r\n\r\nmessage {index}\r\n".encode()
            client.sendmail("alice@example.org", [f"user{index}@example.net"], body)


def test_burst_respects_per_domain_limit(daemon_factory):
    with run_sink() as sink, run_counting_proxy(("127.0.0.1", sink.port)) as proxy:
        daemon = daemon_factory(
            **route_config(proxy.port, f"per_domain_concurrency = {PER_DOMAIN_LIMIT}")
        )
        share = BURST // BURST_SENDERS
        senders = [
            threading.Thread(target=send_burst, args=(daemon, n * share, share))
            for n in range(BURST_SENDERS)
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(120)
        assert not any(sender.is_alive() for sender in senders)

        messages = sink.wait_for(BURST, timeout=120)
        wait_until(
            lambda: daemon.spool_parts("example.net") == [], what="spool to empty"
        )
    recipients = sorted(m.recipients[0] for m in messages)
    assert recipients == sorted(f"user{index}@example.net" for index in range(BURST))
    assert proxy.counts.peak <= PER_DOMAIN_LIMIT
    assert proxy.counts.total < BURST
    assert daemon.log().count("result=delivered") == BURST


def test_postfix_next_hop_relays_message(daemon_factory):
    with run_sink() as sink, run_postfix(("127.0.0.1", sink.port)) as postfix:
        daemon = daemon_factory(**route_config(postfix.port))
        body = (
            b"Subject: via postfix\r\nMessage-ID: <p1@example.org>\r\n"
            b"\r\nhello postfix\r\n"
        )
        send(
            daemon, "alice@example.org", ["bob@example.net", "carol@example.net"], body
        )
        [message] = sink.wait_for(1)
        wait_until(
            lambda: daemon.spool_parts("example.net") == [], what="spool to empty"
        )
        [queue_id] = postfix.queue_ids()
        postfix_log = postfix.log()
    assert message.sender == "alice@example.org"
    assert sorted(message.recipients) == ["bob@example.net", "carol@example.net"]
    text = message.message.replace(b"\r\n", b"\n")
    assert text.endswith(b"\n\nhello postfix\n")
    assert b"Message-ID: <p1@example.org>" in text
    # Postfix's Received: header comes first and names trimta's EHLO.
    assert text.startswith(b"Received: from mx.trimta.test")
    assert f"with ESMTP id {queue_id}".encode() in text
    assert f"{queue_id}: from=<alice@example.org>" in postfix_log
    assert "host=127.0.0.1 result=delivered" in daemon.log()


def test_postfix_rejected_recipient_bounces(daemon_factory):
    reject = {
        "smtpd_recipient_restrictions": (
            "check_recipient_access inline:{ "
            "{ nobody@example.net = 550 5.1.1 mailbox nobody is unknown here } }, "
            "permit_mynetworks, reject_unauth_destination"
        ),
    }
    with (
        run_sink() as sink,
        run_postfix(("127.0.0.1", sink.port), settings=reject) as postfix,
    ):
        daemon = daemon_factory(**route_config(postfix.port))
        body = b"Subject: half\r\nMessage-ID: <p2@example.org>\r\n\r\nx\r\n"
        send(daemon, "alice@localhost", ["nobody@example.net", "bob@example.net"], body)
        [dsn_raw] = daemon.wait_for_mailbox("localhost", "alice")
        [message] = sink.wait_for(1)
        wait_until(
            lambda: daemon.spool_parts("example.net") == [], what="spool to empty"
        )
    assert message.recipients == ("bob@example.net",)
    dsn = email.message_from_bytes(dsn_raw, policy=email.policy.SMTPUTF8)
    status = list(dsn.iter_parts())[1].as_string()
    assert "Final-Recipient: rfc822; nobody@example.net" in status
    assert "Action: failed" in status
    assert "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1" in status
    assert "mailbox nobody is unknown here" in status
    assert "bob@example.net" not in status
