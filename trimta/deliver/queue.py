"""The queue manager: hand spooled parts to bounded delivery workers.

Theory of operation
-------------------
Every part (one message's recipients in one domain) that is neither local
nor held comes here, either from recovery at start or from the spool's
new-part channel the moment it is committed. A part is either *ready* (in
its domain's ready queue) or *deferred* (in one heap ordered by the time
of its next attempt). One wake-up task moves deferred parts to their
ready queue when their time comes; a new part or an earlier deadline
interrupts its sleep, so no wait is longer than needed and every wait is
cancellable.

Delivery runs in *workers*. A domain with ready parts gets up to
`per_domain_concurrency` workers, and every worker holds one token of a
global `trio.CapacityLimiter(max_concurrency)` while it works. A worker
opens one connection to the domain's next hop and sends ready parts over
it one after another until the ready queue is empty, so parts that are
ready together share a connection.

After each part the worker records the outcome in the spool before it
touches the next part: delivered recipients are marked (they are never
sent again), failed ones are bounced, and if any stay deferred the part
gets its next attempt time from the retry policy, or bounces once it is
older than the queue lifetime. The window in which a crash can send a
recipient twice is the time between the next hop's final reply and that
one envelope write.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

import attrs
import trio

from trimta.deliver.outcome import (
    Deliverer,
    DestinationError,
    RecipientOutcome,
    Verdict,
)
from trimta.deliver.schedule import RetryPolicy
from trimta.spool.envelope import Envelope, EnvelopeError, PartRef
from trimta.spool.store import Spool, SpoolError

logger = logging.getLogger("trimta.deliver")

BounceFunction = Callable[[Envelope, list[RecipientOutcome]], Awaitable[None]]

# Status of recipients still deferred when their part expires (RFC 3463
# X.4.7: delivery time expired).
EXPIRED_STATUS = "4.4.7"


class _ConnectionBroken(Exception):
    """A connection failed in the middle of a part; the part is recorded."""


@attrs.define
class _DomainQueue:
    """The ready parts of one domain and the workers serving them."""

    ready: collections.deque[PartRef] = attrs.Factory(collections.deque)
    queued: set[PartRef] = attrs.Factory(set)
    workers: int = 0
    arrived: trio.Event = attrs.Factory(trio.Event)


class QueueManager:
    """Schedules delivery of spooled parts under global and per-domain limits.

    Args:
        spool: The spool holding the parts.
        deliverer: Opens connections to a domain's next hop.
        bounce: Queues a DSN for the failed recipients of one envelope.
        retry: The backoff and lifetime rules.
        max_concurrency: Workers running at once over all domains.
        per_domain_concurrency: Workers running at once per domain.
        held_domains: Domains whose parts wait for a release (ETRN); a
            failed attempt leaves them held instead of scheduling a retry.
        hold_lifetime: Age, in seconds, after which a held part bounces.
        linger: Seconds an idle connection waits for another ready part of
            its domain before it is closed.
        wall_clock: Returns the current time in UTC seconds, as stored in
            envelopes; tests pass one driven by Trio's clock.
    """

    def __init__(
        self,
        spool: Spool,
        deliverer: Deliverer,
        bounce: BounceFunction,
        retry: RetryPolicy,
        *,
        max_concurrency: int,
        per_domain_concurrency: int,
        held_domains: frozenset[str] = frozenset(),
        hold_lifetime: float = 7 * 86400,
        linger: float = 1.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.deliverer = deliverer
        self.bounce = bounce
        self.retry = retry
        self.per_domain_concurrency = per_domain_concurrency
        self.wall_clock = wall_clock
        self.held_domains = held_domains
        self.hold_lifetime = hold_lifetime
        self.linger = linger
        self.limiter = trio.CapacityLimiter(max_concurrency)
        self._domains: dict[str, _DomainQueue] = collections.defaultdict(_DomainQueue)
        self._deferred: list[tuple[float, int, PartRef]] = []
        self._sequence = itertools.count()
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def run(
        self,
        parts: trio.MemoryReceiveChannel,
        *,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept parts from the channel and deliver them until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._wake_deferred)
            task_status.started()
            async for part in parts:
                await self.add(part)

    async def add(self, part: PartRef) -> None:
        """Schedule a part at the next attempt time its envelope records."""
        try:
            envelope = await self.spool.load(part, peek=True)
        except (SpoolError, EnvelopeError, ValueError) as exc:
            logger.error("cannot load part mid=%s domain=%s error=%s", part.mid, part.domain, exc)
            return
        self._schedule(part, envelope.next_attempt)

    def deliver_now(self, part: PartRef) -> None:
        """Make one part ready now, whatever its next attempt time."""
        self._deferred = [e for e in self._deferred if e[2] != part]
        heapq.heapify(self._deferred)
        self._make_ready(part)

    def flush(self, domain: str | None = None) -> int:
        """Make deferred parts (of one domain, or all) ready now; return how many."""
        due = [e for e in self._deferred if domain is None or e[2].domain == domain]
        self._deferred = [e for e in self._deferred if e not in due]
        heapq.heapify(self._deferred)
        for _, _, part in due:
            self._make_ready(part)
        self._changed.set()
        return len(due)

    async def release_domain(self, domain: str, deliverer: Deliverer | None = None) -> None:
        """Deliver every part of a held domain now.

        To the domain's next hop (ETRN) the parts go over as many as
        `per_domain_concurrency` connections at once, as queued mail does.
        ATRN's turned-around connection is a single one.

        The caller holds the domain's spool lock. Parts that fail for now
        stay held for the next release; parts that fail for good bounce.

        Args:
            domain: The held domain.
            deliverer: Where to deliver; the domain's next hop by default,
                or ATRN's turned-around connection (then one connection).
        """
        queue = _DomainQueue()
        for part in self.spool.list_parts(domain):
            queue.queued.add(part)
            queue.ready.append(part)
        connections = 1 if deliverer is not None else self.per_domain_concurrency
        async with trio.open_nursery() as nursery:
            for _ in range(min(connections, len(queue.ready))):
                nursery.start_soon(self._release_worker, domain, queue, deliverer)

    async def _release_worker(
        self, domain: str, queue: _DomainQueue, deliverer: Deliverer | None
    ) -> None:
        async with self.limiter:
            await self._drain(domain, queue, linger=False, deliverer=deliverer)

    async def expire_held(self) -> None:
        """Bounce held parts older than the hold lifetime.

        The envelopes are read without the domain's lock, and the lock is
        taken only when some part has expired. While the lock is held,
        ETRN and ATRN find a release running and start none. The first
        scan runs right after start, and a lock held for a whole scan of
        thousands of held parts kept releases from starting for seconds
        after each restart.
        """
        now = self.wall_clock()
        for domain in sorted(self.held_domains):
            envelopes = await self.spool.load_domain(domain)
            cutoff = now - self.hold_lifetime  # arrived then or earlier: expired
            expired = [e.part for e in envelopes if e.arrival <= cutoff]
            if expired:
                await self._expire_held_parts(domain, expired, now)

    async def _expire_held_parts(
        self, domain: str, parts: list[PartRef], now: float
    ) -> None:
        lock = self.spool.lock(domain)
        if lock.locked():
            return  # a release is running, and it records its own outcomes
        async with lock:
            # A release may have delivered some of them since the scan.
            present = set(self.spool.list_parts(domain))
            for part in parts:
                if part not in present:
                    continue
                envelope = await self._load(part)
                if envelope is None:
                    continue
                if now >= envelope.arrival + self.hold_lifetime:
                    await self._finish(envelope, self._expire(envelope, {}))

    async def run_hold_expiry(self, interval: float | None = None) -> None:
        """Run `expire_held` every `interval` seconds until cancelled.

        The default interval is a tenth of the hold lifetime, between one
        second and one hour, so held mail bounces soon after it expires.
        """
        if interval is None:
            interval = max(1.0, min(3600.0, self.hold_lifetime / 10))
        while True:
            await self.expire_held()
            await trio.sleep(interval)

    def _schedule(self, part: PartRef, when: float) -> None:
        if when <= self.wall_clock():
            self._make_ready(part)
            return
        heapq.heappush(self._deferred, (when, next(self._sequence), part))
        self._changed.set()

    def _make_ready(self, part: PartRef) -> None:
        queue = self._domains[part.domain]
        if part in queue.queued:
            return
        queue.queued.add(part)
        queue.ready.append(part)
        queue.arrived.set()
        if queue.workers < self.per_domain_concurrency and self._nursery is not None:
            queue.workers += 1
            self._nursery.start_soon(self._run_worker, part.domain)

    async def _wake_deferred(self) -> None:
        while True:
            self._changed = trio.Event()
            deadline = float("inf")
            if self._deferred:
                delay = self._deferred[0][0] - self.wall_clock()
                deadline = trio.current_time() + max(0.0, delay)
            with trio.move_on_at(deadline):
                await self._changed.wait()
            now = self.wall_clock()
            while self._deferred and self._deferred[0][0] <= now:
                _, _, part = heapq.heappop(self._deferred)
                self._make_ready(part)

    async def _run_worker(self, domain: str) -> None:
        queue = self._domains[domain]
        try:
            async with self.limiter:
                await self._drain(domain, queue)
        finally:
            queue.workers -= 1
            if not queue.ready and queue.workers == 0:
                self._domains.pop(domain, None)

    async def _drain(
        self,
        domain: str,
        queue: _DomainQueue,
        *,
        linger: bool = True,
        deliverer: Deliverer | None = None,
    ) -> None:
        """Deliver ready parts of one domain over as few connections as possible.

        With `linger`, an idle connection waits briefly for new parts of
        the domain; a release's private queue gets no new parts.
        """
        while queue.ready:
            try:
                async with (deliverer or self.deliverer).connect(domain) as connection:
                    while queue.ready or (linger and await self._linger(queue)):
                        part = queue.ready.popleft()
                        try:
                            await self._deliver_part(part, connection)
                        finally:
                            queue.queued.discard(part)
            except _ConnectionBroken:
                # The part in hand is recorded; the rest get a new connection.
                continue
            except DestinationError as error:
                # No next hop can be reached now, so every ready part of
                # the domain gets this error instead of a try of its own.
                await self._fail_ready(queue, error)

    async def _linger(self, queue: _DomainQueue) -> bool:
        """Keep an idle connection for a moment; return whether a part came.

        Mail often arrives as a steady trickle, and closing the connection
        whenever the ready queue is empty for an instant would open one
        connection per message.
        """
        queue.arrived = trio.Event()
        with trio.move_on_after(self.linger):
            await queue.arrived.wait()
        return bool(queue.ready)

    async def _deliver_part(self, part: PartRef, connection) -> None:
        envelope = await self._load(part)
        if envelope is None:
            return
        if envelope.held:
            logger.info("skipped held mid=%s domain=%s", part.mid, part.domain)
            return
        pending = [r for r in envelope.recipients if r.state == "pending"]
        if not pending:
            await self._finish(envelope, [])
            return
        try:
            outcomes = await connection.deliver(envelope, self.spool.body_path(part))
        except DestinationError as error:
            await self._record(envelope, [error.outcome_for(r.address) for r in pending])
            raise _ConnectionBroken() from error
        # The next hop has the message now: record that even while stopping,
        # so that a restart does not send it again.
        with trio.CancelScope(shield=True):
            await self._record(envelope, outcomes)
        if not getattr(connection, "usable", True):
            raise _ConnectionBroken()

    async def _fail_ready(self, queue: _DomainQueue, error: DestinationError) -> None:
        while queue.ready:
            part = queue.ready.popleft()
            queue.queued.discard(part)
            envelope = await self._load(part)
            if envelope is None:
                continue
            pending = [r.address for r in envelope.recipients if r.state == "pending"]
            await self._record(envelope, [error.outcome_for(a) for a in pending])

    async def _load(self, part: PartRef) -> Envelope | None:
        try:
            return await self.spool.load(part)
        except (SpoolError, EnvelopeError, ValueError) as exc:
            logger.error("cannot load part mid=%s domain=%s error=%s", part.mid, part.domain, exc)
            return None

    async def _record(self, envelope: Envelope, outcomes: list[RecipientOutcome]) -> None:
        """Store one attempt's outcomes, bounce failures, schedule the rest."""
        by_address = {outcome.address: outcome for outcome in outcomes}
        for recipient in envelope.recipients:
            outcome = by_address.get(recipient.address)
            if recipient.state != "pending" or outcome is None:
                continue
            _log_attempt(envelope, outcome)
            recipient.last_error = None if outcome.verdict is Verdict.DELIVERED else outcome.text
            if outcome.verdict is Verdict.DELIVERED:
                recipient.state = "delivered"
            elif outcome.verdict is Verdict.FAILED:
                recipient.state = "failed"
        failed = [o for o in outcomes if o.verdict is Verdict.FAILED]
        envelope.attempts += 1
        if any(r.state == "pending" for r in envelope.recipients):
            failed += self._expire_or_defer(envelope, by_address)
        await self._finish(envelope, failed)

    def _expire_or_defer(
        self, envelope: Envelope, by_address: dict[str, RecipientOutcome]
    ) -> list[RecipientOutcome]:
        now = self.wall_clock()
        if envelope.domain in self.held_domains:
            if now < envelope.arrival + self.hold_lifetime:
                envelope.last_error = _last_error(envelope)
                return []
            return self._expire(envelope, by_address)
        when = self.retry.next_attempt(
            arrival=envelope.arrival, attempts=envelope.attempts, now=now
        )
        if when is not None:
            envelope.next_attempt = when
            envelope.last_error = _last_error(envelope)
            return []
        return self._expire(envelope, by_address)

    def _expire(
        self, envelope: Envelope, by_address: dict[str, RecipientOutcome]
    ) -> list[RecipientOutcome]:
        expired = []
        for recipient in envelope.recipients:
            if recipient.state != "pending":
                continue
            recipient.state = "failed"
            previous = by_address.get(recipient.address)
            text = f"message expired in the queue; last error: {recipient.last_error}"
            remote = previous.remote if previous else None
            expired.append(
                RecipientOutcome(recipient.address, Verdict.FAILED, EXPIRED_STATUS, text, remote)
            )
        logger.info("expired mid=%s domain=%s recipients=%d", envelope.id, envelope.domain, len(expired))
        return expired

    def _log_waiting(self, envelope: Envelope) -> None:
        """Log a part that stays queued after an attempt: held or deferred."""
        if envelope.domain in self.held_domains:
            logger.info(
                "held mid=%s domain=%s attempts=%d error=%s",
                envelope.id, envelope.domain, envelope.attempts, envelope.last_error,
            )
            return
        logger.info(
            "deferred mid=%s domain=%s attempts=%d retry-in=%.0fs error=%s",
            envelope.id, envelope.domain, envelope.attempts,
            max(0.0, envelope.next_attempt - self.wall_clock()), envelope.last_error,
        )

    async def _finish(self, envelope: Envelope, failed: list[RecipientOutcome]) -> None:
        if failed:
            # The bounce is queued before the envelope is updated: a crash
            # in between sends the DSN twice rather than never.
            await self.bounce(envelope, failed)
        try:
            if envelope.is_done():
                await self.spool.remove(envelope.part)
                logger.info("done mid=%s domain=%s", envelope.id, envelope.domain)
            else:
                await self.spool.save(envelope)
                # Logged once saved, so a reader of the log finds the
                # spool already updated.
                self._log_waiting(envelope)
                if envelope.domain not in self.held_domains:
                    self._schedule(envelope.part, envelope.next_attempt)
        except SpoolError as exc:
            logger.error("cannot update part mid=%s domain=%s error=%s", envelope.id, envelope.domain, exc)


def _last_error(envelope: Envelope) -> str | None:
    errors = [r.last_error for r in envelope.recipients if r.state == "pending" and r.last_error]
    return errors[0] if errors else None


def _log_attempt(envelope: Envelope, outcome: RecipientOutcome) -> None:
    logger.info(
        "attempt mid=%s domain=%s rcpt=<%s> host=%s result=%s status=%s reply=%s",
        envelope.id,
        envelope.domain,
        outcome.address,
        outcome.remote or "-",
        outcome.verdict.value,
        outcome.status,
        outcome.text,
    )
