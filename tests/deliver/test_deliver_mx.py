"""MX, implicit MX and host resolution against a real dnsmasq on 127.0.0.1."""

from __future__ import annotations

import logging
import random
import socket

import dns.message
import dns.rcode
import dnsmasq
import pytest
import trio
from dnsmasq import run_dnsmasq

from trimta.deliver.mx import (
    MxResolver,
    NextHop,
    PermanentFailure,
    Resolution,
    TemporaryFailure,
)

RECORDS = [
    # Two MX hosts of different preference.
    "--mx-host=example.test,mx1.example.test,10",
    "--mx-host=example.test,mx2.example.test,20",
    "--host-record=mx1.example.test,127.0.0.2",
    "--host-record=mx2.example.test,127.0.0.3",
    # Three MX hosts of equal preference.
    "--mx-host=equal.test,a.equal.test,10",
    "--mx-host=equal.test,b.equal.test,10",
    "--mx-host=equal.test,c.equal.test,10",
    "--host-record=a.equal.test,127.0.0.5",
    "--host-record=b.equal.test,127.0.0.6",
    "--host-record=c.equal.test,127.0.0.7",
    # No MX, only an address: the implicit MX.
    "--host-record=aonly.test,127.0.0.4",
    # dnsmasq 2.90 serves a null MX ("MX 0 .") as written here.
    "--mx-host=nullmx.test,.,0",
    # The name exists (it has a TXT record) but has no MX, A or AAAA.
    "--txt-record=empty.test,no mail here",
    # One MX host without any address, one with an address.
    "--mx-host=ghost.test,nowhere.ghost.test,5",
    "--mx-host=ghost.test,mx1.example.test,10",
    # Only MX hosts without any address.
    "--mx-host=allghost.test,nowhere.allghost.test,5",
    "--mx-host=allghost.test,nowhere2.allghost.test,10",
    # trimta (me.loop.test, 127.0.0.8) between two other MX hosts.
    "--mx-host=loop.test,mx1.example.test,10",
    "--mx-host=loop.test,me.loop.test,20",
    "--mx-host=loop.test,mx2.example.test,30",
    "--host-record=me.loop.test,127.0.0.8",
    # trimta as the best MX.
    "--mx-host=loopbest.test,me.loop.test,10",
    "--mx-host=loopbest.test,mx2.example.test,20",
    # trimta sharing the best preference with another host.
    "--mx-host=looptie.test,me.loop.test,10",
    "--mx-host=looptie.test,mx1.example.test,10",
    # A domain whose implicit MX is trimta itself.
    "--host-record=selfonly.test,127.0.0.8",
    # One host with both an IPv4 and an IPv6 address.
    "--mx-host=dual.test,mx.dual.test,10",
    "--host-record=mx.dual.test,::1,127.0.0.9",
]

OWN_NAME = "ME.Loop.Test"
OWN_ADDRESS = "127.0.0.8"


@pytest.fixture(scope="module")
def dns_port():
    with run_dnsmasq(RECORDS) as port:
        yield port


def make_resolver(port, *, own_hostnames=(), own_addresses=(), timeout=2.0, rng=None):
    return MxResolver(
        nameservers=[("127.0.0.1", port)],
        own_hostnames=set(own_hostnames),
        own_addresses=set(own_addresses),
        timeout=timeout,
        rng=rng,
    )


def addresses_of(resolution: Resolution) -> list[str]:
    return [hop.address for hop in resolution.hops]


@pytest.fixture
def silent_port():
    """Yield a UDP port on 127.0.0.1 where a bound socket never replies."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def answer_servfail(sock, max_queries):
    """Answer up to `max_queries` DNS queries on `sock` with SERVFAIL."""
    for _ in range(max_queries):
        data, peer = await sock.recvfrom(4096)
        reply = dns.message.make_response(dns.message.from_wire(data))
        reply.set_rcode(dns.rcode.SERVFAIL)
        await sock.sendto(reply.to_wire(), peer)


async def test_mx_sorted_by_preference(dns_port):
    resolution = await make_resolver(dns_port).resolve("example.test")
    assert resolution.hops == (
        NextHop("mx1.example.test", "127.0.0.2", 25, 10),
        NextHop("mx2.example.test", "127.0.0.3", 25, 20),
    )


async def test_mx_port_passed_to_hops(dns_port):
    resolution = await make_resolver(dns_port).resolve("Example.Test.", port=2525)
    assert [hop.port for hop in resolution.hops] == [2525, 2525]
    assert addresses_of(resolution) == ["127.0.0.2", "127.0.0.3"]


async def test_equal_preference_shuffled(dns_port):
    orders = set()
    for seed in range(20):
        resolver = make_resolver(dns_port, rng=random.Random(seed))
        resolution = await resolver.resolve("equal.test")
        assert {hop.preference for hop in resolution.hops} == {10}
        assert sorted(addresses_of(resolution)) == [
            "127.0.0.5",
            "127.0.0.6",
            "127.0.0.7",
        ]
        orders.add(tuple(hop.host for hop in resolution.hops))
    assert len(orders) > 1


async def test_equal_preference_follows_rng(dns_port):
    resolver = make_resolver(dns_port, rng=random.Random(7))
    resolution = await resolver.resolve("equal.test")
    expected = ["a.equal.test", "b.equal.test", "c.equal.test"]
    random.Random(7).shuffle(expected)
    assert [hop.host for hop in resolution.hops] == expected


async def test_implicit_mx_from_a_record(dns_port):
    resolution = await make_resolver(dns_port).resolve("aonly.test")
    assert resolution.hops == (NextHop("aonly.test", "127.0.0.4", 25, 0),)


async def test_null_mx_fails_permanently(dns_port):
    with pytest.raises(PermanentFailure) as caught:
        await make_resolver(dns_port).resolve("nullmx.test")
    assert caught.value.status == "5.1.10"
    assert "nullmx.test" in caught.value.text


async def test_nxdomain_fails_permanently(dns_port):
    with pytest.raises(PermanentFailure) as caught:
        await make_resolver(dns_port).resolve("nope.test")
    assert caught.value.status == "5.1.2"
    assert "nope.test" in caught.value.text


async def test_no_mx_no_address_fails_permanently(dns_port):
    with pytest.raises(PermanentFailure) as caught:
        await make_resolver(dns_port).resolve("empty.test")
    assert caught.value.status == "5.1.2"
    assert "empty.test" in caught.value.text


async def test_mx_host_without_address_skipped(dns_port, caplog):
    caplog.set_level(logging.WARNING, logger="trimta.deliver")
    resolution = await make_resolver(dns_port).resolve("ghost.test")
    assert resolution.hops == (NextHop("mx1.example.test", "127.0.0.2", 25, 10),)
    warnings = [r for r in caplog.records if r.name == "trimta.deliver"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "host=nowhere.ghost.test" in warnings[0].getMessage()
    assert "domain=ghost.test" in warnings[0].getMessage()


async def test_no_mx_host_address_fails_temporarily(dns_port):
    with pytest.raises(TemporaryFailure) as caught:
        await make_resolver(dns_port).resolve("allghost.test")
    assert caught.value.status == "4.4.4"
    assert "nowhere.allghost.test" in caught.value.text
    assert "nowhere2.allghost.test" in caught.value.text


async def test_loop_drops_self_and_worse(dns_port):
    resolver = make_resolver(dns_port, own_hostnames=[OWN_NAME])
    resolution = await resolver.resolve("loop.test")
    assert resolution.hops == (NextHop("mx1.example.test", "127.0.0.2", 25, 10),)


async def test_loop_detected_by_address(dns_port):
    resolver = make_resolver(dns_port, own_addresses=[OWN_ADDRESS])
    resolution = await resolver.resolve("loop.test")
    assert addresses_of(resolution) == ["127.0.0.2"]


async def test_loop_without_own_identity_keeps_all(dns_port):
    resolution = await make_resolver(dns_port).resolve("loop.test")
    assert addresses_of(resolution) == ["127.0.0.2", "127.0.0.8", "127.0.0.3"]


async def test_best_mx_self_fails_temporarily(dns_port):
    resolver = make_resolver(dns_port, own_hostnames=[OWN_NAME])
    with pytest.raises(TemporaryFailure) as caught:
        await resolver.resolve("loopbest.test")
    assert caught.value.status == "4.4.6"
    assert caught.value.text == (
        "mail for loopbest.test loops back to myself: I am its best MX"
    )


async def test_tied_best_mx_self_fails(dns_port):
    resolver = make_resolver(dns_port, own_addresses=[OWN_ADDRESS])
    with pytest.raises(TemporaryFailure) as caught:
        await resolver.resolve("looptie.test")
    assert caught.value.status == "4.4.6"


async def test_implicit_mx_self_fails(dns_port):
    resolver = make_resolver(dns_port, own_addresses=[OWN_ADDRESS])
    with pytest.raises(TemporaryFailure) as caught:
        await resolver.resolve("selfonly.test")
    assert caught.value.status == "4.4.6"
    assert "selfonly.test" in caught.value.text


async def test_ipv4_before_ipv6(dns_port):
    resolution = await make_resolver(dns_port).resolve("dual.test")
    assert resolution.hops == (
        NextHop("mx.dual.test", "127.0.0.9", 25, 10),
        NextHop("mx.dual.test", "::1", 25, 10),
    )


async def test_refused_fails_temporarily(dns_port):
    # Names outside --local=/test/ have no upstream server, so this dnsmasq
    # replies REFUSED. dnspython reports REFUSED like SERVFAIL.
    with pytest.raises(TemporaryFailure) as caught:
        await make_resolver(dns_port).resolve("example.org")
    assert caught.value.status == "4.4.3"
    assert "example.org" in caught.value.text


async def test_servfail_fails_temporarily():
    # dnsmasq 2.90 replies REFUSED or stays silent when its upstream fails,
    # so a small responder on 127.0.0.1 sends a real SERVFAIL reply.
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_servfail, sock, 10)
            with pytest.raises(TemporaryFailure) as caught:
                await make_resolver(port).resolve("example.test")
            nursery.cancel_scope.cancel()
    assert caught.value.status == "4.4.3"
    assert "SERVFAIL" in caught.value.text


async def test_timeout_fails_temporarily(silent_port):
    resolver = make_resolver(silent_port, timeout=0.3)
    with trio.fail_after(5):
        with pytest.raises(TemporaryFailure) as caught:
            await resolver.resolve("example.test")
    assert caught.value.status == "4.4.3"
    assert "timed out" in caught.value.text


async def test_lookup_cancellable(silent_port):
    resolver = make_resolver(silent_port, timeout=30.0)
    started = trio.current_time()
    with trio.move_on_after(0.2) as scope:
        await resolver.resolve("example.test")
    assert scope.cancelled_caught
    assert trio.current_time() - started < 2.0


async def test_address_literal_domain(dns_port):
    resolver = make_resolver(dns_port)
    resolution = await resolver.resolve("[127.0.0.2]")
    assert resolution.hops == (NextHop("[127.0.0.2]", "127.0.0.2", 25, 0),)
    resolution = await resolver.resolve("[IPv6:::1]")
    assert addresses_of(resolution) == ["::1"]


async def test_address_literal_self_fails(dns_port):
    resolver = make_resolver(dns_port, own_addresses=[OWN_ADDRESS])
    with pytest.raises(TemporaryFailure) as caught:
        await resolver.resolve(f"[{OWN_ADDRESS}]")
    assert caught.value.status == "4.4.6"


async def test_invalid_address_literal_fails(dns_port):
    with pytest.raises(PermanentFailure) as caught:
        await make_resolver(dns_port).resolve("[300.1.1.1]")
    assert caught.value.status == "5.1.2"


async def test_resolve_host_by_name(dns_port):
    hops = await make_resolver(dns_port).resolve_host("mx.dual.test", 10025)
    assert hops == [
        NextHop("mx.dual.test", "127.0.0.9", 10025, 0),
        NextHop("mx.dual.test", "::1", 10025, 0),
    ]


async def test_resolve_host_ip_literal(dns_port):
    resolver = make_resolver(dns_port)
    assert await resolver.resolve_host("192.0.2.1", 25) == [
        NextHop("192.0.2.1", "192.0.2.1", 25, 0)
    ]
    assert await resolver.resolve_host("[2001:DB8::1]", 587) == [
        NextHop("2001:db8::1", "2001:db8::1", 587, 0)
    ]


async def test_resolve_host_localhost(dns_port):
    hops = await make_resolver(dns_port).resolve_host("localhost", 2525)
    assert [hop.address for hop in hops] == ["127.0.0.1", "::1"]


async def test_resolve_host_unknown_fails(dns_port):
    with pytest.raises(TemporaryFailure) as caught:
        await make_resolver(dns_port).resolve_host("nope.test", 25)
    assert caught.value.status == "4.4.4"
    assert "nope.test" in caught.value.text


async def test_resolve_host_timeout_fails(silent_port):
    resolver = make_resolver(silent_port, timeout=0.3)
    with pytest.raises(TemporaryFailure) as caught:
        await resolver.resolve_host("mx1.example.test", 25)
    assert caught.value.status == "4.4.3"


def test_failure_str_has_status():
    failure = TemporaryFailure("4.4.3", "MX lookup for a.test failed")
    assert str(failure) == "4.4.3 MX lookup for a.test failed"


def test_missing_dnsmasq_skips(monkeypatch):
    monkeypatch.setattr(dnsmasq, "DNSMASQ", "/nonexistent/dnsmasq")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("TRIMTA_REQUIRE_PEERS", raising=False)
    with pytest.raises(pytest.skip.Exception):
        dnsmasq.require_dnsmasq()


def test_missing_dnsmasq_fails_when_required(monkeypatch):
    monkeypatch.setattr(dnsmasq, "DNSMASQ", "/nonexistent/dnsmasq")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("TRIMTA_REQUIRE_PEERS", "1")
    with pytest.raises(pytest.fail.Exception):
        dnsmasq.require_dnsmasq()
