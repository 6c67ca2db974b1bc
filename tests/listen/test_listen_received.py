"""The Received: header cannot be split or extended by client input."""

from __future__ import annotations

from datetime import datetime, timezone

from trimta.listen.received import clean_helo, format_received

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)


def build(helo: str, recipient: str | None = "bob@example.org") -> bytes:
    return format_received(
        helo=helo,
        client_address="192.0.2.1",
        hostname="mx.example.org",
        protocol="ESMTP",
        queue_id="0abc",
        recipient=recipient,
        now=NOW,
    )


def test_received_header_layout():
    header = build("client.example.net")
    assert header == (
        b"Received: from client.example.net ([192.0.2.1])\r\n"
        b"\tby mx.example.org (trimta) with ESMTP id 0abc\r\n"
        b"\tfor <bob@example.org>;\r\n"
        b"\tFri, 04 Dec 2026 12:00:00 +0000\r\n"
    )


def test_hostile_helo_cannot_add_lines():
    header = build("evil\r\nBcc: victim@example.org\nX: (y)")
    lines = header.split(b"\r\n")
    assert lines[0].startswith(b"Received: from evil??Bcc:?victim?example.org?X:??y? (")
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    assert b"\n" not in header.replace(b"\r\n", b"")
    assert b"\r" not in header.replace(b"\r\n", b"")


def test_helo_cut_to_bounded_length():
    assert len(clean_helo("a" * 10_000)) == 255
    assert clean_helo("") == "unknown"


def test_several_recipients_not_listed():
    header = build("client.example.net", recipient=None)
    assert b"for <" not in header
    assert b"id 0abc;\r\n" in header
