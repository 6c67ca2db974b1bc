"""Streaming reader for the DATA phase (RFC 5321 4.1.1.4 and 4.5.2).

Theory of operation. Only the sequence CRLF "." CRLF ends the data. The
CRLF that ended the DATA command line counts as the first CRLF, so the
reader starts as if it had already seen CRLF: the input is conceptually
prefixed with CRLF, and that prefix is removed from the output again. An
empty message is thus ".\r\n" right after the 354.

``feed`` scans each block with ``bytes.find`` for the terminator and
removes dot-stuffing with one ``bytes.replace`` of CRLF "." by CRLF. At
most the last four octets of a block are held back, and only when they
could begin a terminator (CR, CRLF, CRLF ".", CRLF "." CR), so no
pattern is ever split between two blocks.

While scanning, the reader records problems that make the server reject
the message once the final dot has arrived; it never stops early,
because a reply in the middle of the data would desynchronise the
client. A bare CR or bare LF is recorded and never ends the data or
splits a line, so ``\\n.\\n`` and ``\\r.\\r`` (SMTP smuggling variants)
are plain message content that is then rejected.
"""

from __future__ import annotations

import enum
import re

MAX_TEXT_LINE = 1000  # octets including CRLF, RFC 5321 4.5.3.1.6
MAX_RECEIVED_HEADERS = 100

_TERMINATOR = b"\r\n.\r\n"
_HEADER_END = b"\r\n\r\n"
# A Received field starts a line; obsolete syntax allows blanks before ":"
# (RFC 5322 4.5.3). Capping the blanks bounds the match length, so the
# overlap below always holds a match that a block boundary splits.
_RECEIVED = re.compile(rb"\r\nreceived[ \t]{0,32}:", re.IGNORECASE)
_HEADER_OVERLAP = 64


class Problem(enum.Enum):
    """Reason to reject a message after its final dot, most serious first."""

    BARE_LINE_ENDING = "bare CR or LF"
    TOO_BIG = "over the size limit"
    LINE_TOO_LONG = "text line over 1000 octets"
    MAIL_LOOP = "too many Received fields"


class DotReader:
    """Reader for one message's DATA phase.

    Feed it the bytes received after the 354; it returns unstuffed message
    content until it finds the terminator, then sets ``finished`` and keeps
    the bytes after the terminator in ``remainder``.
    """

    def __init__(self, max_size: int = 0) -> None:
        """Start reading one message.

        Args:
            max_size: size limit in octets after unstuffing; 0 means none.
        """
        self.max_size = max_size
        self.size = 0
        self.received_headers = 0
        self.finished = False
        self.remainder = b""
        self.problems: set[Problem] = set()
        self._pending = b"\r\n"  # the virtual CRLF before the first line
        self._strip_prefix = True
        self._line_length = 0  # octets of the current line seen so far
        self._in_header = True
        self._header_tail = b""

    @property
    def problem(self) -> Problem | None:
        """The most serious problem found, or None."""
        for problem in Problem:
            if problem in self.problems:
                return problem
        return None

    def feed(self, data: bytes) -> bytes:
        """Consume received bytes and return the message content they complete.

        Returns:
            Unstuffed content, possibly empty. Once the message is over the
            size limit it returns only b"" but keeps reading to the dot.
        """
        if self.finished:
            raise ValueError("DotReader.feed called after the final dot")
        block = self._pending + data
        end = block.find(_TERMINATOR)
        if end >= 0:
            # Keep the CRLF that ends the last line; drop "." CRLF.
            raw, self.remainder = block[: end + 2], block[end + len(_TERMINATOR) :]
            self._pending = b""
            self.finished = True
        else:
            hold = _held_back_length(block)
            raw, self._pending = block[: len(block) - hold], block[len(block) - hold :]
        return self._process(raw)

    def _process(self, raw: bytes) -> bytes:
        if not raw:
            return b""
        self._check_line_endings(raw)
        self._check_line_lengths(raw)
        if self._in_header:
            self._scan_header(raw)
        content = raw.replace(b"\r\n.", b"\r\n")
        if self._strip_prefix:
            content = content[2:]
            self._strip_prefix = False
        self.size += len(content)
        if self.max_size and self.size > self.max_size:
            self.problems.add(Problem.TOO_BIG)
        if Problem.TOO_BIG in self.problems:
            return b""
        return content

    def _check_line_endings(self, raw: bytes) -> None:
        # The held-back tail keeps every CRLF inside one block, so any
        # count mismatch is a bare CR or a bare LF.
        pairs = raw.count(b"\r\n")
        if raw.count(b"\r") != pairs or raw.count(b"\n") != pairs:
            self.problems.add(Problem.BARE_LINE_ENDING)

    def _check_line_lengths(self, raw: bytes) -> None:
        # Lengths are counted up to each LF, so a line of n octets before
        # its CRLF measures n + 1 here and the limit is n + 2 <= 1000.
        # Rather than split every line, jump from LF to the last LF within
        # reach: a line is too long exactly when some reach contains no LF.
        limit = MAX_TEXT_LINE - 1
        carried, start, end = self._line_length, 0, len(raw)
        while start + limit - carried < end:
            newline = raw.rfind(b"\n", start, start + limit - carried + 1)
            if newline < 0:
                self.problems.add(Problem.LINE_TOO_LONG)
                break
            carried, start = 0, newline + 1
        last = raw.rfind(b"\n", start)
        if last >= 0:
            self._line_length = end - last - 1
        else:
            self._line_length = carried + end - start

    def _scan_header(self, raw: bytes) -> None:
        window = self._header_tail + raw
        overlap = len(self._header_tail)
        end = window.find(_HEADER_END, max(0, overlap - 3))
        if end >= 0:
            window = window[: end + 2]
            self._in_header = False
        for match in _RECEIVED.finditer(window):
            if match.end() > overlap:
                self.received_headers += 1
        self._header_tail = window[-_HEADER_OVERLAP:]
        if self.received_headers > MAX_RECEIVED_HEADERS:
            self.problems.add(Problem.MAIL_LOOP)


def _held_back_length(block: bytes) -> int:
    """Return how many final octets of block could start the terminator."""
    for length in range(min(len(_TERMINATOR) - 1, len(block)), 0, -1):
        if _TERMINATOR.startswith(block[-length:]):
            return length
    return 0
