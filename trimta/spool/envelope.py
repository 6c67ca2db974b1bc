"""Envelope records stored next to each spooled body, and their JSON form.

One envelope file describes one domain part of a message: the recipients
of that domain, their delivery state and the retry schedule. The format is
documented field by field in docs/spool-format.md.
"""

from __future__ import annotations

import json

import attrs
import cattrs

from trimta.spool import names

FORMAT_VERSION = 1
RECIPIENT_STATES = ("pending", "delivered", "failed")


@attrs.frozen(order=True)
class PartRef:
    """A reference to one domain part of a spooled message.

    Attributes:
        mid: the message id (see ``names.new_mid``); ids sort by arrival.
        domain: the normalised recipient domain, which is also the name of
            the part's spool directory.
    """

    mid: str = attrs.field(validator=lambda _i, _a, v: names.check_mid(v))
    domain: str = attrs.field(validator=lambda _i, _a, v: names.dirname_for_domain(v))


@attrs.define
class Recipient:
    """One envelope recipient and its delivery state.

    Attributes:
        address: the RCPT TO address without angle brackets.
        state: "pending", "delivered" or "failed" (permanent failure).
        last_error: the last delivery error text, or None.
        orcpt: the RFC 3461 ORCPT parameter as received, or None.
        notify: the RFC 3461 NOTIFY keywords, or None when not given.
    """

    address: str
    state: str = attrs.field(
        default="pending", validator=attrs.validators.in_(RECIPIENT_STATES)
    )
    last_error: str | None = None
    orcpt: str | None = None
    notify: list[str] | None = None


@attrs.define
class ClientInfo:
    """The SMTP client that submitted the message.

    Attributes:
        helo: the EHLO/HELO argument, or "" if none was given.
        address: the client's IP address as text, or "" if unknown.
    """

    helo: str = ""
    address: str = ""


@attrs.define
class Envelope:
    """The stored envelope of one domain part.

    Attributes:
        id: the message id, shared by every part of the message.
        domain: the recipient domain of this part.
        sender: the MAIL FROM address, "" for the null reverse-path.
        recipients: the recipients in this domain.
        arrival: when the message body started arriving, in UTC seconds
            since the epoch.
        size: the stored body size in octets.
        params: the MAIL FROM ESMTP parameters with upper-case keys
            (BODY, SMTPUTF8, RET, ENVID ...); a parameter without a value
            maps to None.
        client: the submitting SMTP client.
        attempts: the number of delivery attempts made so far.
        next_attempt: the earliest time of the next attempt, in UTC seconds.
        last_error: the last error that affected the whole part, or None.
        held: set by `trimta queue hold`: not delivered until released.
    """

    id: str = attrs.field(validator=lambda _i, _a, v: names.check_mid(v))
    domain: str = attrs.field(validator=lambda _i, _a, v: names.dirname_for_domain(v))
    sender: str
    recipients: list[Recipient]
    arrival: float
    size: int
    params: dict[str, str | None] = attrs.Factory(dict)
    client: ClientInfo = attrs.Factory(ClientInfo)
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    held: bool = False

    @property
    def part(self) -> PartRef:
        """The reference to the part this envelope describes."""
        return PartRef(self.id, self.domain)

    def is_done(self) -> bool:
        """Return whether no recipient is still pending."""
        return all(r.state != "pending" for r in self.recipients)


class EnvelopeError(ValueError):
    """An envelope file that cannot be parsed."""


_converter = cattrs.Converter(forbid_extra_keys=True)
# One line of compact JSON, because json's C encoder handles only indent=None
# and an indented envelope took three times as long to write.
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dump_envelope(envelope: Envelope) -> bytes:
    """Serialise an envelope to its versioned JSON file content."""
    data = {"version": FORMAT_VERSION, **_converter.unstructure(envelope)}
    return _encoder.encode(data).encode() + b"\n"


def parse_envelope(content: bytes) -> Envelope:
    """Parse envelope file content.

    Raises:
        EnvelopeError: the content is not valid JSON, has an unknown
            format version, or does not match the envelope fields.
    """
    try:
        data = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvelopeError(f"envelope is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise EnvelopeError("envelope is not a JSON object")
    version = data.pop("version", None)
    if version != FORMAT_VERSION:
        raise EnvelopeError(
            f"unsupported envelope version {version!r}: this trimta reads "
            f"version {FORMAT_VERSION}; upgrade trimta to read this spool"
        )
    try:
        return _converter.structure(data, Envelope)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        details = (
            "; ".join(cattrs.transform_error(exc))
            if isinstance(exc, cattrs.BaseValidationError)
            else str(exc)
        )
        raise EnvelopeError(f"invalid envelope: {details}") from exc
