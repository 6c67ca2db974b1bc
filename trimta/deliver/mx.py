"""Next-hop resolution: MX, implicit MX and host lookups with dnspython.

The rules follow RFC 5321 section 5.1 and RFC 7505 (null MX):

- MX records are tried in order of preference, and hosts of equal
  preference in random order.
- A domain with no MX records (NOERROR, no data) is its own mail exchanger
  at preference 0 (the "implicit MX").
- A domain whose only MX record has the exchange "." accepts no mail.
- If trimta itself is one of the MX hosts, every host of the same or a
  worse preference is dropped, so mail never loops back to trimta.

Each host's IPv4 addresses come before its IPv6 addresses. Many container
and home networks have no IPv6 route, or one that drops packets, and a
dropped connection attempt costs a full connect timeout per address. The
delivery driver tries every returned address in order until one accepts.

Lookups run on dnspython's asynchronous resolver with its Trio backend, so
no thread is involved and Trio cancellation interrupts any lookup.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections.abc import Iterable

import attrs
import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import trio

logger = logging.getLogger("trimta.deliver")

# RFC 6761 6.3: "localhost" always means the loopback host. dnspython does
# not read /etc/hosts, so without this a route to "localhost" would fail.
_LOCALHOST_ADDRESSES = ("127.0.0.1", "::1")


@attrs.frozen
class NextHop:
    """One address to connect to for a delivery attempt.

    Attributes:
        host: the MX host name, or the route's host, without a trailing dot.
        address: the IP address to connect to, in text form.
        port: the TCP port.
        preference: the MX preference; 0 for the implicit MX and for routes.
    """

    host: str
    address: str
    port: int
    preference: int


@attrs.frozen
class Resolution:
    """The next hops of a domain.

    Attributes:
        hops: the addresses in the order to try them; never empty.
    """

    hops: tuple[NextHop, ...]


@attrs.define(auto_exc=True, eq=False)
class PermanentFailure(Exception):
    """A resolution failure that no retry can fix; the recipients bounce.

    Attributes:
        status: the RFC 3463 enhanced status code, e.g. "5.1.2".
        text: a sentence that names the domain and the reason.
    """

    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.status} {self.text}"


@attrs.define(auto_exc=True, eq=False)
class TemporaryFailure(Exception):
    """A resolution failure that a later attempt may not see; retry later.

    Attributes:
        status: the RFC 3463 enhanced status code, e.g. "4.4.3".
        text: a sentence that names the domain and the reason.
    """

    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.status} {self.text}"


@attrs.frozen
class _Answer:
    """The outcome of one DNS query, with the failure kinds kept apart.

    Attributes:
        records: the answer's rdata; empty for NXDOMAIN, no data or errors.
        nxdomain: the name does not exist.
        error: why the query failed (SERVFAIL, REFUSED, timeout ...), or
            None when a server replied.
    """

    records: tuple = ()
    nxdomain: bool = False
    error: str | None = None


@attrs.frozen
class _Host:
    """One MX host and what its address lookups returned.

    Attributes:
        name: the host name, lowercase and without a trailing dot.
        preference: the MX preference.
        addresses: its IPv4 addresses, then its IPv6 addresses.
        error: why a lookup failed, or None.
    """

    name: str
    preference: int
    addresses: tuple[str, ...] = ()
    error: str | None = None


class MxResolver:
    """Resolve a recipient domain or a route host into next hops."""

    def __init__(
        self,
        *,
        nameservers: list[tuple[str, int]] | None,
        own_hostnames: set[str],
        own_addresses: set[str],
        timeout: float = 10.0,
        rng: random.Random | None = None,
        resolver: dns.asyncresolver.Resolver | None = None,
    ) -> None:
        """Set up the resolver.

        Args:
            nameservers: (IP address, port) pairs to query; None or empty
                reads the system's resolv.conf.
            own_hostnames: names of this trimta, compared without case, to
                detect mail that would loop back.
            own_addresses: IP addresses this trimta receives mail on. Pass
                the real addresses, because a wildcard such as "0.0.0.0"
                matches no MX host.
            timeout: seconds allowed for each DNS query, over all servers.
            rng: the random source that orders MX hosts of equal
                preference; tests pass a seeded one.
            resolver: a dnspython async resolver (or an object with the
                same ``resolve`` method) to use instead of building one.

        Raises:
            dns.resolver.NoResolverConfiguration: ``nameservers`` is empty
                and the system has no usable resolv.conf.
        """
        self._resolver = resolver or _build_resolver(nameservers, timeout)
        self._timeout = timeout
        self._own_hostnames = {_normalise_name(name) for name in own_hostnames}
        self._own_addresses = {_normalise_address(a) for a in own_addresses}
        self._rng = rng or random.Random()
        self._backend = dns.asyncbackend.get_backend("trio")

    async def resolve(self, domain: str, port: int = 25) -> Resolution:
        """Find the addresses to deliver mail for `domain` to.

        Args:
            domain: the recipient domain as an A-label, or an address
                literal such as "[192.0.2.1]" or "[IPv6:2001:db8::1]".
            port: the TCP port of every returned hop.

        Raises:
            PermanentFailure: 5.1.2 when the domain does not exist or has
                neither MX nor address records, 5.1.10 for a null MX.
            TemporaryFailure: 4.4.3 when DNS failed or timed out, 4.4.4
                when no MX host has an address, 4.4.6 when trimta itself is
                the best MX (the mail would loop).
        """
        domain = _normalise_name(domain)
        if domain.startswith("["):
            return self._resolve_literal(domain, port)

        answer = await self._query(domain, "MX")
        if answer.error is not None:
            raise TemporaryFailure(
                "4.4.3", f"MX lookup for {domain} failed: {answer.error}"
            )
        if answer.nxdomain:
            raise PermanentFailure("5.1.2", f"domain {domain} does not exist")
        if not answer.records:
            return await self._resolve_implicit_mx(domain, port)
        return await self._resolve_mx_records(domain, answer.records, port)

    async def resolve_host(self, host: str, port: int) -> list[NextHop]:
        """Find the addresses of one host, such as a configured route.

        An IP address (with or without brackets) is returned as it is.
        This method does no loop check, because a route may rightly point
        at another port on one of trimta's own addresses.

        Raises:
            TemporaryFailure: 4.4.3 when DNS failed or timed out, 4.4.4
                when the host has no address or does not exist. A route
                is configuration, so a wrong name is left for the
                administrator to fix before the mail expires.
        """
        name = _normalise_name(host).strip("[]")
        if _is_ip_address(name):
            return [NextHop(name, _normalise_address(name), port, 0)]

        found = await self._lookup_host(name, 0)
        if found.addresses:
            return _hops_of([found], port)
        if found.error is not None:
            raise TemporaryFailure(
                "4.4.3", f"address lookup for {name} failed: {found.error}"
            )
        raise TemporaryFailure("4.4.4", f"host {name} has no A or AAAA record")

    def _resolve_literal(self, domain: str, port: int) -> Resolution:
        # RFC 5321 4.1.3: an address literal names the host directly.
        text = domain[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
        if not _is_ip_address(text):
            raise PermanentFailure("5.1.2", f"invalid address literal {domain}")

        address = _normalise_address(text)
        if address in self._own_addresses:
            raise TemporaryFailure(
                "4.4.6", f"mail for {domain} loops back to myself: it is my address"
            )
        return Resolution((NextHop(domain, address, port, 0),))

    async def _resolve_implicit_mx(self, domain: str, port: int) -> Resolution:
        # RFC 5321 5.1: without MX records the domain itself is the host.
        found = await self._lookup_host(domain, 0)
        if found.error is not None and not found.addresses:
            raise TemporaryFailure(
                "4.4.3", f"address lookup for {domain} failed: {found.error}"
            )
        if not found.addresses:
            raise PermanentFailure(
                "5.1.2", f"domain {domain} has no MX, A or AAAA record"
            )
        if self._is_self(found):
            raise TemporaryFailure(
                "4.4.6",
                f"mail for {domain} loops back to myself: "
                "the domain has no MX and its address is mine",
            )
        return Resolution(tuple(_hops_of([found], port)))

    async def _resolve_mx_records(
        self, domain: str, records: tuple, port: int
    ) -> Resolution:
        exchanges = [
            (rr.preference, _normalise_name(str(rr.exchange))) for rr in records
        ]
        # RFC 7505 3: a null MX is one record whose exchange is the root.
        # A lone "." at another preference cannot be delivered to either.
        if len(exchanges) == 1 and exchanges[0][1] == "":
            raise PermanentFailure(
                "5.1.10", f"domain {domain} accepts no mail (null MX, RFC 7505)"
            )

        ordered = _order_exchanges(exchanges, self._rng)
        hosts = await self._lookup_hosts(ordered)
        hosts = self._drop_self_and_worse(domain, hosts)
        usable = [host for host in hosts if host.addresses]
        for host in hosts:
            if not host.addresses:
                _log_skipped_host(domain, host)

        if usable:
            return Resolution(tuple(_hops_of(usable, port)))
        errors = [host.error for host in hosts if host.error is not None]
        if errors:
            raise TemporaryFailure(
                "4.4.3",
                f"address lookups for the MX hosts of {domain} failed: {errors[0]}",
            )
        names = ", ".join(host.name or "." for host in hosts)
        raise TemporaryFailure(
            "4.4.4", f"no MX host of {domain} has an address: {names}"
        )

    def _drop_self_and_worse(self, domain: str, hosts: list[_Host]) -> list[_Host]:
        # RFC 5321 5.1: discard every MX of the same or a worse preference
        # than our own. If nothing is left, this host was the best MX.
        own = [host.preference for host in hosts if self._is_self(host)]
        if not own:
            return hosts

        kept = [host for host in hosts if host.preference < min(own)]
        if not kept:
            raise TemporaryFailure(
                "4.4.6", f"mail for {domain} loops back to myself: I am its best MX"
            )
        return kept

    def _is_self(self, host: _Host) -> bool:
        if host.name in self._own_hostnames:
            return True
        return any(address in self._own_addresses for address in host.addresses)

    async def _lookup_hosts(self, exchanges: list[tuple[int, str]]) -> list[_Host]:
        hosts: list[_Host | None] = [None] * len(exchanges)

        async def lookup_one(index: int, preference: int, name: str) -> None:
            hosts[index] = await self._lookup_host(name, preference)

        async with trio.open_nursery() as nursery:
            for index, (preference, name) in enumerate(exchanges):
                nursery.start_soon(lookup_one, index, preference, name)
        return [host for host in hosts if host is not None]

    async def _lookup_host(self, name: str, preference: int) -> _Host:
        if name == "localhost":
            return _Host(name, preference, _LOCALHOST_ADDRESSES)
        if name == "":
            # The root "." appearing among other MX records names no host.
            return _Host(name, preference)

        answers: dict[str, _Answer] = {}

        async def query(rdtype: str) -> None:
            answers[rdtype] = await self._query(name, rdtype)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(query, "A")
            nursery.start_soon(query, "AAAA")
        return _host_from_answers(name, preference, answers["A"], answers["AAAA"])

    async def _query(self, name: str, rdtype: str) -> _Answer:
        # The name is made absolute so that no resolv.conf search domain is
        # appended to it.
        qname = dns.name.from_text(name or ".")
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, lifetime=self._timeout, backend=self._backend
            )
        except dns.resolver.NXDOMAIN:
            return _Answer(nxdomain=True)
        except dns.resolver.NoAnswer:
            return _Answer()
        except dns.resolver.NoNameservers:
            return _Answer(
                error=f"no server answered {rdtype} {name} (SERVFAIL or REFUSED)"
            )
        except dns.exception.Timeout:
            return _Answer(error=f"{rdtype} query for {name} timed out")
        except dns.exception.DNSException as exc:
            return _Answer(error=f"{rdtype} query for {name} failed: {exc}")
        return _Answer(records=tuple(answer))


def _build_resolver(
    nameservers: list[tuple[str, int]] | None, timeout: float
) -> dns.asyncresolver.Resolver:
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(address, port)
            for address, port in nameservers
        ]
    else:
        resolver = dns.asyncresolver.Resolver(configure=True)

    # `timeout` bounds each server's try and `lifetime` the whole query.
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


def _order_exchanges(
    exchanges: Iterable[tuple[int, str]], rng: random.Random
) -> list[tuple[int, str]]:
    # RFC 5321 5.1: sort by preference and randomise hosts of equal
    # preference. A host listed twice keeps its best preference.
    best: dict[str, int] = {}
    for preference, name in exchanges:
        best[name] = min(preference, best.get(name, preference))

    by_preference: dict[int, list[str]] = {}
    for name, preference in best.items():
        by_preference.setdefault(preference, []).append(name)

    ordered = []
    for preference in sorted(by_preference):
        names = sorted(by_preference[preference])
        rng.shuffle(names)
        ordered += [(preference, name) for name in names]
    return ordered


def _host_from_answers(
    name: str, preference: int, a_answer: _Answer, aaaa_answer: _Answer
) -> _Host:
    addresses = [
        _normalise_address(rr.address)
        for rr in (*a_answer.records, *aaaa_answer.records)
    ]
    error = a_answer.error or aaaa_answer.error
    return _Host(name, preference, tuple(dict.fromkeys(addresses)), error)


def _hops_of(hosts: Iterable[_Host], port: int) -> list[NextHop]:
    return [
        NextHop(host.name, address, port, host.preference)
        for host in hosts
        for address in host.addresses
    ]


def _log_skipped_host(domain: str, host: _Host) -> None:
    reason = host.error or "no A or AAAA record"
    logger.warning(
        "mx-host-skipped domain=%s host=%s preference=%d error=%s",
        domain,
        host.name or ".",
        host.preference,
        reason,
    )


def _normalise_name(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _normalise_address(text: str) -> str:
    # The compressed form, so "::0001" and "::1" compare equal.
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text
