"""Events that ``ServerConnection.next_event`` returns to its driver.

Events after which the driver must call ``send_reply`` are MailFrom,
RcptTo, EndOfMessage, Etrn and AuthAttempt. After StartTls the driver
runs the TLS handshake and calls ``tls_started`` or ``tls_failed``. The
engine has already answered every other command itself.
"""

from __future__ import annotations

import enum

import attrs

from trimta.smtp.address import Address
from trimta.smtp.replies import Reply
from trimta.smtp.sasl import Credentials


class NeedData(enum.Enum):
    """Type of the NEED_DATA sentinel."""

    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA
"""Sentinel from next_event: send queued replies, then feed more input."""


@attrs.frozen
class Ehlo:
    """A successful EHLO (``extended``) or HELO, already answered with 250.

    ``name`` is the client's domain or address literal as sent.
    """

    name: str
    extended: bool


@attrs.frozen
class MailFrom:
    """A syntactically valid MAIL command; the driver must reply.

    ``sender`` is None for the null reverse-path ``<>``. ``params`` maps
    upper-case ESMTP keywords to their values (None for a keyword without
    "="); SIZE, BODY, SMTPUTF8, RET and ENVID are already validated.
    """

    sender: Address | None
    params: dict[str, str | None] = attrs.field(eq=True, hash=False)


@attrs.frozen
class RcptTo:
    """A syntactically valid RCPT command; the driver must reply.

    ``recipient.domain`` is "" for ``<Postmaster>``. ``params`` holds the
    validated NOTIFY and ORCPT parameters (RFC 3461).
    """

    recipient: Address
    params: dict[str, str | None] = attrs.field(eq=True, hash=False)


@attrs.frozen
class DataStarted:
    """DATA was accepted with 354; MessageData events follow."""


@attrs.frozen
class MessageData:
    """A chunk of message content, dot-stuffing removed, CRLF kept."""

    data: bytes


@attrs.frozen
class EndOfMessage:
    """The final dot arrived and the message passed the checks; the driver must reply.

    ``size`` is the message size in octets after unstuffing, and
    ``received_headers`` the number of Received fields in its header.
    """

    size: int
    received_headers: int


@attrs.frozen
class MessageAborted:
    """The message was rejected or cut off; discard what arrived.

    ``reply`` was already queued by the engine, except when the peer
    closed the connection in DATA: then it is a 451 that is never sent.
    """

    reply: Reply


@attrs.frozen
class Etrn:
    """An ETRN command with an argument (RFC 1985); the driver must reply."""

    argument: str


@attrs.frozen
class Atrn:
    """An ATRN command from an authenticated ODMR client (RFC 2645).

    ``domains`` are the normalised domains named, empty for "every domain
    the user may release". The driver must reply; after a 2xx reply the
    engine is closed, because the roles on the connection reverse and the
    driver becomes the SMTP client.
    """

    domains: tuple[str, ...]


@attrs.frozen
class StartTls:
    """STARTTLS was answered with 220 (RFC 3207); the driver must handshake.

    The engine has already dropped every byte received after the command,
    so nothing sent in plaintext is read as if it came over TLS.
    """


@attrs.frozen
class AuthAttempt:
    """An AUTH exchange ended with credentials; the driver must reply.

    The driver answers 235 2.7.0 when ``credentials`` match the
    credentials file, 535 5.7.8 when they do not, or 454 4.7.0 when they
    cannot be checked now.
    """

    credentials: Credentials


@attrs.frozen
class Quit:
    """QUIT was answered with 221; ConnectionClosed follows."""


@attrs.frozen
class ConnectionClosed:
    """The session is over; the driver closes the transport."""


Event = (
    Ehlo
    | MailFrom
    | RcptTo
    | DataStarted
    | MessageData
    | EndOfMessage
    | MessageAborted
    | Etrn
    | Atrn
    | StartTls
    | AuthAttempt
    | Quit
    | ConnectionClosed
)
