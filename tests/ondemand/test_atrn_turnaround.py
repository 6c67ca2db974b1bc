"""ATRN's turnaround over an in-memory connection to a real SMTP server.

The customer's side is trimta's own SMTP session handler with a spool of
its own, so both ends are real implementations; only the TCP connection
is a Trio in-memory stream pair.
"""

from __future__ import annotations

import contextlib

import trio
import trio.testing

from trimta.config.load import parse_text
from trimta.deliver.queue import QueueManager
from trimta.deliver.schedule import RetryPolicy
from trimta.listen.conn import Session, SessionContext
from trimta.listen.policy import RecipientPolicy
from trimta.ondemand.atrn import deliver_turnaround
from trimta.smtp.server import ServerSettings
from trimta.spool.store import Spool

RETRY = RetryPolicy(min_backoff=300, max_backoff=4000, max_lifetime=86400)


class _NoNextHop:
    @contextlib.asynccontextmanager
    async def connect(self, domain):
        raise AssertionError("a turnaround never opens a connection of its own")
        yield


async def open_spool(path):
    spool = Spool(path)
    await spool.open()
    return spool


async def queue_held(spool, domain, count, sender="alice@example.org"):
    mids = []
    for index in range(count):
        writer = spool.new_message()
        await writer.write(f"Subject: held {index}\r\n\r\n.dot line {index}\r\n".encode())
        await writer.commit(sender=sender, recipients={domain: [f"user{index}@{domain}"]})
        mids.append(writer.mid)
    return mids


def customer_context(spool, reject_user: str | None = None) -> SessionContext:
    users = "" if reject_user is None else '[local.users]\n"held.example" = ["user0", "user1", "user2"]\n'
    config = parse_text(f'[domains]\nlocal = ["held.example"]\n{users}', "customer.toml")
    return SessionContext(
        settings=ServerSettings(hostname="customer.example"),
        policy=RecipientPolicy(config),
        spool=spool,
        command_timeout=60,
        data_timeout=60,
        min_data_rate=0,
    )


async def run_turnaround(tmp_path, *, held_count=2, other_count=1, reject_user=None):
    ours = await open_spool(tmp_path / "ours")
    theirs = await open_spool(tmp_path / "theirs")
    bounces = []

    async def bounce(envelope, failed):
        bounces.append([o.address for o in failed])

    queue = QueueManager(
        ours, _NoNextHop(), bounce, RETRY,
        max_concurrency=4, per_domain_concurrency=1,
        held_domains=frozenset({"held.example", "other.example"}),
    )
    ours_end, theirs_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        await nursery.start(ours.run_committer)
        await nursery.start(theirs.run_committer)
        await queue_held(ours, "held.example", held_count)
        await queue_held(ours, "other.example", other_count)
        context = customer_context(theirs, reject_user)
        customer_done = trio.Event()

        async def run_customer():
            await Session(context, theirs_end, None, "customer").run()
            customer_done.set()

        nursery.start_soon(run_customer)
        await deliver_turnaround(
            ours_end, hostname="mx.trimta.test", customer=None,
            domains=["held.example"], queue=queue,
        )
        with trio.fail_after(5):
            await customer_done.wait()  # the customer saw QUIT and closed
        nursery.cancel_scope.cancel()
    return ours, theirs, bounces


async def test_turnaround_delivers_granted_domain_only(tmp_path):
    ours, theirs, bounces = await run_turnaround(tmp_path)
    assert ours.list_parts("held.example") == []
    assert len(ours.list_parts("other.example")) == 1
    delivered = theirs.list_parts("held.example")
    assert len(delivered) == 2
    bodies = sorted(theirs.body_path(p).read_bytes() for p in delivered)
    assert all(b"\r\n\r\n.dot line " in body for body in bodies)
    assert bounces == []


async def test_turnaround_bounces_rejected_recipient(tmp_path):
    ours, theirs, bounces = await run_turnaround(tmp_path, held_count=4, reject_user="user3")
    assert ours.list_parts("held.example") == []
    assert len(theirs.list_parts("held.example")) == 3
    assert bounces == [["user3@held.example"]]


async def test_turnaround_with_dropped_connection_keeps_mail(tmp_path):
    ours = await open_spool(tmp_path / "ours")
    async def no_bounce(envelope, failed):
        raise AssertionError(f"unexpected bounce for {failed}")

    queue = QueueManager(
        ours, _NoNextHop(), no_bounce, RETRY,
        max_concurrency=4, per_domain_concurrency=1,
        held_domains=frozenset({"held.example"}),
    )
    ours_end, theirs_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        await nursery.start(ours.run_committer)
        await queue_held(ours, "held.example", 2)

        async def customer_greets_then_drops():
            await theirs_end.send_all(b"220 customer.example ESMTP\r\n")
            await theirs_end.receive_some(1000)  # EHLO
            await theirs_end.send_all(b"250-customer.example\r\n250 PIPELINING\r\n")
            await theirs_end.receive_some(1000)  # MAIL, RCPT, DATA
            await theirs_end.aclose()

        nursery.start_soon(customer_greets_then_drops)
        await deliver_turnaround(
            ours_end, hostname="mx.trimta.test", customer=None,
            domains=["held.example"], queue=queue,
        )
        nursery.cancel_scope.cancel()
    parts = ours.list_parts("held.example")
    assert len(parts) == 2
    envelope = await ours.load(parts[0])
    assert envelope.recipients[0].state == "pending"
