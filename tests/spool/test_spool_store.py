"""Spool write, commit, read, save, remove and notification behaviour."""

import os

import pytest
import trio

from trimta.spool import store
from trimta.spool.envelope import ClientInfo, PartRef, Recipient, parse_envelope
from trimta.spool.names import new_mid
from trimta.spool.store import Spool, SpoolError, open_spool

BODY = b"Subject: test\r\n\r\nHello.\r\n"


async def commit_message(spool, body=BODY, recipients=None, **fields):
    writer = spool.new_message()
    await writer.write(body)
    recipients = recipients or {"example.org": ["alice@example.org"]}
    return await writer.commit(
        sender="bob@example.net", recipients=recipients, **fields
    )


def spool_files(root):
    """Return every file below root, relative, sorted."""
    found = []
    for directory, _subdirs, files in os.walk(root):
        for name in files:
            found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


async def test_commit_load_round_trip(tmp_path):
    async with open_spool(tmp_path) as (spool, recovered):
        assert recovered == []
        (part,) = await commit_message(
            spool,
            recipients={
                "example.org": [Recipient("a@example.org", orcpt="rfc822;a@x")]
            },
            params={"BODY": "8BITMIME", "SMTPUTF8": None},
            client=ClientInfo(helo="client.example", address="192.0.2.7"),
        )
        envelope = await spool.load(part)
        assert envelope.id == part.mid
        assert envelope.domain == "example.org"
        assert envelope.sender == "bob@example.net"
        assert envelope.recipients == [
            Recipient("a@example.org", state="pending", orcpt="rfc822;a@x")
        ]
        assert envelope.size == len(BODY)
        assert envelope.params == {"BODY": "8BITMIME", "SMTPUTF8": None}
        assert envelope.client == ClientInfo("client.example", "192.0.2.7")
        assert envelope.attempts == 0
        assert spool.body_path(part).read_bytes() == BODY
        assert spool_files(tmp_path / "tmp") == []


async def test_multi_domain_shares_inode(tmp_path):
    recipients = {
        "example.org": ["a@example.org"],
        "example.com": ["b@example.com", "c@example.com"],
        "[192.0.2.1]": ["d@[192.0.2.1]"],
    }
    async with open_spool(tmp_path) as (spool, _):
        parts = await commit_message(spool, recipients=recipients)
        assert [p.domain for p in parts] == list(recipients)
        assert len({p.mid for p in parts}) == 1
        stats = [os.stat(spool.body_path(p)) for p in parts]
        assert len({s.st_ino for s in stats}) == 1
        assert stats[0].st_nlink == 3
        second = await spool.load(parts[1])
        assert [r.address for r in second.recipients] == recipients["example.com"]


async def test_large_body_streams_to_disk(tmp_path):
    block = bytes(range(256)) * 400  # 100 KiB, so several buffer flushes
    async with open_spool(tmp_path) as (spool, _):
        writer = spool.new_message()
        for _ in range(30):
            await writer.write(block)
        temporary = tmp_path / "tmp" / (writer.mid + ".eml")
        # Everything but the last partial buffer is already on disk.
        assert temporary.stat().st_size >= 30 * len(block) - 256 * 1024
        (part,) = await writer.commit(
            sender="", recipients={"example.org": ["a@example.org"]}
        )
        assert spool.body_path(part).read_bytes() == block * 30
        assert (await spool.load(part)).size == 30 * len(block)


async def test_save_replaces_envelope(tmp_path):
    async with open_spool(tmp_path) as (spool, _):
        (part,) = await commit_message(spool)
        envelope = await spool.load(part)
        envelope.attempts = 2
        envelope.recipients[0].state = "delivered"
        await spool.save(envelope)
        reloaded = await spool.load(part)
        assert reloaded.attempts == 2
        assert reloaded.recipients[0].state == "delivered"
        assert not [
            n
            for n in os.listdir(tmp_path / "domains" / "example.org")
            if n.endswith(".tmp")
        ]


async def test_remove_deletes_part(tmp_path):
    async with open_spool(tmp_path) as (spool, _):
        parts = await commit_message(
            spool,
            recipients={
                "example.org": ["a@example.org"],
                "example.com": ["b@example.com"],
            },
        )
        await spool.remove(parts[0])
        assert spool.list_parts("example.org") == []
        assert spool.list_parts("example.com") == [parts[1]]
        assert os.stat(spool.body_path(parts[1])).st_nlink == 1
        with pytest.raises(SpoolError):
            await spool.load(parts[0])


async def test_save_after_remove_rejected(tmp_path):
    async with open_spool(tmp_path) as (spool, _):
        (part,) = await commit_message(spool)
        envelope = await spool.load(part)
        await spool.remove(part)
        with pytest.raises(SpoolError, match="no longer exists"):
            await spool.save(envelope)
        assert spool_files(tmp_path / "domains") == []


async def test_list_domains_and_parts_sorted(tmp_path):
    async with open_spool(tmp_path) as (spool, _):
        first = await commit_message(spool, recipients={"b.example": ["x@b.example"]})
        second = await commit_message(spool, recipients={"a.example": ["y@a.example"]})
        third = await commit_message(spool, recipients={"b.example": ["z@b.example"]})
        assert spool.list_domains() == ["a.example", "b.example"]
        assert spool.list_parts("b.example") == [first[0], third[0]]
        assert spool.list_parts("a.example") == second
        assert spool.list_parts("c.example") == []


async def test_subscribe_receives_new_parts(tmp_path):
    async with open_spool(tmp_path) as (spool, _):
        channel = spool.subscribe()
        parts = await commit_message(
            spool,
            recipients={
                "example.org": ["a@example.org"],
                "example.com": ["b@example.com"],
            },
        )
        received = [channel.receive_nowait(), channel.receive_nowait()]
        assert received == parts
        with pytest.raises(trio.WouldBlock):
            channel.receive_nowait()


async def test_subscription_closes_with_committer(tmp_path):
    async with open_spool(tmp_path) as (spool, _):
        channel = spool.subscribe()
    with pytest.raises(trio.EndOfChannel):
        await channel.receive()


async def test_abort_leaves_nothing(tmp_path):
    async with open_spool(tmp_path) as (spool, _):
        writer = spool.new_message()
        await writer.write(b"x" * (300 * 1024))  # past the buffer, so a file exists
        assert len(os.listdir(tmp_path / "tmp")) == 1
        await writer.abort()
        await writer.abort()
        assert spool_files(tmp_path) == []
        with pytest.raises(RuntimeError):
            await writer.write(b"more")


async def test_commit_invalid_domain_rejected(tmp_path):
    async with open_spool(tmp_path) as (spool, _):
        writer = spool.new_message()
        await writer.write(BODY)
        with pytest.raises(ValueError):
            await writer.commit(sender="", recipients={"../etc": ["root@../etc"]})
        with pytest.raises(ValueError):
            await writer.commit(sender="", recipients={"example.org": []})
        await writer.abort()
        assert spool_files(tmp_path) == []


async def test_commit_without_committer_fails(tmp_path):
    spool = Spool(tmp_path)
    await spool.open()
    writer = spool.new_message()
    await writer.write(b"x" * (300 * 1024))  # past the buffer, so a file exists
    with pytest.raises(RuntimeError, match="committer is not running"):
        await writer.commit(sender="", recipients={"example.org": ["a@example.org"]})
    assert len(os.listdir(tmp_path / "tmp")) == 1
    # The writer stays open, so the driver's abort still removes the body.
    await writer.abort()
    assert os.listdir(tmp_path / "tmp") == []


async def test_cancelled_commit_is_all_or_nothing(tmp_path):
    async with open_spool(tmp_path) as (spool, _):
        writers = []
        with trio.move_on_after(0) as scope:
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    writer = spool.new_message()
                    await writer.write(BODY)
                    writers.append(writer)
                    nursery.start_soon(
                        lambda w: w.commit(
                            sender="", recipients={"example.org": ["a@example.org"]}
                        ),
                        writer,
                    )
        assert scope.cancelled_caught
        for writer in writers:
            await writer.abort()  # a no-op after commit, as the driver would call it
        # Jobs run in order, so once this no-op job returns the others are done.
        await spool.remove(PartRef(new_mid(), "example.org"))
        for part in spool.list_parts("example.org"):
            assert spool.body_path(part).read_bytes() == BODY
        assert os.listdir(tmp_path / "tmp") == []
    recovered_files = spool_files(tmp_path / "domains")
    assert len(recovered_files) == 2 * len(spool.list_parts("example.org"))


async def test_group_commit_shares_fsyncs(tmp_path):
    calls = []

    def counting_fsync(fd):
        calls.append(fd)
        os.fsync(fd)

    async with open_spool(tmp_path, fsync=counting_fsync) as (spool, _):
        results = {}

        async def one(index):
            results[index] = await commit_message(spool, body=b"message %d\r\n" % index)

        async with trio.open_nursery() as nursery:
            for index in range(50):
                nursery.start_soon(one, index)
        assert len(results) == 50
        for index, (part,) in results.items():
            assert spool.body_path(part).read_bytes() == b"message %d\r\n" % index
        assert len(spool.list_parts("example.org")) == 50
        assert spool.stats.jobs == 50
        assert spool.stats.batches < 50
        assert spool.stats.dir_fsyncs < 50
        assert len(calls) == spool.stats.file_fsyncs + spool.stats.dir_fsyncs


async def test_lock_is_per_domain(tmp_path):
    async with open_spool(tmp_path) as (spool, _):
        async with spool.lock("example.org"):
            assert spool.lock("example.org").locked()
            assert not spool.lock("example.com").locked()
        assert not spool.lock("example.org").locked()
        with pytest.raises(ValueError):
            spool.lock("../x")


async def test_load_rejects_hostile_part(tmp_path):
    with pytest.raises(ValueError):
        PartRef("../../../etc/passwd", "example.org")
    with pytest.raises(ValueError):
        PartRef("0" * 20, "../..")


async def test_first_load_of_new_part_matches_disk(tmp_path):
    async with open_spool(tmp_path) as (spool, _):
        (part,) = await commit_message(spool)
        on_disk = parse_envelope(spool.body_path(part).with_suffix(".env").read_bytes())
        first = await spool.load(part)
        second = await spool.load(part)
        assert first == on_disk
        assert second == on_disk


async def test_load_after_save_sees_saved_envelope(tmp_path):
    async with open_spool(tmp_path) as (spool, _):
        (part,) = await commit_message(spool)
        changed = parse_envelope(spool.body_path(part).with_suffix(".env").read_bytes())
        changed.attempts = 3
        await spool.save(changed)
        loaded = await spool.load(part)
        assert loaded.attempts == 3


async def test_fresh_envelopes_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "FRESH_ENVELOPES", 2)
    async with open_spool(tmp_path) as (spool, _):
        parts = [(await commit_message(spool))[0] for _ in range(3)]
        assert len(spool._fresh) == 2
        for part in parts:
            loaded = await spool.load(part)
            assert loaded.part == part


async def test_peek_leaves_new_envelope_kept(tmp_path):
    async with open_spool(tmp_path) as (spool, _):
        (part,) = await commit_message(spool)
        peeked = await spool.load(part, peek=True)
        assert part in spool._fresh
        loaded = await spool.load(part)
        assert loaded is peeked
        assert part not in spool._fresh
