"""DSN construction, checked by parsing the result with the stdlib email package."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

import pytest

from trimta.deliver.bounce import (
    FailedRecipient,
    build_bounce,
    read_original_headers,
    recipients_to_notify,
    should_bounce,
)
from trimta.spool import names
from trimta.spool.envelope import ClientInfo, Envelope, Recipient

NOW = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
ARRIVAL = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
ORIGINAL_HEADERS = (
    b"From: Alice <alice@example.net>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <abc@example.net>\r\n"
)
USER_UNKNOWN = FailedRecipient(
    address="bob@example.org",
    status="5.1.1",
    diagnostic="550 5.1.1 <bob@example.org>: no such user",
    remote_mta="mx1.example.org",
)


def make_envelope(sender="alice@example.net", recipients=None, params=None):
    return Envelope(
        id=names.new_mid(),
        domain="example.org",
        sender=sender,
        recipients=recipients or [Recipient("bob@example.org")],
        arrival=ARRIVAL.timestamp(),
        size=1234,
        params=params if params is not None else {"ENVID": "QQ+2B314"},
        client=ClientInfo(helo="client.example.net", address="192.0.2.5"),
    )


def bounce(failed, envelope=None, headers=ORIGINAL_HEADERS, now=NOW):
    return build_bounce(
        envelope=envelope or make_envelope(),
        failed=failed,
        reporting_mta="mx.trimta.test",
        original_headers=headers,
        postmaster="postmaster@trimta.test",
        now=now,
        message_id_domain="trimta.test",
    )


def parse(dsn: bytes):
    return email.message_from_bytes(dsn, policy=email.policy.default)


def status_blocks(dsn: bytes):
    """Return the per-message block and the recipient blocks of a DSN."""
    report = parse(dsn).get_payload()[1]
    blocks = report.get_payload()
    return blocks[0], blocks[1:]


def test_bounce_top_headers():
    envelope = make_envelope()
    message = parse(bounce([USER_UNKNOWN], envelope))
    assert message["From"] == "Mail Delivery System <postmaster@trimta.test>"
    assert message["To"] == "alice@example.net"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert parsedate_to_datetime(message["Date"]) == NOW
    assert re.fullmatch(
        rf"<{envelope.id}\.[0-9a-f]{{16}}@trimta\.test>", message["Message-ID"]
    )
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"


def test_bounce_has_three_parts():
    message = parse(bounce([USER_UNKNOWN]))
    parts = message.get_payload()
    assert [part.get_content_type() for part in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert not message.defects
    for part in parts:
        assert not part.defects


def test_bounce_message_ids_differ():
    first = parse(bounce([USER_UNKNOWN]))["Message-ID"]
    second = parse(bounce([USER_UNKNOWN]))["Message-ID"]
    assert first != second


def test_per_message_fields():
    per_message, _ = status_blocks(bounce([USER_UNKNOWN]))
    assert per_message["Reporting-MTA"] == "dns; mx.trimta.test"
    # ENVID arrives as xtext; "+2B" is "+".
    assert per_message["Original-Envelope-Id"] == "QQ+314"
    assert per_message["Received-From-MTA"] == "dns; client.example.net"
    assert parsedate_to_datetime(per_message["Arrival-Date"]) == ARRIVAL
    assert set(per_message.keys()) == {
        "Reporting-MTA",
        "Original-Envelope-Id",
        "Received-From-MTA",
        "Arrival-Date",
    }


def test_no_envid_no_envelope_id_field():
    envelope = make_envelope(params={})
    per_message, _ = status_blocks(bounce([USER_UNKNOWN], envelope))
    assert "Original-Envelope-Id" not in per_message


def test_per_recipient_fields():
    _, recipients = status_blocks(bounce([USER_UNKNOWN]))
    assert len(recipients) == 1
    block = recipients[0]
    assert block["Final-Recipient"] == "rfc822; bob@example.org"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx1.example.org"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.org>: no such user"
    assert parsedate_to_datetime(block["Last-Attempt-Date"]) == NOW
    assert "Original-Recipient" not in block
    assert "Will-Retry-Until" not in block


def test_one_block_per_recipient():
    second = FailedRecipient(
        address="carol@example.org",
        status="5.2.2",
        diagnostic="552 5.2.2 mailbox full",
        remote_mta="mx2.example.org",
    )
    _, recipients = status_blocks(bounce([USER_UNKNOWN, second]))
    assert [block["Final-Recipient"] for block in recipients] == [
        "rfc822; bob@example.org",
        "rfc822; carol@example.org",
    ]
    assert [block["Status"] for block in recipients] == ["5.1.1", "5.2.2"]
    assert recipients[1]["Remote-MTA"] == "dns; mx2.example.org"


def test_orcpt_reported_decoded():
    failed = FailedRecipient(
        address="bob@example.org",
        status="5.1.1",
        diagnostic=None,
        remote_mta=None,
        orcpt="rfc822;bob+2Blists@example.org",
    )
    _, recipients = status_blocks(bounce([failed]))
    block = recipients[0]
    assert block["Original-Recipient"] == "rfc822; bob+lists@example.org"
    assert "Remote-MTA" not in block
    assert "Diagnostic-Code" not in block


def test_unknown_orcpt_type_kept():
    failed = FailedRecipient(
        "bob@example.org", "5.1.1", None, None, orcpt="x-other;a+2Bb"
    )
    _, recipients = status_blocks(bounce([failed]))
    assert recipients[0]["Original-Recipient"] == "x-other; a+2Bb"


def test_utf8_recipient_uses_utf8_type():
    failed = FailedRecipient("jörg+x@bücher.example", "5.1.1", None, None)
    dsn = bounce([failed])
    _, recipients = status_blocks(dsn)
    assert recipients[0]["Final-Recipient"] == (
        "utf-8; j\\x{F6}rg\\x{2B}x@b\\x{FC}cher.example"
    )
    text_part = parse(dsn).get_payload()[0]
    assert text_part["Content-Transfer-Encoding"] == "quoted-printable"
    assert "<jörg+x@bücher.example>" in text_part.get_content()


def test_status_part_is_ascii():
    failed = FailedRecipient("jörg@example.org", "5.1.1", "550 ünknown", "mx.example")
    dsn = bounce([failed])
    report = dsn.split(b"message/delivery-status", 1)[1].split(b"--=_trimta_", 1)[0]
    assert report.isascii()


def test_human_text_lists_recipients():
    dsn = bounce([USER_UNKNOWN])
    text_part = parse(dsn).get_payload()[0]
    assert text_part.get_content_type() == "text/plain"
    assert text_part["Content-Transfer-Encoding"] == "7bit"
    text = text_part.get_content()
    assert "mx.trimta.test" in text
    assert "<bob@example.org>" in text
    assert "status 5.1.1, from mx1.example.org" in text
    assert "550 5.1.1 <bob@example.org>: no such user" in text
    assert "given up" in text


def test_original_headers_returned():
    message = parse(bounce([USER_UNKNOWN]))
    headers_part = message.get_payload()[2]
    assert headers_part.get_payload(decode=True) == ORIGINAL_HEADERS


def test_lf_original_headers_get_crlf():
    headers = b"Subject: x\nFrom: a@example.net\n"
    dsn = bounce([USER_UNKNOWN], headers=headers)
    assert b"Subject: x\r\nFrom: a@example.net\r\n" in dsn
    assert re.search(rb"[^\r]\n", dsn) is None


def test_empty_original_headers_two_parts():
    message = parse(bounce([USER_UNKNOWN], headers=b""))
    assert len(message.get_payload()) == 2


def test_every_line_ends_crlf():
    dsn = bounce([USER_UNKNOWN])
    assert dsn.endswith(b"\r\n")
    assert re.search(rb"[^\r]\n", dsn) is None
    assert b"\r\r" not in dsn


def test_remote_text_cannot_inject_fields():
    failed = FailedRecipient(
        address="bob@example.org",
        status="5.7.1",
        diagnostic="550 5.7.1 no\r\nBcc: victim@example.com\r\n\r\nbody",
        remote_mta="mx.example.org\r\nX-Injected: yes",
    )
    dsn = bounce([failed])
    assert b"\r\nBcc:" not in dsn
    assert b"\r\nX-Injected:" not in dsn
    _, recipients = status_blocks(dsn)
    block = recipients[0]
    assert block["Diagnostic-Code"] == (
        "smtp; 550 5.7.1 no Bcc: victim@example.com body"
    )
    assert block["Remote-MTA"] == "dns; mx.example.org X-Injected: yes"
    assert "Bcc" not in block
    assert "X-Injected" not in block


def test_control_characters_replaced():
    failed = FailedRecipient(
        "bob@example.org", "5.0.0", "550 a\x00b\x1b[31mc\x7fd", "mx\x00.example"
    )
    dsn = bounce([failed])
    assert b"\x00" not in dsn
    assert b"\x1b" not in dsn
    assert b"\x7f" not in dsn
    _, recipients = status_blocks(dsn)
    assert recipients[0]["Diagnostic-Code"] == "smtp; 550 a b [31mc d"
    assert recipients[0]["Remote-MTA"] == "dns; mx .example"


def test_long_diagnostic_folded_and_cut():
    words = " ".join(f"word{i}" for i in range(2000))
    unbroken = "x" * 3000
    failed = FailedRecipient(
        "bob@example.org", "5.0.0", f"550 {words} {unbroken}", None
    )
    dsn = bounce([failed])
    assert max(len(line) for line in dsn.split(b"\r\n")) < 998
    _, recipients = status_blocks(dsn)
    diagnostic = recipients[0]["Diagnostic-Code"]
    assert diagnostic.startswith("smtp; 550 word0 word1 ")
    assert diagnostic.endswith("...")
    assert len(diagnostic) <= len("smtp; ") + 900
    folded = dsn.split(b"Diagnostic-Code:", 1)[1].split(b"\r\nLast-Attempt-Date", 1)[0]
    assert folded.count(b"\r\n ") > 5
    assert max(len(line) for line in folded.split(b"\r\n")) <= 78


def test_unbroken_diagnostic_stays_under_limit():
    failed = FailedRecipient("bob@example.org", "5.0.0", "550 " + "y" * 5000, None)
    dsn = bounce([failed])
    assert max(len(line) for line in dsn.split(b"\r\n")) < 998


def test_local_error_diagnostic_type():
    failed = FailedRecipient(
        "bob@example.org", "4.4.1", "connection refused by 192.0.2.9", None
    )
    _, recipients = status_blocks(bounce([failed]))
    assert recipients[0]["Diagnostic-Code"] == (
        "x-trimta; connection refused by 192.0.2.9"
    )


def test_delayed_subject_and_fields():
    until = NOW + timedelta(days=4)
    delayed = FailedRecipient(
        address="bob@example.org",
        status="4.4.1",
        diagnostic="421 4.4.1 try later",
        remote_mta="mx1.example.org",
        action="delayed",
        will_retry_until=until,
    )
    dsn = bounce([delayed])
    message = parse(dsn)
    assert message["Subject"] == "Delayed Mail"
    _, recipients = status_blocks(dsn)
    assert recipients[0]["Action"] == "delayed"
    assert recipients[0]["Status"] == "4.4.1"
    assert parsedate_to_datetime(recipients[0]["Will-Retry-Until"]) == until
    text = message.get_payload()[0].get_content()
    assert "keeps trying" in text
    assert "given up" not in text


def test_mixed_actions_subject_undelivered():
    delayed = FailedRecipient("carol@example.org", "4.4.1", None, None, "delayed")
    dsn = bounce([delayed, USER_UNKNOWN])
    assert parse(dsn)["Subject"] == "Undelivered Mail Returned to Sender"
    _, recipients = status_blocks(dsn)
    assert [block["Action"] for block in recipients] == ["delayed", "failed"]


def test_invalid_action_rejected():
    with pytest.raises(ValueError):
        FailedRecipient("bob@example.org", "5.1.1", None, None, action="bounced")


def test_naive_now_taken_as_utc():
    naive = NOW.replace(tzinfo=None)
    message = parse(bounce([USER_UNKNOWN], now=naive))
    assert parsedate_to_datetime(message["Date"]) == NOW


def test_no_recipients_rejected():
    with pytest.raises(ValueError):
        bounce([])


def test_null_sender_never_bounced():
    assert should_bounce(make_envelope(sender="")) is False
    assert should_bounce(make_envelope(sender="alice@example.net")) is True


@pytest.mark.parametrize(
    ("notify", "expected"),
    [
        (None, ["failed", "delayed"]),
        (["NEVER"], []),
        (["SUCCESS"], []),
        (["FAILURE"], ["failed"]),
        (["DELAY"], ["delayed"]),
        (["failure", "delay"], ["failed", "delayed"]),
        (["SUCCESS", "FAILURE"], ["failed"]),
    ],
)
def test_notify_filters_recipients(notify, expected):
    envelope = make_envelope(
        recipients=[
            Recipient("bob@example.org", notify=notify),
            Recipient("carol@example.org", notify=notify),
        ]
    )
    failed = FailedRecipient("bob@example.org", "5.1.1", None, None, "failed")
    delayed = FailedRecipient("carol@example.org", "4.4.1", None, None, "delayed")
    kept = recipients_to_notify(envelope, [failed, delayed])
    assert [r.action for r in kept] == expected


def test_notify_unknown_recipient_kept():
    envelope = make_envelope(
        recipients=[Recipient("bob@example.org", notify=["NEVER"])]
    )
    other = FailedRecipient("dave@example.org", "5.1.1", None, None)
    assert recipients_to_notify(envelope, [other]) == [other]


def test_read_headers_crlf(tmp_path):
    path = tmp_path / "m.eml"
    path.write_bytes(ORIGINAL_HEADERS + b"\r\nbody line\r\n\r\nmore\r\n")
    assert read_original_headers(path) == ORIGINAL_HEADERS


def test_read_headers_lf(tmp_path):
    path = tmp_path / "m.eml"
    path.write_bytes(b"Subject: x\nTo: y\n\nbody\n")
    assert read_original_headers(path) == b"Subject: x\nTo: y\n"


def test_read_headers_without_body(tmp_path):
    path = tmp_path / "m.eml"
    path.write_bytes(b"Subject: x\r\nTo: y\r\n")
    assert read_original_headers(path) == b"Subject: x\r\nTo: y\r\n"


def test_read_headers_empty_section(tmp_path):
    path = tmp_path / "m.eml"
    path.write_bytes(b"\r\nonly a body\r\n")
    assert read_original_headers(path) == b""


def test_read_headers_across_blocks(tmp_path):
    headers = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"v" * 60) for i in range(400))
    assert len(headers) > 3 * 8192
    path = tmp_path / "m.eml"
    path.write_bytes(headers + b"\r\nbody\r\n")
    assert read_original_headers(path) == headers


def test_read_headers_capped_at_line(tmp_path):
    line = b"X-Filler: " + b"v" * 88 + b"\r\n"
    path = tmp_path / "m.eml"
    path.write_bytes(line * 100 + b"\r\nbody\r\n")
    result = read_original_headers(path, limit=1050)
    assert result == line * 10


def test_read_headers_missing_file(tmp_path):
    with pytest.raises(OSError):
        read_original_headers(tmp_path / "absent.eml")
