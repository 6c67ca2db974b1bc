"""The queue manager's schedule, limits and bookkeeping, on a real spool.

The next hop here is a scripted stand-in for the SMTP driver, so that
Trio's autojump clock can run hours of retries in milliseconds; the
driver itself is tested against real servers in tests/interop.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import trio
import trio.testing

from trimta.deliver.outcome import DestinationError, RecipientOutcome, Verdict
from trimta.deliver.queue import QueueManager
from trimta.deliver.schedule import RetryPolicy
from trimta.spool.store import Spool

RETRY = RetryPolicy(min_backoff=300, max_backoff=4000, max_lifetime=5 * 86400)


@pytest.fixture
def autojump_clock():
    # The spool works in threads, and Trio's clock would otherwise jump
    # ahead while a thread runs, so it jumps only after 50 ms of real
    # idleness.
    return trio.testing.MockClock(autojump_threshold=0.05)


class ScriptedNextHop:
    """A stand-in next hop whose replies come from a function of (address, try)."""

    def __init__(self, reply, connect_error=None, delay=0.0):
        self.reply = reply
        self.connect_error = connect_error
        self.delay = delay
        self.tries: dict[str, int] = {}
        self.attempt_times: dict[str, list[float]] = {}
        self.open_connections = 0
        self.max_open = 0
        self.connections = 0
        self.messages_per_connection: list[int] = []

    @contextlib.asynccontextmanager
    async def connect(self, domain):
        if self.connect_error is not None:
            raise self.connect_error
        self.connections += 1
        self.open_connections += 1
        self.max_open = max(self.max_open, self.open_connections)
        connection = _ScriptedConnection(self)
        try:
            yield connection
        finally:
            self.open_connections -= 1
            self.messages_per_connection.append(connection.messages)


class _ScriptedConnection:
    def __init__(self, hop):
        self.hop = hop
        self.messages = 0

    async def deliver(self, envelope, body_path):
        await trio.sleep(self.hop.delay)
        self.messages += 1
        outcomes = []
        for recipient in envelope.recipients:
            if recipient.state != "pending":
                continue
            tries = self.hop.tries.get(recipient.address, 0) + 1
            self.hop.tries[recipient.address] = tries
            self.hop.attempt_times.setdefault(recipient.address, []).append(trio.current_time())
            code = self.hop.reply(recipient.address, tries)
            verdict = {2: Verdict.DELIVERED, 4: Verdict.DEFERRED, 5: Verdict.FAILED}[code // 100]
            status = f"{code // 100}.0.0"
            outcomes.append(
                RecipientOutcome(recipient.address, verdict, status, f"{code} {status} scripted", "mx.test")
            )
        return outcomes


class Harness:
    def __init__(self, spool, manager, hop, bounces, send):
        self.spool = spool
        self.manager = manager
        self.hop = hop
        self.bounces = bounces
        self.send = send

    async def queue_message(self, recipients, sender="alice@example.org"):
        writer = self.spool.new_message()
        await writer.write(b"Subject: test\r\n\r\nbody\r\n")
        parts = await writer.commit(sender=sender, recipients={"example.net": recipients})
        for part in parts:
            await self.send.send(part)
        return writer.mid


@contextlib.asynccontextmanager
async def running_queue(tmp_path, hop, *, retry=RETRY, per_domain=4, total=20):
    spool = Spool(tmp_path / "spool")
    await spool.open()
    offset = time.time() - trio.current_time()
    bounces = []

    async def bounce(envelope, failed):
        bounces.append((envelope.id, [(o.address, o.status) for o in failed]))

    manager = QueueManager(
        spool, hop, bounce, retry,
        max_concurrency=total, per_domain_concurrency=per_domain,
        wall_clock=lambda: offset + trio.current_time(),
    )
    send, receive = trio.open_memory_channel(1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(spool.run_committer)
        await nursery.start(manager.run, receive)
        yield Harness(spool, manager, hop, bounces, send)
        nursery.cancel_scope.cancel()


async def test_delivered_part_removed(tmp_path):
    hop = ScriptedNextHop(lambda address, tries: 250)
    async with running_queue(tmp_path, hop) as harness:
        await harness.queue_message(["bob@example.net", "carol@example.net"])
        await trio.sleep(1)
        assert harness.spool.list_parts("example.net") == []
    assert hop.tries == {"bob@example.net": 1, "carol@example.net": 1}
    assert harness.bounces == []


async def test_4xx_retried_after_backoff(tmp_path, autojump_clock):
    hop = ScriptedNextHop(lambda address, tries: 451 if tries < 3 else 250)
    async with running_queue(tmp_path, hop) as harness:
        start = trio.current_time()
        await harness.queue_message(["bob@example.net"])
        await trio.sleep(2000)
        assert harness.spool.list_parts("example.net") == []
    times = [t - start for t in hop.attempt_times["bob@example.net"]]
    assert len(times) == 3
    assert times[1] - times[0] == pytest.approx(300, abs=1)
    assert times[2] - times[1] == pytest.approx(600, abs=1)
    assert harness.bounces == []


async def test_5xx_bounces_only_failed_recipient(tmp_path):
    hop = ScriptedNextHop(lambda address, tries: 550 if address.startswith("bad") else 250)
    async with running_queue(tmp_path, hop) as harness:
        mid = await harness.queue_message(["bad@example.net", "good@example.net"])
        await trio.sleep(1)
        assert harness.spool.list_parts("example.net") == []
    assert harness.bounces == [(mid, [("bad@example.net", "5.0.0")])]


async def test_deferred_part_keeps_delivered_recipient(tmp_path, autojump_clock):
    hop = ScriptedNextHop(lambda address, tries: 451 if address.startswith("slow") else 250)
    async with running_queue(tmp_path, hop) as harness:
        await harness.queue_message(["slow@example.net", "fast@example.net"])
        await trio.sleep(10)
        [part] = harness.spool.list_parts("example.net")
        envelope = await harness.spool.load(part)
        states = {r.address: r.state for r in envelope.recipients}
        assert states == {"slow@example.net": "pending", "fast@example.net": "delivered"}
        assert envelope.attempts == 1
        assert envelope.last_error == "451 4.0.0 scripted"
        await trio.sleep(400)
    # The delivered recipient is never sent again.
    assert hop.tries["fast@example.net"] == 1
    assert hop.tries["slow@example.net"] == 2


async def test_expired_part_bounces_with_4_4_7(tmp_path, autojump_clock):
    retry = RetryPolicy(min_backoff=300, max_backoff=4000, max_lifetime=1000)
    hop = ScriptedNextHop(lambda address, tries: 451)
    async with running_queue(tmp_path, hop, retry=retry) as harness:
        start = trio.current_time()
        mid = await harness.queue_message(["bob@example.net"])
        await trio.sleep(5000)
        assert harness.spool.list_parts("example.net") == []
    times = [round(t - start) for t in hop.attempt_times["bob@example.net"]]
    assert times == [0, 300, 900, 1000]
    assert harness.bounces == [(mid, [("bob@example.net", "4.4.7")])]


async def test_null_sender_still_reported_to_bounce_hook(tmp_path):
    # The bounce hook itself drops DSNs for the null sender; the queue
    # manager reports every failure to it.
    hop = ScriptedNextHop(lambda address, tries: 550)
    async with running_queue(tmp_path, hop) as harness:
        await harness.queue_message(["bob@example.net"], sender="")
        await trio.sleep(1)
    assert len(harness.bounces) == 1


async def test_per_domain_limit_and_connection_reuse(tmp_path, autojump_clock):
    hop = ScriptedNextHop(lambda address, tries: 250, delay=1.0)
    async with running_queue(tmp_path, hop, per_domain=3) as harness:
        for index in range(30):
            await harness.queue_message([f"user{index}@example.net"])
        await trio.sleep(100)
        assert harness.spool.list_parts("example.net") == []
    assert hop.max_open == 3
    assert sum(hop.messages_per_connection) == 30
    assert hop.connections <= 6


async def test_global_limit_caps_workers(tmp_path, autojump_clock):
    hop = ScriptedNextHop(lambda address, tries: 250, delay=1.0)
    async with running_queue(tmp_path, hop, per_domain=10, total=2) as harness:
        for index in range(10):
            await harness.queue_message([f"user{index}@example.net"])
        await trio.sleep(100)
    assert hop.max_open == 2


async def test_unreachable_domain_defers_every_part(tmp_path, autojump_clock):
    error = DestinationError(False, "4.4.1", "connection refused by every next hop")
    hop = ScriptedNextHop(lambda address, tries: 250, connect_error=error)
    async with running_queue(tmp_path, hop) as harness:
        for index in range(3):
            await harness.queue_message([f"user{index}@example.net"])
        await trio.sleep(10)
        parts = harness.spool.list_parts("example.net")
        assert len(parts) == 3
        for part in parts:
            envelope = await harness.spool.load(part)
            assert envelope.attempts == 1
            assert envelope.recipients[0].last_error == "connection refused by every next hop"


async def test_routing_failure_bounces(tmp_path):
    error = DestinationError(True, "5.1.2", "example.net does not exist (NXDOMAIN)")
    hop = ScriptedNextHop(lambda address, tries: 250, connect_error=error)
    async with running_queue(tmp_path, hop) as harness:
        mid = await harness.queue_message(["bob@example.net"])
        await trio.sleep(1)
        assert harness.spool.list_parts("example.net") == []
    assert harness.bounces == [(mid, [("bob@example.net", "5.1.2")])]


async def test_recovered_part_waits_for_next_attempt(tmp_path, autojump_clock):
    hop = ScriptedNextHop(lambda address, tries: 250)
    async with running_queue(tmp_path, hop) as harness:
        writer = harness.spool.new_message()
        await writer.write(b"Subject: later\r\n\r\nx\r\n")
        [part] = await writer.commit(sender="a@example.org", recipients={"example.net": ["bob@example.net"]})
        envelope = await harness.spool.load(part)
        envelope.next_attempt = harness.manager.wall_clock() + 500
        await harness.spool.save(envelope)
        await harness.manager.add(part)
        await trio.sleep(499)
        assert "bob@example.net" not in hop.tries
        await trio.sleep(2)
        assert hop.tries["bob@example.net"] == 1
