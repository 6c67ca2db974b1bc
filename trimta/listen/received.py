"""The `Received:` trace header prepended to every accepted message.

RFC 5321 4.4 asks each SMTP server to prepend one. Its parts come from
the client (the HELO name) and from the network (the address), so each is
reduced to characters that cannot end the header or start a new one.
"""

from __future__ import annotations

import email.utils
import functools
import re
import time
from datetime import datetime, timezone

# Characters kept from a client-supplied HELO name; any other becomes "?".
_UNSAFE_HELO = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_MAX_HELO = 255


def clean_helo(name: str) -> str:
    """Reduce a HELO argument to a safe, bounded token for a header."""
    cleaned = _UNSAFE_HELO.sub("?", name[:_MAX_HELO])
    return cleaned or "unknown"


@functools.lru_cache(maxsize=4)
def _stamp_for_second(second: int) -> str:
    """Format an RFC 5322 date once per second rather than once per message."""
    return email.utils.format_datetime(datetime.fromtimestamp(second, timezone.utc))


def format_received(
    *,
    helo: str,
    client_address: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    now: datetime | None = None,
) -> bytes:
    """Build the `Received:` header, folded and ending in CRLF.

    Args:
        helo: The client's EHLO or HELO argument, as sent.
        client_address: The client's IP address.
        hostname: trimta's own host name.
        protocol: The `with` keyword: SMTP, ESMTP or UTF8SMTP (RFC 3848,
            RFC 6531).
        queue_id: The message id given in the final reply.
        recipient: The only recipient, or None when there are several (a
            list of recipients would leak each one to the others).
        now: Time of receipt; the current time when None.
    """
    if now is None:
        stamp = _stamp_for_second(int(time.time()))
    else:
        stamp = email.utils.format_datetime(now)
    address = _UNSAFE_HELO.sub("?", client_address)
    lines = [
        f"Received: from {clean_helo(helo)} ([{address}])",
        f"\tby {hostname} (trimta) with {protocol} id {queue_id}",
    ]
    if recipient is not None and _is_safe_address(recipient):
        lines.append(f"\tfor <{recipient}>;")
    else:
        lines[-1] += ";"
    lines.append(f"\t{stamp}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _is_safe_address(address: str) -> bool:
    return address.isprintable() and len(address) <= 320
