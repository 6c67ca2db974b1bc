"""HeaderCompleter: Message-ID and Date added to submitted messages."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from trimta.listen.submission import HeaderCompleter

NOW = datetime(2024, 1, 1, tzinfo=timezone.utc)
ADDED = b"Message-ID: <q1@mx.example.test>\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"


def complete(message: bytes, chunk: int) -> bytes:
    completer = HeaderCompleter("<q1@mx.example.test>", NOW)
    pieces = [message[i : i + chunk] for i in range(0, len(message), chunk)]
    return b"".join(completer.feed(piece) for piece in pieces) + completer.finish()


@pytest.mark.parametrize("chunk", [1, 2, 5, 4096])
def test_fields_added_before_blank_line(chunk):
    out = complete(b"Subject: hi\r\n\r\nbody\r\n", chunk)
    assert out == b"Subject: hi\r\n" + ADDED + b"\r\nbody\r\n"


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_existing_fields_kept_not_doubled(chunk):
    message = b"MESSAGE-ID: <a@b>\r\ndate: x\r\n\r\nMessage-ID: in body\r\n"
    assert complete(message, chunk) == message


def test_only_missing_date_added():
    out = complete(b"Message-Id: <a@b>\r\n\r\nbody\r\n", 3)
    assert out == b"Message-Id: <a@b>\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n"


def test_folded_field_stays_in_header():
    message = b"Subject: a\r\n long fold\r\n\r\nb\r\n"
    assert complete(message, 1) == b"Subject: a\r\n long fold\r\n" + ADDED + b"\r\nb\r\n"


def test_header_only_message_gets_fields_at_end():
    assert complete(b"Subject: a\r\n", 2) == b"Subject: a\r\n" + ADDED


def test_body_without_header_gets_separator():
    assert complete(b"hello world\r\n", 4) == ADDED + b"\r\nhello world\r\n"


def test_long_field_name_passes_through():
    name = b"X-" + b"a" * 40
    message = name + b": v\r\n\r\nb\r\n"
    assert complete(message, 7) == name + b": v\r\n" + ADDED + b"\r\nb\r\n"
