"""Relaying end to end: trimta delivers to Postfix's smtp-sink as next hop."""

from __future__ import annotations

import email
import email.policy
import smtplib
import time

import pytest

from harness import wait_until
from sink import run_sink


def relay_config(sink_port: int, *, delivery: str = "", routes: str | None = None) -> dict:
    route = routes if routes is not None else f'"example.net" = ["127.0.0.1:{sink_port}"]'
    return dict(
        relay=("example.net",),
        extra=f"[routes]\n{route}\n[delivery]\n{delivery}\n",
    )


def send(daemon, sender, recipients, body: bytes, options=()):
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.example.org")
        return client.sendmail(sender, recipients, body, list(options))



def parsed(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.SMTPUTF8)


def test_relay_through_route_to_sink(daemon_factory, tmp_path):
    with run_sink(tmp_path / "sink") as sink:
        daemon = daemon_factory(**relay_config(sink.port))
        body = b"Subject: relayed\r\n\r\nhello\r\n"
        send(daemon, "alice@example.org", ["bob@example.net", "carol@example.net"], body)
        [message] = sink.wait_for(1)
        assert message.sender == "alice@example.org"
        assert sorted(message.recipients) == ["bob@example.net", "carol@example.net"]
        assert message.message.replace(b"\r\n", b"\n").endswith(b"Subject: relayed\n\nhello\n")
        assert message.message.startswith(b"Received: from client.example.org")
        wait_until(lambda: daemon.spool_parts("example.net") == [], what="spool to empty")
        assert "attempt mid=" in daemon.log()


def test_relayed_dot_lines_arrive_intact(daemon_factory, tmp_path):
    # The relaying half of the dot-transparency case: each line that starts
    # with a dot must be stuffed again on the way out.
    with run_sink(tmp_path / "sink") as sink:
        daemon = daemon_factory(**relay_config(sink.port))
        text = b"line1\r\n.\r\n.leading dot\r\n .\r\n \r\n..\r\n\tx\r\nlast\r\n"
        send(daemon, "alice@example.org", ["bob@example.net"], b"Subject: dots\r\n\r\n" + text)
        [message] = sink.wait_for(1)
        expected = text.replace(b"\r\n", b"\n")
        assert message.message.replace(b"\r\n", b"\n").endswith(b"Subject: dots\n\n" + expected)


def test_rcpt_5xx_bounces_to_local_sender(daemon_factory, tmp_path):
    with run_sink(tmp_path / "sink", options=["-f", "RCPT"]) as sink:
        daemon = daemon_factory(**relay_config(sink.port))
        send(daemon, "alice@localhost", ["bob@example.net"], b"Subject: doomed\r\nMessage-ID: <x1@example.org>\r\n\r\nbody\r\n")
        [dsn_raw] = daemon.wait_for_mailbox("localhost", "alice")
        dsn = parsed(dsn_raw)
        assert dsn["Return-Path"] == "<>"
        assert dsn.get_content_type() == "multipart/report"
        assert dsn.get_param("report-type") == "delivery-status"
        parts = list(dsn.iter_parts())
        assert parts[1].get_content_type() == "message/delivery-status"
        status = parts[1].as_string()
        assert "Final-Recipient: rfc822; bob@example.net" in status
        assert "Action: failed" in status
        assert "Status: 5." in status
        assert "Diagnostic-Code: smtp; 500 5.3.0" in status
        assert parts[2].get_content_type() == "text/rfc822-headers"
        assert "Message-ID: <x1@example.org>" in parts[2].get_content()
        assert sink.messages() == []
        wait_until(lambda: daemon.spool_parts("example.net") == [], what="spool to empty")


def test_null_sender_never_bounced(daemon_factory, tmp_path):
    with run_sink(tmp_path / "sink", options=["-f", "RCPT"]) as sink:
        daemon = daemon_factory(**relay_config(sink.port))
        send(daemon, "", ["bob@example.net"], b"Subject: bounce of a bounce\r\n\r\nx\r\n")
        wait_until(lambda: "bounce dropped" in daemon.log(), what="bounce dropped log line")
        wait_until(lambda: daemon.spool_parts("example.net") == [], what="spool to empty")
        assert list(daemon.mail.glob("*/*/new/*")) == []


def test_4xx_deferred_then_delivered(daemon_factory, tmp_path):
    with run_sink(tmp_path / "soft", options=["-r", "RCPT"]) as soft:
        port = soft.port
        daemon = daemon_factory(**relay_config(port, delivery='min_backoff = "2s"'))
        send(daemon, "alice@example.org", ["bob@example.net"], b"Subject: later\r\n\r\nx\r\n")
        wait_until(lambda: "deferred mid=" in daemon.log(), what="a saved deferral")
        [envelope] = daemon.spool_parts("example.net")
        assert envelope["attempts"] == 1
        assert envelope["recipients"][0]["state"] == "pending"
        assert envelope["recipients"][0]["last_error"].startswith("450 4.3.0")
    with run_sink(tmp_path / "good", port=port) as good:
        [message] = good.wait_for(1)
        assert message.recipients == ("bob@example.net",)
    wait_until(lambda: daemon.spool_parts("example.net") == [], what="spool to empty")


def test_expired_message_bounces(daemon_factory, tmp_path):
    with run_sink(tmp_path / "soft", options=["-r", "RCPT"]) as soft:
        daemon = daemon_factory(
            **relay_config(soft.port, delivery='min_backoff = "1s"\nmax_queue_lifetime = "3s"')
        )
        send(daemon, "alice@localhost", ["bob@example.net"], b"Subject: slow\r\n\r\nx\r\n")
        [dsn_raw] = daemon.wait_for_mailbox("localhost", "alice", timeout=30)
    status = list(parsed(dsn_raw).iter_parts())[1].as_string()
    assert "Status: 4.4.7" in status
    assert "Action: failed" in status
    assert "450 4.3.0" in status


def test_unreachable_route_defers(daemon_factory, tmp_path):
    with run_sink(tmp_path / "sink") as sink:
        port = sink.port
    daemon = daemon_factory(**relay_config(port))
    send(daemon, "alice@example.org", ["bob@example.net"], b"Subject: nobody home\r\n\r\nx\r\n")
    wait_until(lambda: "deferred mid=" in daemon.log(), what="a saved deferral")
    [envelope] = daemon.spool_parts("example.net")
    assert "connect failed" in envelope["recipients"][0]["last_error"]
    assert envelope["next_attempt"] > envelope["arrival"] + 200


def test_message_survives_sigkill_during_delivery(daemon_factory, tmp_path):
    # The next hop stalls before answering DATA, and trimta is killed then.
    with run_sink(tmp_path / "slow", options=["-w", "30"]) as slow:
        port = slow.port
        daemon = daemon_factory(**relay_config(port, delivery='min_backoff = "1s"'))
        send(daemon, "alice@example.org", ["bob@example.net"], b"Subject: kill\r\n\r\nsurvivor\r\n")
        time.sleep(1.0)
        daemon.kill()
    with run_sink(tmp_path / "good", port=port) as good:
        daemon.start()
        [message] = good.wait_for(1)
        assert b"survivor" in message.message
    wait_until(lambda: daemon.spool_parts("example.net") == [], what="spool to empty")
    assert daemon.stop() == 0


def test_smtputf8_message_bounces_at_hop_without_it(daemon_factory, tmp_path):
    with run_sink(tmp_path / "sink") as sink:
        daemon = daemon_factory(**relay_config(sink.port))
        send(
            daemon, "alice@localhost", ["bøb@example.net"],
            "Subject: ü\r\n\r\nx\r\n".encode(), options=["SMTPUTF8"],
        )
        [dsn_raw] = daemon.wait_for_mailbox("localhost", "alice")
        assert sink.messages() == []
    status = list(parsed(dsn_raw).iter_parts())[1].as_string()
    assert "Status: 5.6.7" in status


@pytest.mark.parametrize("count", [200])
def test_burst_shares_connections_within_limit(daemon_factory, tmp_path, count):
    with run_sink(tmp_path / "sink") as sink:
        daemon = daemon_factory(
            **relay_config(sink.port, delivery="per_domain_concurrency = 2"),
        )
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            for index in range(count):
                client.sendmail("alice@example.org", [f"user{index}@example.net"], b"Subject: burst\r\n\r\nx\r\n")
        sink.wait_for(count, timeout=60)
        wait_until(lambda: daemon.spool_parts("example.net") == [], what="spool to empty")
    log = daemon.log()
    assert log.count("result=delivered") == count
