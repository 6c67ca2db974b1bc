"""Salted scrypt password hashes in a self-describing string.

Format: ``scrypt$N$r$p$salt$hash`` where N, r and p are the scrypt cost
parameters (RFC 7914) in decimal, and salt and hash are standard base64.
Storing the parameters with each hash lets a later version raise the cost
without breaking existing entries.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

# N=2**15, r=8 uses 32 MiB and takes about 0.1 s per check on one core
# (an estimate), which slows guessing while keeping AUTH responsive.
DEFAULT_N = 2**15
DEFAULT_R = 8
DEFAULT_P = 1
SALT_OCTETS = 16
HASH_OCTETS = 32
_MAX_MEMORY = 256 * 1024 * 1024


def hash_password(
    password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """Hash a password with a fresh random salt."""
    salt = secrets.token_bytes(SALT_OCTETS)
    digest = _scrypt(password, salt, n, r, p)
    return "$".join(
        ["scrypt", str(n), str(r), str(p), _b64(salt), _b64(digest)]
    )


def check_hash_format(encoded: str) -> None:
    """Raise ValueError when the string is not a usable scrypt hash."""
    _parse(encoded)


def verify_password(password: str, encoded: str) -> bool:
    """Return whether the password matches the hash, in constant time.

    Raises:
        ValueError: the hash string is malformed.
    """
    n, r, p, salt, expected = _parse(encoded)
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), expected)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=_MAX_MEMORY,
        dklen=HASH_OCTETS,
    )


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("expected scrypt$N$r$p$salt$hash")
    try:
        n, r, p = (int(part) for part in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error) as error:
        raise ValueError(f"invalid scrypt hash field: {error}") from error
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * r * n > _MAX_MEMORY:
        raise ValueError(f"invalid scrypt cost N={n} r={r} p={p}")
    if not salt or len(digest) != HASH_OCTETS:
        raise ValueError("scrypt salt is empty or hash has the wrong length")
    return n, r, p, salt, digest


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
