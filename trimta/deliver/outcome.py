"""Results of a delivery attempt, shared by the queue manager and the drivers."""

from __future__ import annotations

import enum
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol

import attrs

from trimta.spool.envelope import Envelope


class Verdict(enum.Enum):
    """What became of one recipient in one attempt."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@attrs.frozen
class RecipientOutcome:
    """The result of one attempt for one recipient.

    Attributes:
        address: The recipient as stored in the envelope.
        verdict: Delivered, deferred (try again) or failed (bounce).
        status: RFC 3463 enhanced status code, e.g. "5.1.1".
        text: The remote reply ("550 5.1.1 no such user") or the reason.
        remote: Host name of the next hop that answered, if any.
    """

    address: str
    verdict: Verdict
    status: str
    text: str
    remote: str | None = None


@attrs.define(eq=False)
class DestinationError(Exception):
    """No recipient of the part could be tried, or the connection broke.

    Attributes:
        permanent: True bounces every pending recipient, False defers them.
        status: RFC 3463 enhanced status code.
        text: What happened, for logs and bounces.
        remote: Host name involved, if any.
    """

    permanent: bool
    status: str
    text: str
    remote: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.text}"

    def outcome_for(self, address: str) -> RecipientOutcome:
        """Return the outcome this error gives one recipient."""
        verdict = Verdict.FAILED if self.permanent else Verdict.DEFERRED
        return RecipientOutcome(address, verdict, self.status, self.text, self.remote)


class Connection(Protocol):
    """An open session with a next hop that carries one message at a time.

    `usable` turns False when the session broke during a part; the queue
    manager then opens a new connection for the next part.
    """

    usable: bool

    async def deliver(self, envelope: Envelope, body_path: Path) -> list[RecipientOutcome]:
        """Send one part's pending recipients; return one outcome each.

        Raises:
            DestinationError: The connection broke or cannot go on; the
                queue manager opens a new one for the next part.
        """
        ...


class Deliverer(Protocol):
    """Opens connections to the next hop of a destination domain."""

    def connect(self, domain: str) -> AbstractAsyncContextManager[Connection]:
        """Return a context manager holding an open connection.

        Raises (on entry):
            DestinationError: No next hop could be reached, or routing
                failed (NXDOMAIN, null MX, a mail loop).
        """
        ...
