"""Tests for trimta.smtp.dotstuff.DotReader."""

import pytest

from trimta.smtp.dotstuff import DotReader, Problem


def read(data: bytes, chunk: int = 0, max_size: int = 0) -> tuple[bytes, DotReader]:
    """Feed data in pieces of chunk octets (0: all at once) until the dot."""
    reader = DotReader(max_size)
    pieces = (
        [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    )
    out = b""
    for piece in pieces:
        if reader.finished:
            reader.remainder += piece
            continue
        out += reader.feed(piece)
    return out, reader


CHUNKS = [0, 1, 2, 3, 5, 7, 64]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_dot_transparency_body(chunk):
    data = (
        b"Subject: dots\r\n\r\nline1\r\n..\r\n..leading dot\r\n .\r\n. \r\n"
        b"...\r\n.\tx\r\nlast\r\n.\r\nQUIT\r\n"
    )
    out, reader = read(data, chunk)
    assert out == (
        b"Subject: dots\r\n\r\nline1\r\n.\r\n.leading dot\r\n .\r\n \r\n"
        b"..\r\n\tx\r\nlast\r\n"
    )
    assert reader.finished
    assert reader.remainder == b"QUIT\r\n"
    assert reader.problem is None
    assert reader.size == len(out)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_empty_message_right_after_354(chunk):
    out, reader = read(b".\r\nNOOP\r\n", chunk)
    assert out == b""
    assert reader.finished
    assert reader.remainder == b"NOOP\r\n"


def test_leading_dot_on_first_line_unstuffed():
    out, _ = read(b"..x\r\n.\r\n")
    assert out == b".x\r\n"


def test_unfinished_data_holds_at_most_four_octets():
    reader = DotReader()
    out = reader.feed(b"abc\r\n.\r")
    assert out == b"abc"
    assert not reader.finished
    assert reader.feed(b"\n") == b"\r\n"
    assert reader.finished


def test_feed_after_finish_raises():
    _, reader = read(b".\r\n")
    with pytest.raises(ValueError):
        reader.feed(b"x")


@pytest.mark.parametrize(
    "body",
    [
        b"body a\n.\nMAIL FROM:<ceo@example.test>\r\n",
        b"body b\r\n.\nMAIL FROM:<ceo@example.test>\r\n",
        b"body c\r.\rMAIL FROM:<ceo@example.test>\r\n",
        b"body d\r\n.\r\r\nMAIL FROM:<ceo@example.test>\r\n",
        b"bare cr at end\r",
        b"\n",
        b"\rstart\r\n",
    ],
)
@pytest.mark.parametrize("chunk", [0, 1, 3])
def test_bare_line_endings_never_end_data(body, chunk):
    data = b"Subject: x\r\n\r\n" + body + b"\r\n.\r\nRSET\r\n"
    out, reader = read(data, chunk)
    assert reader.finished
    assert reader.remainder == b"RSET\r\n"
    assert reader.problem is Problem.BARE_LINE_ENDING
    assert out.startswith(b"Subject: x\r\n\r\n")


@pytest.mark.parametrize("chunk", [0, 1, 9, 500])
def test_text_line_limit_is_1000_with_crlf(chunk):
    _, ok = read(b"a\r\n" + b"x" * 998 + b"\r\n.\r\n", chunk)
    _, long = read(b"a\r\n" + b"x" * 999 + b"\r\n.\r\n", chunk)
    _, first = read(b"x" * 5000 + b"\r\nnext\r\n.\r\n", chunk)
    assert ok.problem is None
    assert long.problem is Problem.LINE_TOO_LONG
    assert first.problem is Problem.LINE_TOO_LONG


def test_stuffed_line_counts_transmitted_length():
    # The 1000-octet limit applies to the line as sent, dot included.
    _, reader = read(b"." + b"x" * 998 + b"\r\n.\r\n")
    assert reader.problem is Problem.LINE_TOO_LONG


@pytest.mark.parametrize("chunk", [0, 1, 100])
def test_size_limit_stops_output(chunk):
    data = b"x" * 50 + b"\r\n" + b"y" * 100 + b"\r\n.\r\n"
    out, reader = read(data, chunk, max_size=100)
    assert reader.finished
    assert reader.problem is Problem.TOO_BIG
    assert len(out) <= 100
    assert reader.size == 154


def test_size_limit_exact_fit_accepted():
    out, reader = read(b"x" * 98 + b"\r\n.\r\n", max_size=100)
    assert reader.problem is None
    assert len(out) == 100


@pytest.mark.parametrize("chunk", [0, 1, 5, 13])
def test_received_fields_counted_in_header_only(chunk):
    header = b"Received: from a\r\n by b\r\nRECEIVED : x\r\nX-Received: no\r\n"
    body = b"\r\nReceived: in body\r\n"
    _, reader = read(header + body + b".\r\n", chunk)
    assert reader.received_headers == 2
    assert reader.problem is None


@pytest.mark.parametrize("count, problem", [(100, None), (101, Problem.MAIL_LOOP)])
def test_mail_loop_over_100_received(count, problem):
    data = b"Received: x\r\n" * count + b"\r\nbody\r\n.\r\n"
    _, reader = read(data, 7)
    assert reader.received_headers == count
    assert reader.problem is problem


def test_received_first_line_counted():
    _, reader = read(b"Received: x\r\n\r\n.\r\n")
    assert reader.received_headers == 1


def test_message_without_header_counts_nothing():
    _, reader = read(b"\r\nReceived: x\r\n.\r\n")
    assert reader.received_headers == 0


def test_bare_line_ending_outranks_other_problems():
    data = b"x" * 2000 + b"\n\r\n.\r\n"
    _, reader = read(data, max_size=10)
    assert reader.problems == {
        Problem.BARE_LINE_ENDING,
        Problem.TOO_BIG,
        Problem.LINE_TOO_LONG,
    }
    assert reader.problem is Problem.BARE_LINE_ENDING


def test_large_message_emitted_in_large_chunks():
    line = b"0123456789" * 7 + b"\r\n"
    block = line * 20000
    reader = DotReader()
    out = reader.feed(block)
    assert len(out) >= len(block) - 4
    assert reader.feed(b".\r\n") == block[len(out) :]
    assert reader.finished
