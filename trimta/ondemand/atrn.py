"""ATRN's turnaround (RFC 2645): deliver held mail over the client's own connection.

After trimta answers `250` to ATRN, the roles reverse on the same TCP
(and TLS) connection: the customer now speaks as the SMTP server and
sends its 220 greeting, and trimta, as the client, says EHLO (HELO when
refused) and delivers every held part of the granted domains, then QUIT.
The same client engine and queue manager bookkeeping as normal delivery
are used, so a part leaves the spool only after the customer's 250 for
its data, a 4xx or a dropped connection leaves the rest held, and a 5xx
recipient is bounced.

The caller holds the spool lock of every granted domain for the whole
turnaround, so ETRN and ATRN never release one domain twice at a time.
Each reply is awaited with the outbound client timeouts of `[delivery]`,
so a customer that stops replying ends the turnaround instead of
holding those locks.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import ssl

import trio

from trimta.config.model import Route
from trimta.deliver.mx import NextHop
from trimta.deliver.outcome import DestinationError
from trimta.deliver.queue import QueueManager
from trimta.deliver.remote import RemoteDeliverer, RemoteSession, _HopFailed
from trimta.smtp.client import RFC_TIMEOUTS, ClientConnection, ClientTimeouts

logger = logging.getLogger("trimta.ondemand")

# The session already has whatever TLS it negotiated before ATRN; the
# turnaround neither adds STARTTLS nor authenticates again.
_KEEP_LAYER = Route(hosts=(), tls="none")


class _TurnedAroundDeliverer:
    """Yields the one turned-around session for every domain of the release."""

    def __init__(self, session: RemoteSession) -> None:
        self.session = session

    @contextlib.asynccontextmanager
    async def connect(self, domain: str):
        if not self.session.usable:
            raise DestinationError(False, "4.4.2", "the customer's connection was lost")
        yield self.session


async def deliver_turnaround(
    stream: trio.abc.Stream,
    *,
    hostname: str,
    customer: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    domains: list[str],
    queue: QueueManager,
    timeouts: ClientTimeouts | None = None,
) -> None:
    """Act as the SMTP client over `stream` and deliver the domains' held parts.

    Args:
        stream: The connection on which ATRN was answered with 250.
        hostname: trimta's name, sent in EHLO.
        customer: The customer's address, for logs.
        domains: The granted domains; their spool locks are held.
        queue: Records outcomes, bounces and removes delivered parts.
        timeouts: The wait for each of the customer's replies; None takes
            those of the queue's remote deliverer, which come from
            `[delivery]`.
    """
    hop = NextHop(host=f"atrn-customer[{customer}]", address=str(customer or ""), port=0, preference=0)
    if timeouts is None:
        timeouts = _delivery_timeouts(queue)
    client = ClientConnection(local_hostname=hostname, timeouts=timeouts)
    session = RemoteSession(stream, hop, client)
    try:
        await session.start(_KEEP_LAYER, ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), 0.0)
    except _HopFailed as exc:
        logger.warning("turnaround failed customer=%s error=%s", customer, exc)
        session.usable = False
        return
    deliverer = _TurnedAroundDeliverer(session)
    for domain in domains:
        logger.info("release started domain=%s via=ATRN customer=%s", domain, customer)
        await queue.release_domain(domain, deliverer=deliverer)
        logger.info("release finished domain=%s via=ATRN", domain)
    await session.close()


def _delivery_timeouts(queue: QueueManager) -> ClientTimeouts:
    if isinstance(queue.deliverer, RemoteDeliverer):
        return queue.deliverer.settings.timeouts
    return RFC_TIMEOUTS
