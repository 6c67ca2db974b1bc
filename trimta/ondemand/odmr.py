"""ATRN on the ODMR listener (RFC 2645): who may release what, and the release.

An authenticated customer sends `ATRN [domain,domain...]`. Without a list
it asks for every domain its user may release (the `domains` of its entry
in the credentials file). A domain the user may not release gets 450,
whether or not mail waits for it, so the reply reveals nothing about
other customers. A domain being released already (by ETRN or another
ATRN) gets 451; no waiting mail gets 453. Otherwise trimta takes the
spool lock of every granted domain, answers 250 and turns the connection
around (see atrn.py); the locks are released when the turnaround ends.
"""

from __future__ import annotations

import ipaddress
import logging

import attrs
import trio

from trimta.auth.credentials import CredentialStore
from trimta.deliver.queue import QueueManager
from trimta.ondemand.atrn import deliver_turnaround
from trimta.ondemand.etrn import EtrnService
from trimta.smtp import replies
from trimta.smtp.replies import Reply
from trimta.spool.store import Spool

logger = logging.getLogger("trimta.ondemand")


@attrs.define
class Grant:
    """The reply to one ATRN, and the locks held for a granted release.

    Attributes:
        reply: The reply to send to the ATRN.
        domains: Domains to release; empty unless the reply is 250.
        locks: Spool locks taken for those domains; `release` frees them.
    """

    reply: Reply
    domains: list[str] = attrs.Factory(list)
    locks: list[trio.Lock] = attrs.Factory(list)

    def release(self) -> None:
        """Free every lock this grant took."""
        while self.locks:
            self.locks.pop().release()


@attrs.define
class AtrnService:
    """Decides ATRN requests and runs the turnarounds they grant.

    Attributes:
        hostname: trimta's name, sent in EHLO after the turnaround.
        credentials: The users and the domains each may release.
        held_domains: Domains whose mail waits for a release.
        spool: Where held mail waits; its locks mark running releases.
        queue: Delivers and records each part.
        etrn: The ETRN service, whose releases count as running ones.
    """

    hostname: str
    credentials: CredentialStore
    held_domains: frozenset[str]
    spool: Spool
    queue: QueueManager
    etrn: EtrnService | None = None

    def grant(self, username: str, requested: list[str]) -> Grant:
        """Decide one ATRN from an authenticated user.

        Must run in the task that later calls `Grant.release`, because
        Trio locks belong to the task that acquired them.
        """
        user = self.credentials.users.get(username)
        allowed = [d.lower() for d in (user.domains if user else ()) if d.lower() in self.held_domains]
        wanted = requested or allowed
        for domain in wanted:
            if domain not in allowed:
                return Grant(replies.atrn_denied(domain))
        for domain in wanted:
            if self._running(domain):
                return Grant(replies.atrn_busy(domain))
        waiting = [d for d in wanted if self.spool.list_parts(d)]
        if not waiting:
            return Grant(replies.atrn_no_mail())
        locks = []
        for domain in waiting:
            lock = self.spool.lock(domain)
            lock.acquire_nowait()
            locks.append(lock)
        return Grant(replies.atrn_started(waiting), waiting, locks)

    def _running(self, domain: str) -> bool:
        if self.etrn is not None and self.etrn.is_running(domain):
            return True
        return self.spool.lock(domain).locked()

    async def turn_around(
        self,
        stream: trio.abc.Stream,
        grant: Grant,
        customer: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    ) -> None:
        """Deliver the granted domains over the customer's connection."""
        logger.info("atrn turnaround customer=%s domains=%s", customer, ",".join(grant.domains))
        await deliver_turnaround(
            stream,
            hostname=self.hostname,
            customer=customer,
            domains=grant.domains,
            queue=self.queue,
        )
