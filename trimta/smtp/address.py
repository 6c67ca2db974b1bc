"""Mailbox addresses and paths as RFC 5321 4.1.2 and RFC 6531 3.3 define them.

The parser reads a path literally and never re-interprets relay syntax:
``user%example.net@localhost`` is the local part ``user%example.net`` at
``localhost``, and a second unquoted "@" is a syntax error. Source routes
(``<@a,@b:user@d>``) are checked and dropped (RFC 5321 4.1.1.3, Appendix
C). Domains are stored as lowercase A-labels so that a U-label domain and
its A-label compare equal (RFC 5890).
"""

from __future__ import annotations

import ipaddress
import re

import attrs
import idna

from trimta.smtp.errors import AddressError

__all__ = ["Address", "AddressError", "normalize_domain", "parse_path", "find_path_end"]

MAX_LOCAL_PART = 64  # octets, RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # octets, RFC 5321 4.5.3.1.2
MAX_LABEL = 63  # octets, RFC 1035 2.3.4

# RFC 5321 4.1.2 atext; RFC 6531 3.3 adds every non-ASCII character when
# the client declared SMTPUTF8.
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING = re.compile(
    rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*"
)
_ASCII_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_LITERAL_TAG = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:")
# RFC 5321 4.1.2 qtextSMTP and quoted-pairSMTP, plus non-ASCII (RFC 6531).
_QTEXT = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]")


@attrs.frozen
class Address:
    """A mailbox: local part and domain.

    ``local`` is the local part used for delivery (a quoted local part
    is stored unquoted and unescaped). ``domain`` is the lowercase A-label
    domain, an address literal with its brackets (``[192.0.2.1]``,
    ``[IPv6:2001:db8::1]``), or "" for the bare ``<Postmaster>``.
    ``is_literal`` marks an address literal, and ``utf8_domain`` records
    that the client wrote the domain with U-labels.
    """

    local: str
    domain: str
    is_literal: bool = False
    utf8_domain: bool = False

    @property
    def needs_smtputf8(self) -> bool:
        """Whether relaying this address needs SMTPUTF8 (RFC 6531)."""
        return self.utf8_domain or not self.local.isascii()

    def __str__(self) -> str:
        local = self.local
        if not _DOT_STRING.fullmatch(local):
            local = quote_local_part(local)
        if not self.domain:
            return local
        return f"{local}@{self.domain}"


def quote_local_part(local: str) -> str:
    """Quote a local part as an RFC 5321 Quoted-string."""
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def normalize_domain(text: str) -> str:
    """Convert a domain to lowercase A-labels and check its syntax.

    Args:
        text: a domain in A-labels, U-labels or a mix.

    Returns:
        The domain in lowercase A-labels.

    Raises:
        AddressError: the domain is empty, ends with a dot, has an invalid
            label or is longer than 255 octets.
    """
    if not text:
        raise AddressError("domain is empty", text)
    if text.isascii():
        domain = text.lower()
    else:
        domain = _encode_idna(text)
    if domain.endswith("."):
        raise AddressError(
            f"domain {text!r} ends with a dot, which SMTP paths do not allow", text
        )
    if len(domain) > MAX_DOMAIN:
        raise AddressError(f"domain is longer than {MAX_DOMAIN} octets", text)
    for label in domain.split("."):
        _check_label(label, text)
    return domain


def _encode_idna(text: str) -> str:
    try:
        return idna.encode(text, uts46=True).decode("ascii").lower()
    except idna.IDNAError as error:
        raise AddressError(
            f"domain {text!r} is not a valid IDN: {error}", text
        ) from error


def _check_label(label: str, domain: str) -> None:
    """Check one LDH label, and an A-label's Punycode (RFC 5890 2.3.2.1)."""
    if not label:
        raise AddressError(f"domain {domain!r} has an empty label", domain)
    if len(label) > MAX_LABEL:
        raise AddressError(
            f"domain label {label[:20]!r}... is longer than {MAX_LABEL} octets", domain
        )
    if not _LDH_LABEL.fullmatch(label):
        raise AddressError(
            f"domain label {label!r} must be letters, digits and inner hyphens", domain
        )
    if label.startswith("xn--"):
        try:
            idna.decode(label)
        except idna.IDNAError as error:
            raise AddressError(
                f"domain label {label!r} is not a valid A-label", domain
            ) from error


def find_path_end(text: str) -> int:
    """Return the index just past the ">" that closes the path at text[0].

    Quoted strings may contain ">" and spaces, so the scan skips them.

    Raises:
        AddressError: text does not start with "<" or the path never closes.
    """
    if not text.startswith("<"):
        raise AddressError("path must start with '<'", text)
    index, in_quotes = 1, False
    while index < len(text):
        char = text[index]
        if in_quotes and char == "\\":
            index += 1
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return index + 1
        index += 1
    raise AddressError("path has no closing '>'", text)


def parse_path(
    text: str, *, allow_null: bool, allow_postmaster: bool, utf8: bool
) -> Address | None:
    """Parse a reverse-path or forward-path including its angle brackets.

    Args:
        text: the path, e.g. ``<user@example.org>``.
        allow_null: accept ``<>`` (reverse-path only) and return None.
        allow_postmaster: accept ``<Postmaster>`` without a domain
            (forward-path only, RFC 5321 4.5.1).
        utf8: the client declared SMTPUTF8, so non-ASCII is allowed.

    Returns:
        The mailbox, or None for the null path.

    Raises:
        AddressError: the path is invalid. ``needs_smtputf8`` is set when
            it only fails because of non-ASCII characters.
    """
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError("path must be enclosed in '<' and '>'", text)
    inner = text[1:-1]
    if not inner:
        if allow_null:
            return None
        raise AddressError(
            "null path <> is only valid as the MAIL FROM reverse-path", text
        )
    if inner.lower() == "postmaster" and allow_postmaster:
        return Address(local="postmaster", domain="")
    if not utf8 and not inner.isascii():
        raise AddressError(
            "address contains non-ASCII characters but MAIL FROM lacked SMTPUTF8",
            text,
            needs_smtputf8=True,
        )
    return parse_mailbox(_strip_source_route(inner), utf8=utf8)


def _strip_source_route(inner: str) -> str:
    """Check and drop an RFC 5321 A-d-l source route ("@a,@b:")."""
    if not inner.startswith("@"):
        return inner
    route, colon, mailbox = inner.partition(":")
    if not colon:
        raise AddressError("source route must end with ':' before the mailbox", inner)
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise AddressError(f"source route hop {hop!r} must start with '@'", inner)
        normalize_domain(hop[1:])
    if not mailbox:
        raise AddressError("source route is not followed by a mailbox", inner)
    return mailbox


def parse_mailbox(text: str, *, utf8: bool) -> Address:
    """Parse ``local-part@domain`` without angle brackets.

    Raises:
        AddressError: the mailbox is invalid.
    """
    local, rest = _split_local_part(text, utf8=utf8)
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError(f"local part is longer than {MAX_LOCAL_PART} octets", text)
    if not rest.startswith("@"):
        raise AddressError("mailbox needs '@' and a domain", text)
    domain_text = rest[1:]
    if domain_text.startswith("["):
        return Address(
            local=_unquote(local),
            domain=parse_address_literal(domain_text),
            is_literal=True,
        )
    if "@" in domain_text:
        raise AddressError(
            "mailbox has more than one '@', which only a quoted local part may contain",
            text,
        )
    domain = normalize_domain(domain_text)
    return Address(
        local=_unquote(local), domain=domain, utf8_domain=not domain_text.isascii()
    )


def _split_local_part(text: str, *, utf8: bool) -> tuple[str, str]:
    """Split the wire form of the local part from "@domain"."""
    if text.startswith('"'):
        end = _quoted_string_end(text)
        return text[:end], text[end:]
    local, at, domain = text.partition("@")
    pattern = _DOT_STRING if utf8 else _ASCII_DOT_STRING
    if not pattern.fullmatch(local):
        raise AddressError(
            f"local part {local!r} is invalid: use atoms separated by single dots,"
            " or quote it",
            text,
        )
    return local, at + domain


def _quoted_string_end(text: str) -> int:
    """Return the index after the closing quote of the Quoted-string at text[0]."""
    index = 1
    while index < len(text):
        char = text[index]
        if char == '"':
            return index + 1
        if char == "\\":
            if index + 1 >= len(text) or not "\x20" <= text[index + 1] <= "\x7e":
                raise AddressError(
                    "backslash in quoted local part must escape a printable character",
                    text,
                )
            index += 2
            continue
        if not _QTEXT.fullmatch(char):
            raise AddressError(
                f"quoted local part contains invalid character {char!r}", text
            )
        index += 1
    raise AddressError("quoted local part has no closing '\"'", text)


def _unquote(local: str) -> str:
    if not local.startswith('"'):
        return local
    return re.sub(r"\\(.)", r"\1", local[1:-1])


def parse_address_literal(text: str) -> str:
    """Check an address literal and return it normalised, with brackets.

    Raises:
        AddressError: the literal is not an IPv4 or IPv6 address literal.
    """
    if not text.endswith("]"):
        raise AddressError("address literal has no closing ']'", text)
    inner = text[1:-1]
    if _IPV4.fullmatch(inner):
        return f"[{_parse_ipv4(inner, text)}]"
    if inner[:5].lower() == "ipv6:":
        return f"[IPv6:{_parse_ipv6(inner[5:], text)}]"
    if _LITERAL_TAG.match(inner):
        raise AddressError("only IPv4 and IPv6 address literals are supported", text)
    raise AddressError("address literal is not a valid IPv4 address", text)


def _parse_ipv4(inner: str, text: str) -> str:
    octets = [int(part) for part in inner.split(".")]
    if max(octets) > 255:
        raise AddressError("IPv4 address literal has a number above 255", text)
    return str(ipaddress.IPv4Address(".".join(map(str, octets))))


def _parse_ipv6(inner: str, text: str) -> str:
    # ipaddress accepts "%zone" suffixes, which RFC 5321 4.1.3 does not.
    if "%" in inner:
        raise AddressError("IPv6 address literal must not have a zone index", text)
    try:
        return ipaddress.IPv6Address(inner).compressed
    except ipaddress.AddressValueError as error:
        raise AddressError(f"IPv6 address literal is invalid: {error}", text) from error
