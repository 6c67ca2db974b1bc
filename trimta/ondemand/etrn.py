"""ETRN (RFC 1985): a held domain's owner asks trimta to deliver its mail.

The client names a node: `ETRN example.org` (that domain), `ETRN
@example.org` (the domain and its subdomains) or `ETRN #name` (a named
queue from `[etrn] queues`). Only held domains can be released, and a
domain that is not held gets 459 without saying whether mail waits for
it. A granted release runs in the background through the queue manager,
which delivers the domain's held parts to its next hop (route or MX)
over up to `delivery.per_domain_concurrency` connections; the ETRN reply
does not wait for it.

One release per domain runs at a time: the spool's per-domain lock is
held for the whole release, so a second ETRN for the same domain is
answered 250 and starts nothing.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable

import attrs
import trio

from trimta.config.model import Config
from trimta.deliver.mx import MxResolver, PermanentFailure, TemporaryFailure
from trimta.smtp import replies
from trimta.smtp.address import AddressError, normalize_domain
from trimta.smtp.replies import Reply
from trimta.spool.store import Spool

logger = logging.getLogger("trimta.ondemand")

RATE_WINDOW = 60.0


class EtrnSyntaxError(ValueError):
    """An ETRN argument that is not a node, `@domain` or `#queue`."""


@attrs.frozen
class EtrnRequest:
    """A parsed ETRN argument.

    Attributes:
        kind: "domain", "subdomains" (the `@` form) or "queue" (`#`).
        name: The normalised domain, or the queue name.
    """

    kind: str
    name: str


def parse_request(argument: str) -> EtrnRequest:
    """Parse an ETRN argument (RFC 1985 section 3).

    Raises:
        EtrnSyntaxError: The argument is empty or not a valid domain or
            queue name; nothing of it reaches the spool.
    """
    text = argument.strip()
    if not text or " " in text:
        raise EtrnSyntaxError("expected one node name, e.g. example.org")
    if text.startswith("#"):
        name = text[1:]
        if not name or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name):
            raise EtrnSyntaxError("a queue name is letters, digits, '-', '_' and '.'")
        return EtrnRequest("queue", name)
    kind = "subdomains" if text.startswith("@") else "domain"
    domain = text[1:] if kind == "subdomains" else text
    try:
        return EtrnRequest(kind, normalize_domain(domain))
    except AddressError as exc:
        raise EtrnSyntaxError(f"not a valid domain: {exc}") from None


class RateLimiter:
    """Allows at most `limit` events per client address per minute."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._events: dict[object, collections.deque[float]] = {}

    def allow(self, client: object) -> bool:
        """Record one event for `client`; return False when over the limit."""
        now = self.clock()
        events = self._events.setdefault(client, collections.deque())
        while events and events[0] <= now - RATE_WINDOW:
            events.popleft()
        if len(events) >= self.limit:
            return False
        events.append(now)
        if len(self._events) > 10_000:
            self._forget_idle(now)
        return True

    def _forget_idle(self, now: float) -> None:
        for client in [c for c, e in self._events.items() if not e or e[-1] <= now - RATE_WINDOW]:
            del self._events[client]


ReleaseFunction = Callable[[str], Awaitable[None]]


class EtrnService:
    """Replies to ETRN commands and starts the releases they grant.

    Args:
        config: The daemon configuration (held domains, queues, checks).
        spool: Where held parts wait; its per-domain lock marks a release.
        release: Delivers every held part of one domain to its next hop;
            called with the domain's lock held.
        resolver: Looks up MX and address records for `[etrn] dns_check`.
        nursery: Where release tasks run.
    """

    def __init__(
        self,
        config: Config,
        spool: Spool,
        release: ReleaseFunction,
        resolver: MxResolver,
        nursery: trio.Nursery,
    ) -> None:
        self.config = config
        self.spool = spool
        self.release = release
        self.resolver = resolver
        self.nursery = nursery
        self.held = frozenset(config.domains.hold)
        self.limiter = RateLimiter(config.etrn.max_requests_per_minute)
        self._running: set[str] = set()

    async def handle(self, argument: str, client: ipaddress._BaseAddress | None) -> Reply:
        """Return the reply to one ETRN command from `client`."""
        try:
            request = parse_request(argument)
        except EtrnSyntaxError as exc:
            return replies.etrn_syntax(argument, str(exc))
        if not self.limiter.allow(client):
            return replies.etrn_unavailable(argument, f"too many ETRN requests from {client}")
        domains = self._domains_for(request)
        if not domains:
            return replies.etrn_not_allowed(argument, "it is not a domain held here")
        refused = await self._refused_by_dns(domains, client)
        if refused:
            return replies.etrn_not_allowed(
                argument, f"your address {client} is not a mail server of {refused}"
            )
        return self._start(argument, domains)

    def _domains_for(self, request: EtrnRequest) -> list[str]:
        if request.kind == "queue":
            return list(self.config.etrn.queues.get(request.name, ()))
        if request.kind == "domain":
            return [request.name] if request.name in self.held else []
        suffix = "." + request.name
        return sorted(d for d in self.held if d == request.name or d.endswith(suffix))

    async def _refused_by_dns(self, domains: list[str], client) -> str | None:
        checked = set(self.config.etrn.dns_check)
        for domain in domains:
            if domain in checked and not await self._client_serves(domain, client):
                return domain
        return None

    async def _client_serves(self, domain: str, client) -> bool:
        """Return whether `client` is one of the domain's MX hosts or A/AAAA addresses."""
        if client is None:
            return False
        addresses: set[str] = set()
        try:
            addresses.update(hop.address for hop in (await self.resolver.resolve(domain)).hops)
        except (PermanentFailure, TemporaryFailure) as exc:
            logger.info("etrn dns check domain=%s mx lookup failed: %s", domain, exc)
        try:
            addresses.update(hop.address for hop in await self.resolver.resolve_host(domain, 25))
        except (PermanentFailure, TemporaryFailure) as exc:
            logger.info("etrn dns check domain=%s address lookup failed: %s", domain, exc)
        return any(_same_address(address, client) for address in addresses)

    def _start(self, argument: str, domains: list[str]) -> Reply:
        running = [d for d in domains if self.is_running(d)]
        count = self.start_release(domains)
        logger.info(
            "etrn node=%s domains=%s pending=%d running=%s",
            argument, ",".join(domains), count, ",".join(running) or "-",
        )
        if count:
            return replies.etrn_pending(argument, count)
        if running:
            return replies.etrn_started(argument)
        return replies.etrn_no_messages(argument)

    def is_running(self, domain: str) -> bool:
        """Return whether a release of `domain` is starting or running."""
        return domain in self._running or self.spool.lock(domain).locked()

    def start_release(self, domains: list[str]) -> int:
        """Start releasing each domain not already being released.

        Returns:
            The number of held parts the new releases will try.
        """
        count = 0
        for domain in domains:
            if self.is_running(domain):
                continue
            parts = len(self.spool.list_parts(domain))
            if parts:
                # Marked before the task starts, so that a second request right
                # after this one finds the release running and starts no other.
                self._running.add(domain)
                self.nursery.start_soon(self._release, domain)
                count += parts
        return count

    async def _release(self, domain: str) -> None:
        try:
            async with self.spool.lock(domain):
                logger.info("release started domain=%s via=ETRN", domain)
                await self.release(domain)
                logger.info("release finished domain=%s via=ETRN", domain)
        finally:
            self._running.discard(domain)


def _same_address(text: str, client) -> bool:
    try:
        return ipaddress.ip_address(text) == client
    except ValueError:
        return False
