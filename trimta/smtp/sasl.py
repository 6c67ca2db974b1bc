"""Sans-IO server side of the SASL mechanisms that SMTP AUTH offers.

Each mechanism is a small state machine fed with decoded client
responses. A step returns either a `Challenge` (the server sends it in a
334 reply) or `Credentials` to check; a malformed response raises
`SaslError`. Checking the credentials is the driver's job, because it
needs the credentials file, a worker thread and a clock.

Mechanisms: PLAIN (RFC 4616), LOGIN (draft-murchison-sasl-login) and
CRAM-MD5 (RFC 2195). RFC 4954 4 defines the framing that `decode_response`
reads: base64 text, "=" for an empty initial response and "*" to cancel.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets

import attrs

# RFC 4954 4: servers must take AUTH lines and responses of 12288 octets.
MAX_RESPONSE_LINE = 12288

PLAINTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")

_HEX_DIGEST = re.compile(r"[0-9a-f]{32}")


@attrs.define(auto_exc=True, eq=False)
class SaslError(Exception):
    """A client response that the mechanism cannot use.

    Attributes:
        reason: What is wrong, without echoing any secret.
    """

    reason: str

    def __str__(self) -> str:
        return self.reason


@attrs.frozen
class Challenge:
    """Data the server sends in a 334 reply, before base64 encoding."""

    data: bytes


@attrs.frozen
class Credentials:
    """What a client presented, to check against the credentials file.

    Attributes:
        mechanism: The SASL mechanism name, upper case.
        username: The authentication identity (authcid).
        secret: The password for PLAIN and LOGIN, or the lower-case hex
            HMAC-MD5 digest for CRAM-MD5. Never shown by repr.
        challenge: The CRAM-MD5 challenge the digest answers, else b"".
        authzid: The PLAIN authorization identity, "" when absent.
    """

    mechanism: str
    username: str
    secret: str = attrs.field(repr=False)
    challenge: bytes = b""
    authzid: str = ""


Step = Challenge | Credentials


def decode_response(line: bytes) -> bytes:
    """Decode one base64 client response; "=" is the empty response.

    Raises:
        SaslError: the text is not valid base64.
    """
    if line == b"=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError) as error:
        raise SaslError("the response is not valid base64") from error


def encode_challenge(data: bytes) -> str:
    """Encode a challenge for the text of a 334 reply."""
    return base64.b64encode(data).decode("ascii")


def new_cram_challenge(hostname: str, timestamp: int) -> bytes:
    """Build a CRAM-MD5 challenge "<random.timestamp@hostname>" (RFC 2195 2)."""
    return f"<{secrets.randbits(63)}.{timestamp}@{hostname}>".encode("ascii")


def cram_md5_digest(secret: str, challenge: bytes) -> str:
    """Return the lower-case hex HMAC-MD5 of the challenge keyed by the secret."""
    return hmac.new(secret.encode("utf-8"), challenge, hashlib.md5).hexdigest()


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SaslError(f"the {what} is not valid UTF-8") from error


class PlainMechanism:
    """PLAIN (RFC 4616): one message "authzid NUL authcid NUL passwd"."""

    name = "PLAIN"

    def step(self, response: bytes | None) -> Step:
        """Take the next response; None means AUTH had no initial response."""
        if response is None:
            return Challenge(b"")
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise SaslError(
                "PLAIN needs authzid NUL authcid NUL password, with a"
                " user name and a password (RFC 4616 2)"
            )
        authzid, username, password = (_text(part, "PLAIN message") for part in parts)
        return Credentials("PLAIN", username, password, authzid=authzid)


class LoginMechanism:
    """LOGIN: the server asks for the user name, then for the password."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._username: str | None = None

    def step(self, response: bytes | None) -> Step:
        """Take the next response; None means AUTH had no initial response."""
        if response is None:
            return Challenge(b"Username:")
        if self._username is None:
            self._username = _text(response, "user name")
            if not self._username:
                raise SaslError("LOGIN needs a user name")
            return Challenge(b"Password:")
        password = _text(response, "password")
        if not password:
            raise SaslError("LOGIN needs a password")
        return Credentials("LOGIN", self._username, password)


class CramMd5Mechanism:
    """CRAM-MD5 (RFC 2195): the client answers "user SP hex-digest"."""

    name = "CRAM-MD5"

    def __init__(self, challenge: bytes) -> None:
        self.challenge = challenge
        self._sent = False

    def step(self, response: bytes | None) -> Step:
        """Take the next response; None means AUTH had no initial response."""
        if not self._sent:
            if response is not None:
                raise SaslError("CRAM-MD5 takes no initial response (RFC 2195 2)")
            self._sent = True
            return Challenge(self.challenge)
        username, _, digest = _text(response or b"", "response").rpartition(" ")
        if not username or not _HEX_DIGEST.fullmatch(digest):
            raise SaslError(
                "CRAM-MD5 needs the user name, a space and 32 lower-case hex"
                " digits (RFC 2195 2)"
            )
        return Credentials("CRAM-MD5", username, digest, challenge=self.challenge)


Mechanism = PlainMechanism | LoginMechanism | CramMd5Mechanism


def start_mechanism(name: str, cram_challenge: bytes) -> Mechanism:
    """Create the server state for one mechanism named in MECHANISMS."""
    if name == "PLAIN":
        return PlainMechanism()
    if name == "LOGIN":
        return LoginMechanism()
    if name == "CRAM-MD5":
        return CramMd5Mechanism(cram_challenge)
    raise ValueError(f"unknown SASL mechanism {name!r}")
