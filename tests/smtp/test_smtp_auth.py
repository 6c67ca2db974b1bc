"""SMTP AUTH (RFC 4954) in the sans-IO server engine."""

from __future__ import annotations

import base64
import re

import pytest

from test_smtp_auth_support import CHALLENGE, Driver, b64
from trimta.smtp import sasl
from trimta.smtp.events import AuthAttempt, MailFrom
from trimta.smtp.server import State

USER = "alice@example.test"
GOOD_PLAIN = b64(f"\0{USER}\0correct-horse")
BAD_PLAIN = b64(f"\0{USER}\0wrong")


def greeted(**settings) -> Driver:
    settings.setdefault("allow_plaintext_auth", True)
    driver = Driver(**settings)
    driver.send(b"EHLO client.example.net\r\n")
    return driver


def test_auth_advertised_with_mechanisms():
    driver = Driver(allow_plaintext_auth=True)
    wire = driver.send(b"EHLO c.example\r\n")
    assert b"250-AUTH PLAIN LOGIN CRAM-MD5\r\n" in wire or wire.endswith(
        b"250 AUTH PLAIN LOGIN CRAM-MD5\r\n"
    )


def test_plaintext_mechanisms_hidden_without_tls():
    driver = Driver()
    wire = driver.send(b"EHLO c.example\r\n")
    assert re.search(rb"250[- ]AUTH CRAM-MD5\r\n", wire)


def test_plaintext_mechanisms_offered_after_tls():
    driver = Driver(starttls=True)
    driver.send(b"EHLO c.example\r\nSTARTTLS\r\n")
    wire = driver.send(b"EHLO c.example\r\n")
    assert re.search(rb"250[- ]AUTH PLAIN LOGIN CRAM-MD5\r\n", wire)


def test_no_mechanisms_no_auth_keyword():
    driver = Driver(auth_mechanisms=())
    assert b"AUTH" not in driver.send(b"EHLO c.example\r\n")
    assert driver.codes(b"AUTH PLAIN\r\n") == ["502"]


def test_plain_without_tls_gets_538():
    driver = greeted(allow_plaintext_auth=False)
    wire = driver.send(b"AUTH PLAIN " + GOOD_PLAIN + b"\r\n")
    assert wire.startswith(b"538 5.7.11 ")
    assert driver.codes(b"AUTH LOGIN\r\n") == ["538"]
    assert not any(isinstance(e, AuthAttempt) for e in driver.events)


def test_plain_initial_response_succeeds():
    driver = greeted()
    wire = driver.send(b"AUTH PLAIN " + GOOD_PLAIN + b"\r\n")
    assert wire == b"235 2.7.0 authentication succeeded\r\n"
    assert driver.conn.auth_user == USER
    [attempt] = [e for e in driver.events if isinstance(e, AuthAttempt)]
    assert attempt.credentials.mechanism == "PLAIN"
    assert attempt.credentials.secret == "correct-horse"


def test_plain_without_initial_response_gets_334():
    driver = greeted()
    assert driver.send(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert driver.conn.state is State.AUTH
    assert driver.codes(GOOD_PLAIN + b"\r\n") == ["235"]


def test_wrong_password_gets_535():
    driver = greeted()
    assert driver.send(b"AUTH PLAIN " + BAD_PLAIN + b"\r\n").startswith(b"535 5.7.8 ")
    assert driver.conn.auth_user is None
    # A failure leaves AUTH available for another try.
    assert driver.codes(b"AUTH PLAIN " + GOOD_PLAIN + b"\r\n") == ["235"]


def test_failed_auth_counts_as_error():
    driver = greeted(max_errors=2)
    driver.send(b"AUTH PLAIN " + BAD_PLAIN + b"\r\n")
    wire = driver.send(b"AUTH PLAIN " + BAD_PLAIN + b"\r\n")
    assert wire.endswith(b"421 4.7.0 too many errors, closing connection\r\n")
    assert driver.conn.state is State.CLOSED


def test_login_exchange_succeeds():
    driver = greeted()
    assert driver.send(b"AUTH LOGIN\r\n") == b"334 " + b64("Username:") + b"\r\n"
    assert driver.send(b64(USER) + b"\r\n") == b"334 " + b64("Password:") + b"\r\n"
    assert driver.codes(b64("correct-horse") + b"\r\n") == ["235"]
    assert driver.conn.auth_user == USER


def test_login_initial_response_is_username():
    driver = greeted()
    assert driver.send(b"AUTH LOGIN " + b64(USER) + b"\r\n").startswith(b"334 UGFzc3")
    assert driver.codes(b64("correct-horse") + b"\r\n") == ["235"]


def test_cram_md5_challenge_and_success():
    driver = greeted(allow_plaintext_auth=False)
    wire = driver.send(b"AUTH CRAM-MD5\r\n")
    assert wire == b"334 " + base64.b64encode(CHALLENGE) + b"\r\n"
    digest = sasl.cram_md5_digest("correct-horse", CHALLENGE)
    assert driver.codes(b64(f"{USER} {digest}") + b"\r\n") == ["235"]


def test_cram_md5_wrong_digest_gets_535():
    driver = greeted()
    driver.send(b"AUTH CRAM-MD5\r\n")
    digest = sasl.cram_md5_digest("wrong", CHALLENGE)
    assert driver.codes(b64(f"{USER} {digest}") + b"\r\n") == ["535"]


def test_cram_md5_initial_response_gets_501():
    driver = greeted()
    assert driver.codes(b"AUTH CRAM-MD5 " + b64("x") + b"\r\n") == ["501"]


def test_cram_md5_malformed_response_gets_501():
    driver = greeted()
    driver.send(b"AUTH CRAM-MD5\r\n")
    assert driver.send(b64("alice nothex") + b"\r\n").startswith(b"501 5.5.2 ")
    assert driver.conn.state is State.COMMAND


def test_star_cancels_with_501_5_7_0():
    driver = greeted()
    driver.send(b"AUTH LOGIN\r\n")
    assert driver.send(b"*\r\n").startswith(b"501 5.7.0 ")
    assert driver.conn.state is State.COMMAND
    assert driver.codes(b"NOOP\r\n") == ["250"]


def test_invalid_base64_initial_response_gets_501():
    driver = greeted()
    assert driver.send(b"AUTH PLAIN !!!not-base64!!!\r\n").startswith(b"501 5.5.2 ")


def test_invalid_base64_response_gets_501():
    driver = greeted()
    driver.send(b"AUTH PLAIN\r\n")
    assert driver.send(b"====\r\n").startswith(b"501 5.5.2 ")
    assert driver.conn.state is State.COMMAND


@pytest.mark.parametrize("length", [1, 2, 3, 495, 4097])
def test_odd_length_base64_gets_501(length):
    driver = greeted()
    assert driver.codes(b"AUTH PLAIN " + b"A" * length + b"\r\n") == ["501"]
    assert driver.codes(b"NOOP\r\n") == ["250"]


def test_equals_empty_initial_response_rejected():
    driver = greeted()
    # "=" is an empty message, and PLAIN needs authcid and password.
    assert driver.send(b"AUTH PLAIN =\r\n").startswith(b"501 5.5.2 ")
    assert not any(isinstance(e, AuthAttempt) for e in driver.events)


def test_equals_empty_later_response_accepted():
    driver = greeted()
    driver.send(b"AUTH LOGIN\r\n")
    driver.send(b64(USER) + b"\r\n")
    # An empty password is read as "=" and rejected as malformed.
    assert driver.send(b"=\r\n").startswith(b"501 5.5.2 ")


def test_auth_before_ehlo_gets_503():
    driver = Driver(allow_plaintext_auth=True)
    assert driver.codes(b"AUTH PLAIN " + GOOD_PLAIN + b"\r\n") == ["503"]
    driver.send(b"HELO c.example\r\n")
    assert driver.codes(b"AUTH PLAIN " + GOOD_PLAIN + b"\r\n") == ["503"]


def test_auth_in_transaction_gets_503():
    driver = greeted()
    driver.send(b"MAIL FROM:<a@example.net>\r\n")
    assert driver.codes(b"AUTH PLAIN " + GOOD_PLAIN + b"\r\n") == ["503"]


def test_second_auth_gets_503():
    driver = greeted()
    driver.send(b"AUTH PLAIN " + GOOD_PLAIN + b"\r\n")
    assert driver.codes(b"AUTH PLAIN " + GOOD_PLAIN + b"\r\n") == ["503"]


def test_unknown_mechanism_gets_504():
    driver = greeted()
    wire = driver.send(b"AUTH X-MAGIC\r\n")
    assert wire.startswith(b"504 5.5.4 ")
    assert b"PLAIN LOGIN CRAM-MD5" in wire


def test_auth_without_mechanism_gets_501():
    driver = greeted()
    assert driver.codes(b"AUTH\r\n") == ["501"]


def test_response_line_over_12288_gets_500():
    driver = greeted()
    driver.send(b"AUTH PLAIN\r\n")
    assert driver.send(b"A" * 12287 + b"\r\n").startswith(b"500 5.5.6 ")
    assert driver.conn.state is State.COMMAND
    assert driver.codes(b"NOOP\r\n") == ["250"]


def test_response_line_near_12288_accepted():
    driver = greeted()
    driver.send(b"AUTH PLAIN\r\n")
    # 12284 base64 octets plus CRLF fit the 12288 limit; the text decodes
    # to a malformed PLAIN message, so the reply is 501, not 500.
    assert driver.send(b"A" * 12280 + b"AA==\r\n")[:3] == b"501"


def test_auth_command_line_over_limit_gets_500():
    driver = greeted()
    wire = driver.send(b"AUTH PLAIN " + b"A" * 12300 + b"\r\n")
    assert wire.startswith(b"500 5.5.6 ")
    assert driver.codes(b"NOOP\r\n") == ["250"]


def test_submission_requires_auth_before_mail():
    driver = greeted(require_auth=True)
    assert driver.send(b"MAIL FROM:<a@example.net>\r\n").startswith(b"530 5.7.0 ")
    driver.send(b"AUTH PLAIN " + GOOD_PLAIN + b"\r\n")
    assert driver.codes(b"MAIL FROM:<a@example.net>\r\n") == ["250"]
    assert isinstance(driver.events[-1], MailFrom)


def test_credentials_repr_hides_secret():
    driver = greeted()
    driver.send(b"AUTH PLAIN " + GOOD_PLAIN + b"\r\n")
    [attempt] = [e for e in driver.events if isinstance(e, AuthAttempt)]
    assert "correct-horse" not in repr(attempt)


def test_mail_auth_parameter_accepted():
    driver = greeted()
    wire = driver.send(b"MAIL FROM:<a@example.net> AUTH=<> SIZE=10\r\n")
    assert wire.startswith(b"250")
    [mail] = [e for e in driver.events if isinstance(e, MailFrom)]
    assert mail.params == {"SIZE": "10"}


def test_mail_auth_parameter_unknown_without_auth():
    driver = Driver(auth_mechanisms=())
    driver.send(b"EHLO c.example\r\n")
    assert driver.codes(b"MAIL FROM:<a@example.net> AUTH=<>\r\n") == ["555"]
