"""Dot-stuffing of outgoing message data (RFC 5321 4.5.2).

Theory of operation. A client sending message data puts one extra "."
in front of every line that starts with ".", and ends the data with
"." CRLF on a line of its own. A line starts after each CRLF; the CRLF
that ended the DATA command counts too, so the first line of the message
starts right after the 354 reply.

``DotStuffer.stuff`` works on chunks of any size without buffering the
message. It keeps up to two octets of context: CRLF at a line start, a
lone CR after a chunk that ended in CR, else nothing. It prepends that
context to each chunk, replaces every CRLF "." by CRLF "..", and cuts
the context off again. That way a line start split across chunks, such as CR | LF "."
or CRLF | ".", is stuffed exactly like one inside a chunk, and every
other octet passes through unchanged.

A bare CR or bare LF is not a line end for SMTP and is sent unchanged.
NOTE: the stuffer does not reject bare CR or LF; trimta's server refuses
such messages on input, so spooled messages contain none.
"""

from __future__ import annotations

_LINE_START = b"\r\n"
_STUFF_FROM = b"\r\n."
_STUFF_TO = b"\r\n.."
_END_AT_LINE_START = b".\r\n"
_END_MID_LINE = b"\r\n.\r\n"


class DotStuffer:
    """Stuffer for one message; call ``stuff`` per chunk, then ``finish``."""

    def __init__(self) -> None:
        """Start a message: the first octet is at a line start."""
        self._context = _LINE_START
        self.finished = False

    def stuff(self, chunk: bytes) -> bytes:
        """Return chunk with one "." added before each line-leading ".".

        Raises:
            ValueError: ``finish`` was already called.
        """
        if self.finished:
            raise ValueError("DotStuffer.stuff called after finish")
        if not chunk:
            return b""
        context = self._context
        block = context + chunk
        self._context = _next_context(block)
        return block.replace(_STUFF_FROM, _STUFF_TO)[len(context) :]

    def finish(self) -> bytes:
        """Return the end-of-data sequence, adding CRLF if the data lacks one.

        Raises:
            ValueError: ``finish`` was already called.
        """
        if self.finished:
            raise ValueError("DotStuffer.finish called twice")
        self.finished = True
        if self._context == _LINE_START:
            return _END_AT_LINE_START
        return _END_MID_LINE


def _next_context(block: bytes) -> bytes:
    """Return the octets at the end of block that may start CRLF "."."""
    if block.endswith(_LINE_START):
        return _LINE_START
    if block.endswith(b"\r"):
        return b"\r"
    return b""


def stuff_message(body: bytes) -> bytes:
    """Return a whole message dot-stuffed and terminated, for tests and small data."""
    stuffer = DotStuffer()
    return stuffer.stuff(body) + stuffer.finish()
