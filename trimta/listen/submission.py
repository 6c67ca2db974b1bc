"""Add Message-ID and Date to submitted messages that lack them (RFC 6409 8).

The message streams through `HeaderCompleter` chunk by chunk. While in
the header section it holds back only the start of the current line (at
most `_PREFIX` octets) until it can tell whether the line is a header field,
which field, or the end of the header. The missing fields go in just
before the blank line that ends the header, so the body is never buffered.
"""

from __future__ import annotations

import email.utils
from datetime import datetime, timezone

# Enough octets to recognise "message-id:" and "date:" at a line start.
_PREFIX = 16
# RFC 5322 3.6.8: field names are printable ASCII except ":".
_FTEXT = frozenset(range(33, 127)) - {ord(":")}


class HeaderCompleter:
    """Stream filter that adds Message-ID and Date when the header lacks them.

    Args:
        message_id: The msg-id to add, with angle brackets.
        now: Time for the Date field; the current time when None.
    """

    def __init__(self, message_id: str, now: datetime | None = None) -> None:
        stamp = email.utils.format_datetime(now or datetime.now(timezone.utc))
        self._fields = {
            b"message-id": f"Message-ID: {message_id}\r\n".encode("ascii"),
            b"date": f"Date: {stamp}\r\n".encode("ascii"),
        }
        self._in_header = True
        self._line_known = False  # the current line's start is already passed on
        self._pending = bytearray()

    def feed(self, data: bytes) -> bytes:
        """Take message content and return what to store, fields included."""
        out = bytearray()
        index = 0
        while index < len(data) and self._in_header:
            if self._line_known:
                end = data.find(b"\n", index)
                stop = len(data) if end < 0 else end + 1
                out += data[index:stop]
                index = stop
                self._line_known = end < 0
                continue
            self._pending.append(data[index])
            index += 1
            out += self._classify_pending()
        if not self._in_header:
            out += data[index:]
        return bytes(out)

    def finish(self) -> bytes:
        """Return what is still held back at the end of the message."""
        if not self._in_header:
            return b""
        self._in_header = False
        tail = bytes(self._pending) + self._missing_fields()
        self._pending.clear()
        return tail

    def _classify_pending(self) -> bytes:
        """Decide on the held-back line start once enough of it arrived."""
        prefix = bytes(self._pending)
        kind = _line_kind(prefix)
        if kind is None:
            return b""
        self._pending.clear()
        if kind == "field":
            name = prefix.partition(b":")[0].lower()
            self._fields.pop(name, None)
            self._line_known = not prefix.endswith(b"\n")
            return prefix
        self._in_header = False
        # A line that is no header field starts the body; RFC 5322 3.5
        # needs a blank line before it.
        separator = b"" if prefix == b"\r\n" else b"\r\n"
        return self._missing_fields() + separator + prefix

    def _missing_fields(self) -> bytes:
        fields = b"".join(self._fields.values())
        self._fields.clear()
        return fields


def _line_kind(prefix: bytes) -> str | None:
    """Classify a line start: "field", "end" of the header, or None (unsure)."""
    if prefix in (b"\r", b""):
        return None
    if prefix[0] in b" \t":
        return "field"  # a folded continuation line
    for position, octet in enumerate(prefix):
        if octet == ord(":"):
            return "field" if position else "end"
        if octet not in _FTEXT:
            return "end"
    return "field" if len(prefix) >= _PREFIX else None
