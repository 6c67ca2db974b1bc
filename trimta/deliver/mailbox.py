"""Mailbox names: an injective, path-safe encoding of local parts.

A mailbox name is one directory name under ``<maildir_root>/<domain>/``.
Plain lowercase names stay readable and every other octet is written as
``%XX``:

- ``a``-``z``, ``0``-``9``, ``.``, ``_``, ``-`` and ``+`` stand for
  themselves, except a leading ``.``, which becomes ``%2E`` (so ``.``,
  ``..`` and hidden names such as ``.x`` cannot occur).
- Every other octet of the UTF-8 form (upper case, ``%``, ``/``, space,
  control characters, NUL, non-ASCII) becomes ``%`` and two upper-case
  hex digits.
- The empty local part becomes ``%``, which no other local part produces
  because every other ``%`` is followed by two hex digits.

Each local part has exactly one name, and ``mailbox_local_part`` accepts
only names in that form, so the mapping is a bijection onto valid names.
"""

from __future__ import annotations

import re

# Linux and most file systems limit one path component to 255 octets.
MAX_NAME_OCTETS = 255
EMPTY_NAME = "%"

_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789._-+")
_NAME_RE = re.compile(r"(?:[a-z0-9._+-]|%[0-9A-F]{2})+")


def mailbox_name(local_part: str) -> str:
    """Encode a local part as a mailbox directory name.

    Raises:
        ValueError: the encoded name would exceed 255 octets (only a local
            part far over the 64-octet limit of RFC 5321 4.5.3.1.1 can do
            that), or the local part contains lone surrogates.
    """
    if local_part == "":
        return EMPTY_NAME
    octets = local_part.encode("utf-8")
    pieces = []
    for index, octet in enumerate(octets):
        leading_dot = index == 0 and octet == ord(".")
        if octet in _PLAIN and not leading_dot:
            pieces.append(chr(octet))
        else:
            pieces.append(f"%{octet:02X}")
    name = "".join(pieces)
    if len(name) > MAX_NAME_OCTETS:
        raise ValueError(
            f"local part {local_part[:40]!r}... is too long for a mailbox "
            f"name ({len(name)} octets encoded, maximum {MAX_NAME_OCTETS})"
        )
    return name


def mailbox_local_part(name: str) -> str:
    """Decode a mailbox name produced by ``mailbox_name``.

    Raises:
        ValueError: name is not in the canonical encoded form.
    """
    if name == EMPTY_NAME:
        return ""
    if not _NAME_RE.fullmatch(name) or name.startswith("."):
        raise ValueError(f"invalid mailbox name {name!r}")
    octets = bytearray()
    index = 0
    while index < len(name):
        if name[index] == "%":
            octets.append(int(name[index + 1 : index + 3], 16))
            index += 3
        else:
            octets.append(ord(name[index]))
            index += 1
    try:
        local_part = octets.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid mailbox name {name!r}: {exc}") from exc
    # Reject spellings such as "%61" for "a": only one name per local part.
    if mailbox_name(local_part) != name:
        raise ValueError(f"mailbox name {name!r} is not in canonical form")
    return local_part
