"""Tests for trimta.smtp.stuffing: output dot-stuffing for the SMTP client."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimta.smtp.dotstuff import DotReader
from trimta.smtp.stuffing import DotStuffer, stuff_message


def stuff_chunks(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.stuff(chunk) for chunk in chunks) + stuffer.finish()


def unstuff(wire: bytes) -> bytes:
    reader = DotReader()
    content = reader.feed(wire)
    assert reader.finished
    assert reader.remainder == b""
    assert reader.problems == set()
    return content


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        (b"", b".\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"..\r\n", b"...\r\n.\r\n"),
        (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
        (b"a.b\r\n", b"a.b\r\n.\r\n"),
        (b"a\r\n\r\n.\r\n", b"a\r\n\r\n..\r\n.\r\n"),
        (b"no end", b"no end\r\n.\r\n"),
        (b"x\r\n.", b"x\r\n..\r\n.\r\n"),
    ],
)
def test_stuff_message_wire_bytes(body, wire):
    assert stuff_message(body) == wire


@pytest.mark.parametrize(
    "chunks",
    [
        [b"a\r\n", b".b\r\n"],  # "." opens the chunk after CRLF
        [b"a\r", b"\n.b\r\n"],  # CR | LF "."
        [b"a\r", b"\n", b".b\r\n"],  # CR | LF | "."
        [b"a", b"\r", b"\n", b".", b"b\r\n"],
        [b".", b".", b"\r\n"],  # only the first dot of the line is doubled
    ],
)
def test_line_start_split_across_chunks(chunks):
    body = b"".join(chunks)
    assert stuff_chunks(chunks) == stuff_message(body)


def test_bare_line_endings_not_stuffed():
    # Only CRLF ends a line in SMTP, so "." after a bare LF or CR is content.
    assert stuff_message(b"a\n.b\r.c\r\n") == b"a\n.b\r.c\r\n.\r\n"


def test_empty_chunks_change_nothing():
    assert stuff_chunks([b"", b".a\r\n", b"", b""]) == b"..a\r\n.\r\n"


def test_stuff_after_finish_rejected():
    stuffer = DotStuffer()
    stuffer.finish()
    with pytest.raises(ValueError):
        stuffer.stuff(b"late\r\n")
    with pytest.raises(ValueError):
        stuffer.finish()


def test_stuffing_does_not_buffer():
    stuffer = DotStuffer()
    assert stuffer.stuff(b"abc") == b"abc"
    assert stuffer.stuff(b"\r") == b"\r"
    assert stuffer.stuff(b"\n") == b"\n"
    assert stuffer.stuff(b".") == b".."


# Lines without CR or LF but rich in dots, so line starts often hold ".".
_LINE = st.lists(st.sampled_from([b".", b"a", b" ", b"\x00", b"\xff"]), max_size=6)
_BODY = st.lists(_LINE.map(lambda parts: b"".join(parts) + b"\r\n"), max_size=12).map(
    b"".join
)


@st.composite
def body_and_chunks(draw):
    body = draw(_BODY)
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=10)))
    bounds = [0, *cuts, len(body)]
    chunks = [body[start:end] for start, end in itertools.pairwise(bounds)]
    return body, chunks


@settings(max_examples=400, deadline=None)
@given(body_and_chunks())
def test_stuff_then_dotreader_round_trip(case):
    body, chunks = case
    wire = stuff_chunks(chunks)
    assert wire == stuff_message(body)
    assert unstuff(wire) == body


@settings(max_examples=200, deadline=None)
@given(_BODY, st.binary(min_size=1, max_size=5).filter(lambda t: b"\r" not in t))
def test_unterminated_body_gets_crlf(body, tail):
    # A body whose last line lacks CRLF arrives with CRLF added, nothing else.
    tail = tail.replace(b"\n", b"a")
    assert unstuff(stuff_message(body + tail)) == body + tail + b"\r\n"


@settings(max_examples=200, deadline=None)
@given(body_and_chunks(), st.integers(1, 7))
def test_round_trip_with_chunked_reading(case, read_size):
    body, chunks = case
    wire = stuff_chunks(chunks)
    reader = DotReader()
    content = bytearray()
    for start in range(0, len(wire), read_size):
        content += reader.feed(wire[start : start + read_size])
        if reader.finished:
            break
    assert reader.finished
    assert bytes(content) == body
