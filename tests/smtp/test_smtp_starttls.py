"""STARTTLS (RFC 3207) in the sans-IO server engine."""

from __future__ import annotations

import pytest

from test_smtp_auth_support import Driver
from trimta.smtp.errors import LocalProtocolError
from trimta.smtp.events import NEED_DATA, Ehlo, MailFrom, StartTls
from trimta.smtp.server import State


def ehlo_lines(driver: Driver) -> list[bytes]:
    wire = driver.send(b"EHLO client.example.net\r\n")
    return [line[4:] for line in wire.split(b"\r\n") if line]


def test_starttls_advertised_before_tls_only():
    driver = Driver(starttls=True)
    assert b"STARTTLS" in ehlo_lines(driver)
    assert driver.codes(b"STARTTLS\r\n") == ["220"]
    assert b"STARTTLS" not in ehlo_lines(driver)


def test_starttls_not_offered_gets_502():
    driver = Driver()
    assert b"STARTTLS" not in ehlo_lines(driver)
    assert driver.codes(b"STARTTLS\r\n") == ["502"]


def test_starttls_reply_is_220_2_0_0():
    driver = Driver(starttls=True)
    driver.send(b"EHLO c.example\r\n")
    assert driver.send(b"STARTTLS\r\n").startswith(b"220 2.0.0 ")
    assert isinstance(driver.events[-1], StartTls)


def test_starttls_with_argument_gets_501():
    driver = Driver(starttls=True)
    driver.send(b"EHLO c.example\r\n")
    assert driver.codes(b"STARTTLS now\r\n") == ["501"]
    assert not driver.conn.secure


def test_second_starttls_gets_503():
    driver = Driver(starttls=True)
    driver.send(b"EHLO c.example\r\nSTARTTLS\r\n")
    assert driver.conn.secure
    assert driver.codes(b"EHLO c.example\r\nSTARTTLS\r\n") == ["250", "503"]


def test_starttls_in_transaction_gets_503():
    driver = Driver(starttls=True)
    driver.send(b"EHLO c.example\r\nMAIL FROM:<a@example.net>\r\n")
    assert driver.codes(b"STARTTLS\r\n") == ["503"]
    assert driver.conn.in_transaction


def test_starttls_on_implicit_tls_gets_503():
    driver = Driver(starttls=True, secure=True)
    driver.send(b"EHLO c.example\r\n")
    assert driver.codes(b"STARTTLS\r\n") == ["503"]


def test_pipelined_mail_after_starttls_discarded():
    driver = Driver(starttls=True)
    driver.send(b"EHLO c.example\r\n")
    wire = driver.send(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n")
    assert wire == b"220 2.0.0 ready to start TLS\r\n"
    assert not any(isinstance(event, MailFrom) for event in driver.events)
    # After the handshake the injected MAIL must not run either.
    assert driver.codes(b"NOOP\r\n") == ["250"]
    assert not any(isinstance(event, MailFrom) for event in driver.events)
    assert not driver.conn.in_transaction


def test_input_during_handshake_dropped():
    driver = Driver(starttls=True)
    driver.send(b"EHLO c.example\r\n")
    driver.conn.receive_data(b"STARTTLS\r\n")
    assert isinstance(driver.conn.next_event(), StartTls)
    assert driver.conn.state is State.STARTTLS
    driver.conn.receive_data(b"MAIL FROM:<evil@x>\r\n")
    with pytest.raises(LocalProtocolError):
        driver.conn.next_event()
    driver.conn.tls_started()
    assert driver.conn.next_event() is NEED_DATA
    driver.conn.data_to_send()
    assert driver.codes(b"EHLO c.example\r\nMAIL FROM:<a@example.net>\r\n") == [
        "250",
        "250",
    ]
    assert [type(e) for e in driver.events[-2:]] == [Ehlo, MailFrom]


def test_mail_after_tls_needs_new_ehlo():
    driver = Driver(starttls=True)
    driver.send(b"EHLO c.example\r\nSTARTTLS\r\n")
    assert driver.conn.helo_name is None
    assert driver.codes(b"MAIL FROM:<a@example.net>\r\n") == ["503"]
    assert driver.codes(b"EHLO c.example\r\nMAIL FROM:<a@example.net>\r\n") == [
        "250",
        "250",
    ]


def test_starttls_forgets_earlier_auth():
    driver = Driver(starttls=True, allow_plaintext_auth=True)
    plain = b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABjb3JyZWN0LWhvcnNl\r\n"
    assert driver.codes(b"EHLO c.example\r\n" + plain) == ["250", "235"]
    assert driver.conn.auth_user == "alice@example.test"
    driver.send(b"STARTTLS\r\n")
    assert driver.conn.auth_user is None


def test_failed_handshake_closes_session():
    driver = Driver(starttls=True, tls_ok=False)
    driver.send(b"EHLO c.example\r\nSTARTTLS\r\nNOOP\r\n")
    assert driver.conn.state is State.CLOSED
    assert not driver.conn.secure


def test_tls_started_outside_handshake_raises():
    driver = Driver(starttls=True)
    with pytest.raises(LocalProtocolError):
        driver.conn.tls_started()
