"""Names the spool uses on disk: domain directories and message ids.

Every path the spool builds comes from one of the checks here, so client
input (a domain from RCPT TO) can never name a file outside the spool. The
SMTP layer validates and normalises domains first; these checks run again
as a second line of defence and reject anything not already normalised.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import threading
import time

# A lowercase A-label LDH name (RFC 5321 4.1.2 "Domain", RFC 5890 A-labels):
# labels of 1-63 letters, digits and inner hyphens, no trailing dot.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MAX_DOMAIN_OCTETS = 253

# A message id: 20 characters of lowercase base32hex (RFC 4648 section 7),
# whose alphabet sorts in the same order as the values it encodes.
MID_LENGTH = 20
_MID_RE = re.compile(rf"[0-9a-v]{{{MID_LENGTH}}}")

_RANDOM_BITS = 44
_BASE32HEX = "0123456789abcdefghijklmnopqrstuv"
_mid_lock = threading.Lock()
_last_micros = 0


# Called several times per message for the same few domains.
@functools.lru_cache(maxsize=4096)
def dirname_for_domain(domain: str) -> str:
    """Check a normalised domain and return its spool directory name.

    Args:
        domain: a lowercase A-label domain (``example.org``) or an address
            literal in canonical form (``[192.0.2.1]``,
            ``[IPv6:2001:db8::1]``).

    Returns:
        The directory name, which equals ``domain``. Address literals keep
        their brackets, so they cannot collide with a domain name.

    Raises:
        ValueError: the value is not a normalised domain or address literal.
    """
    if domain.startswith("["):
        _check_address_literal(domain)
        return domain
    too_long = len(domain) > _MAX_DOMAIN_OCTETS
    if too_long or not _DOMAIN_RE.fullmatch(domain):
        raise ValueError(
            f"invalid spool domain {domain!r}: expected a lowercase A-label "
            "domain such as 'example.org' or an address literal such as "
            "'[192.0.2.1]'; normalise the domain before queueing"
        )
    return domain


def is_domain_dirname(name: str) -> bool:
    """Return whether a directory entry is a valid domain directory name."""
    try:
        dirname_for_domain(name)
    except ValueError:
        return False
    return True


def _check_address_literal(literal: str) -> None:
    """Raise ValueError unless literal is a canonical RFC 5321 address literal."""
    # RFC 5321 4.1.3: "[" IPv4 "]" or "[IPv6:" IPv6 "]". General address
    # literals ("[tag:value]") name no standard transport, so they are rejected.
    inner = literal[1:-1] if literal.endswith("]") else None
    canonical = None
    try:
        if inner is not None and inner.startswith("IPv6:"):
            canonical = "[IPv6:" + ipaddress.IPv6Address(inner[5:]).compressed + "]"
        elif inner is not None:
            canonical = "[" + str(ipaddress.IPv4Address(inner)) + "]"
    except ValueError as exc:
        raise ValueError(f"invalid address literal {literal!r}: {exc}") from exc
    if canonical is None or "%" in canonical:
        # Scope ids ("fe80::1%eth0") name a local interface, not a host.
        raise ValueError(
            f"invalid spool address literal {literal!r}: expected a form "
            "such as '[192.0.2.1]' or '[IPv6:2001:db8::1]'"
        )
    if canonical != literal:
        raise ValueError(
            f"invalid spool address literal {literal!r}: not in canonical "
            f"form; write it as {canonical!r}"
        )


def new_mid() -> str:
    """Create a message id that sorts by arrival and is unique across processes.

    The id encodes the current time in microseconds (56 bits, enough until
    the year 4253) followed by 44 random bits, as 20 base32hex characters.
    Within one process the time part never repeats or goes backwards, so ids
    from one process sort strictly by creation.
    """
    global _last_micros
    with _mid_lock:
        micros = max(time.time_ns() // 1000, _last_micros + 1)
        _last_micros = micros
    value = (micros << _RANDOM_BITS) | (int.from_bytes(os.urandom(6), "big") >> 4)
    digits = []
    for _ in range(MID_LENGTH):
        digits.append(_BASE32HEX[value & 0x1F])
        value >>= 5
    return "".join(reversed(digits))


def check_mid(mid: str) -> str:
    """Return mid unchanged, or raise ValueError if it is not a spool message id."""
    if not isinstance(mid, str) or not _MID_RE.fullmatch(mid):
        raise ValueError(
            f"invalid message id {mid!r}: expected {MID_LENGTH} characters "
            "of lowercase base32hex (0-9, a-v)"
        )
    return mid


def is_mid(name: str) -> bool:
    """Return whether name is a spool message id."""
    return bool(_MID_RE.fullmatch(name))
