"""ETRN end to end: held mail waits, fetchmail and smtplib release it."""

from __future__ import annotations

import os
import smtplib
import subprocess
import time

import pytest

from counting_proxy import run_counting_proxy
from harness import environment_without_proxy, wait_until
from sink import run_sink

FETCHMAIL = "/usr/bin/fetchmail"


def held_config(sink_port: int, extra: str = "", delivery: str = "") -> dict:
    return dict(
        hold=("held.example", "sub.held.example", "other.example"),
        extra=(
            "[routes]\n"
            f'"held.example" = ["127.0.0.1:{sink_port}"]\n'
            f'"sub.held.example" = ["127.0.0.1:{sink_port}"]\n'
            f'"other.example" = ["127.0.0.1:{sink_port}"]\n'
            '[delivery]\nmin_backoff = "1s"\n' + delivery +
            '[etrn.queues]\n"customer" = ["other.example"]\n' + extra
        ),
    )


def queue_held(daemon, domain: str, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        for index in range(count):
            client.sendmail("alice@example.org", [f"user{index}@{domain}"], b"Subject: held\r\n\r\nx\r\n")


def etrn(daemon, argument: str):
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.example.org")
        return client.docmd("ETRN", argument)



def test_held_mail_waits_until_etrn(daemon_factory, tmp_path):
    with run_sink() as sink:
        daemon = daemon_factory(**held_config(sink.port))
        queue_held(daemon, "held.example", 3)
        time.sleep(1.5)
        assert sink.messages() == []
        assert len(daemon.spool_parts("held.example")) == 3

        code, text = etrn(daemon, "held.example")
        assert code == 253
        assert text.startswith(b"2.0.0 OK, 3 pending messages")
        messages = sink.wait_for(3)
        assert sorted(m.recipients[0] for m in messages) == [
            f"user{i}@held.example" for i in range(3)
        ]
        wait_until(lambda: daemon.spool_parts("held.example") == [], what="spool to empty")
    # One ETRN starts one release for all the domain's messages.
    assert daemon.log().count("release started domain=held.example") == 1


def test_release_uses_per_domain_connections(daemon_factory):
    limit = 3
    with run_sink(options=["-w", "1"]) as sink, run_counting_proxy(
        ("127.0.0.1", sink.port)
    ) as proxy:
        daemon = daemon_factory(
            **held_config(proxy.port, delivery=f"per_domain_concurrency = {limit}\n")
        )
        queue_held(daemon, "held.example", 12)
        assert etrn(daemon, "held.example")[0] == 253
        messages = sink.wait_for(12, timeout=60)
        wait_until(lambda: daemon.spool_parts("held.example") == [], what="spool to empty")
    recipients = sorted(m.recipients[0] for m in messages)
    assert recipients == sorted(f"user{i}@held.example" for i in range(12))
    assert 1 < proxy.counts.peak <= limit


def test_etrn_replies(daemon_factory, tmp_path):
    with run_sink() as sink:
        daemon = daemon_factory(**held_config(sink.port))
        assert etrn(daemon, "held.example")[0] == 251
        code, text = etrn(daemon, "unknown.example")
        assert code == 459
        assert text.startswith(b"4.7.1")
        assert etrn(daemon, "localhost")[0] == 459
        assert etrn(daemon, "../../etc")[0] == 501
        assert etrn(daemon, "#nosuchqueue")[0] == 459
        assert etrn(daemon, "#customer")[0] == 251
        assert etrn(daemon, "@held.example")[0] == 251
        queue_held(daemon, "sub.held.example", 1)
        code, text = etrn(daemon, "@held.example")
        assert code == 253
        assert b"1 pending" in text
        sink.wait_for(1)


def test_etrn_rate_limited(daemon_factory, tmp_path):
    with run_sink() as sink:
        daemon = daemon_factory(**held_config(sink.port, "[etrn]\nmax_requests_per_minute = 3\n"))
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.ehlo("client.example.org")
            codes = [client.docmd("ETRN", "held.example")[0] for _ in range(5)]
    assert codes == [251, 251, 251, 458, 458]


def test_repeated_etrn_starts_one_release(daemon_factory, tmp_path):
    with run_sink(options=["-w", "2"]) as sink:
        daemon = daemon_factory(**held_config(sink.port))
        queue_held(daemon, "held.example", 2)
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.ehlo("client.example.org")
            first = client.docmd("ETRN", "held.example")[0]
            second = client.docmd("ETRN", "held.example")[0]
        assert first == 253
        assert second == 250
        sink.wait_for(2, timeout=30)
    assert daemon.log().count("release started domain=held.example") == 1


def test_failed_release_leaves_mail_held(daemon_factory, tmp_path):
    with run_sink(options=["-r", "RCPT"]) as sink:
        daemon = daemon_factory(**held_config(sink.port))
        queue_held(daemon, "held.example", 1)
        assert etrn(daemon, "held.example")[0] == 253
        wait_until(lambda: "held mid=" in daemon.log(), what="the part to stay held")
        time.sleep(2.5)  # longer than min_backoff: no retry on its own
        [envelope] = daemon.spool_parts("held.example")
        assert envelope["attempts"] == 1
        assert envelope["recipients"][0]["state"] == "pending"
        assert envelope["recipients"][0]["last_error"].startswith("450")


def test_turn_always_refused(daemon_factory):
    daemon = daemon_factory(hold=("held.example",))
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.example.org")
        code, text = client.docmd("TURN")
    assert code == 502
    assert text.startswith(b"5.7.0")


def test_etrn_off_on_listener(daemon_factory):
    daemon = daemon_factory("noetrn", hold=("held.example",))
    config = (daemon.folder / "trimta.toml").read_text()
    config = config.replace("[[listener]]\n", "[[listener]]\netrn = false\n")
    daemon.stop()
    (daemon.folder / "trimta.toml").write_text(config)
    daemon.start()
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
        client.ehlo("client.example.org")
        assert not client.has_extn("etrn")
        assert client.docmd("ETRN", "held.example")[0] == 502


@pytest.mark.skipif(not os.path.exists(FETCHMAIL), reason="fetchmail missing")
def test_fetchmail_etrn_releases_held_domain(daemon_factory, tmp_path):
    with run_sink() as sink:
        daemon = daemon_factory(**held_config(sink.port))
        queue_held(daemon, "held.example", 2)
        result = subprocess.run(
            [FETCHMAIL, "-p", "ETRN", "-P", str(daemon.port), "--fetchdomains",
             "held.example", "-f", "/dev/null", "127.0.0.1"],
            capture_output=True, text=True, timeout=60,
            env=environment_without_proxy() | {"HOME": str(tmp_path)},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        messages = sink.wait_for(2)
        assert len(messages) == 2
    assert "etrn sid=" in daemon.log()


def test_etrn_dns_check_requires_domain_mail_server(daemon_factory):
    from dnsmasq import run_dnsmasq

    records = [
        "--mx-host=held.test,mx.held.test,10",
        "--host-record=mx.held.test,127.0.0.1",
    ]
    with run_dnsmasq(records) as dns_port, run_sink() as sink:
        daemon = daemon_factory(
            hold=("held.test",),
            extra=(
                f'[routes]\n"held.test" = ["127.0.0.1:{sink.port}"]\n'
                f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
                '[etrn]\ndns_check = ["held.test"]\n'
            ),
        )
        queue_held(daemon, "held.test", 1)
        with smtplib.SMTP("127.0.0.1", daemon.port, source_address=("127.0.0.2", 0),
                          timeout=30) as outsider:
            outsider.ehlo("client.example.org")
            code, text = outsider.docmd("ETRN", "held.test")
        assert code == 459
        assert b"127.0.0.2 is not a mail server of held.test" in text
        time.sleep(0.5)
        assert sink.messages() == []

        code, _ = etrn(daemon, "held.test")  # from 127.0.0.1, the MX host
        assert code == 253
        sink.wait_for(1)


def test_fifty_etrns_start_one_release(daemon_factory):
    with run_sink(options=["-w", "1"]) as sink:
        daemon = daemon_factory(**held_config(sink.port, "[etrn]\nmax_requests_per_minute = 100\n"))
        queue_held(daemon, "held.example", 3)
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.ehlo("client.example.org")
            codes = [client.docmd("ETRN", "held.example")[0] for _ in range(50)]
        assert codes[0] == 253
        assert set(codes[1:]) <= {250, 251}
        sink.wait_for(3, timeout=60)
    assert daemon.log().count("release started domain=held.example") == 1


def test_restart_during_release_loses_nothing(daemon_factory):
    with run_sink(options=["-w", "30"]) as stalled:
        port = stalled.port
        daemon = daemon_factory(**held_config(port))
        queue_held(daemon, "held.example", 2)
        assert etrn(daemon, "held.example")[0] == 253
        time.sleep(1.0)  # the release waits for the stalled next hop
        daemon.kill()
    with run_sink(port=port) as sink:
        daemon.start()
        assert len(daemon.spool_parts("held.example")) == 2
        assert etrn(daemon, "held.example")[0] == 253
        messages = sink.wait_for(2)
        time.sleep(0.5)
        assert len(sink.messages()) == 2
    assert sorted(m.recipients[0] for m in messages) == ["user0@held.example", "user1@held.example"]


def test_held_mail_expires_with_dsn(daemon_factory):
    with run_sink() as sink:
        daemon = daemon_factory(**held_config(sink.port, '[hold]\nlifetime = "2s"\n'))
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.sendmail("alice@localhost", ["bob@held.example"], b"Subject: waited\r\n\r\nx\r\n")
        [dsn] = daemon.wait_for_mailbox("localhost", "alice", timeout=30)
    assert b"Status: 4.4.7" in dsn
    assert daemon.spool_parts("held.example") == []


def test_fetchmail_etrn_to_mx_from_dnsmasq(daemon_factory, tmp_path):
    from dnsmasq import run_dnsmasq

    records = [
        "--mx-host=site.test,mx.site.test,10",
        "--host-record=mx.site.test,127.0.0.2",
    ]
    try:
        sink_context = run_sink(address="127.0.0.2", port=25)
        sink = sink_context.__enter__()
    except (OSError, RuntimeError) as exc:
        pytest.skip(f"cannot listen on 127.0.0.2:25 here: {exc}")
    try:
        with run_dnsmasq(records) as dns_port:
            daemon = daemon_factory(
                hold=("site.test",),
                extra=f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n',
            )
            body = b"Subject: for the site\r\n\r\nline one\r\n.dotted line\r\n"
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
                for index in range(3):
                    client.sendmail("alice@example.org", [f"u{index}@site.test"], body)
            result = subprocess.run(
                [FETCHMAIL, "-p", "ETRN", "-P", str(daemon.port), "--fetchdomains",
                 "site.test", "-f", "/dev/null", "127.0.0.1"],
                capture_output=True, text=True, timeout=60,
                env=environment_without_proxy() | {"HOME": str(tmp_path)},
            )
            assert result.returncode == 0, result.stdout + result.stderr
            messages = sink.wait_for(3)
            time.sleep(0.5)
            messages = sink.messages()
    finally:
        sink_context.__exit__(None, None, None)
    assert sorted(m.recipients[0] for m in messages) == ["u0@site.test", "u1@site.test", "u2@site.test"]
    for message in messages:
        assert message.message.replace(b"\r\n", b"\n").endswith(b"line one\n.dotted line\n")
