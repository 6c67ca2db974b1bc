"""Maildir delivery from the spool."""

import errno
import logging
import os

import pytest
import trio

from trimta.deliver.local import (
    LocalDeliverySettings,
    MailboxPathError,
    deliver_to_maildir,
    run_local_delivery,
)
from trimta.deliver.mailbox import mailbox_name
from trimta.spool.store import open_spool

BODY = b"Subject: hello\r\nFrom: bob@example.net\r\n\r\nLine one.\r\n.dot line\r\n"


def write_body(tmp_path, content=BODY):
    path = tmp_path / "body.eml"
    path.write_bytes(content)
    return path


def files_under(root):
    found = []
    for directory, _subdirs, files in os.walk(root):
        found += [os.path.join(directory, name) for name in files]
    return found


def test_delivery_lands_in_new(tmp_path):
    root = tmp_path / "maildir"
    root.mkdir()
    body = write_body(tmp_path)
    path = deliver_to_maildir(
        root, "example.org", "alice", body, "bob@example.net", "alice@example.org"
    )
    assert path.parent == root / "example.org" / "alice" / "new"
    content = path.read_bytes()
    assert content.startswith(
        b"Return-Path: <bob@example.net>\r\nDelivered-To: alice@example.org\r\n"
    )
    assert content.endswith(BODY)
    assert len(content) == len(BODY) + len(b"Return-Path: <bob@example.net>\r\n") + len(
        b"Delivered-To: alice@example.org\r\n"
    )
    for sub in ("tmp", "new", "cur"):
        assert (root / "example.org" / "alice" / sub).is_dir()
    assert os.listdir(root / "example.org" / "alice" / "tmp") == []


def test_delivery_keeps_lf_bodies_lf(tmp_path):
    root = tmp_path / "maildir"
    root.mkdir()
    body = write_body(tmp_path, b"Subject: x\n\nbody\n")
    path = deliver_to_maildir(root, "example.org", "bob", body, "", "bob@example.org")
    assert (
        path.read_bytes()
        == b"Return-Path: <>\nDelivered-To: bob@example.org\nSubject: x\n\nbody\n"
    )


def test_large_body_copied_intact(tmp_path):
    root = tmp_path / "maildir"
    root.mkdir()
    content = b"Subject: big\r\n\r\n" + bytes(range(256)) * 4096  # 1 MiB
    body = write_body(tmp_path, content)
    path = deliver_to_maildir(
        root, "example.org", "carol", body, "a@b.example", "carol@example.org"
    )
    assert path.read_bytes().endswith(content)


def test_unique_names_differ(tmp_path):
    root = tmp_path / "maildir"
    root.mkdir()
    body = write_body(tmp_path)
    paths = {
        deliver_to_maildir(root, "example.org", "dave", body, "", "d@example.org")
        for _ in range(20)
    }
    assert len(paths) == 20


@pytest.mark.parametrize(
    "local_part",
    ["../../etc", ".hidden", "A/B", "..", ".", "a\x00b", "ünï", "", "x/../../y"],
)
def test_hostile_local_parts_stay_inside(tmp_path, local_part):
    root = tmp_path / "maildir"
    root.mkdir()
    body = write_body(tmp_path)
    path = deliver_to_maildir(
        root, "example.org", mailbox_name(local_part), body, "", "x@example.org"
    )
    mailbox_dir = path.parent.parent
    assert mailbox_dir.parent == root / "example.org"
    assert path.resolve().is_relative_to(root.resolve())
    assert not mailbox_dir.name.startswith(".")
    assert all(
        f.startswith(str(root)) for f in files_under(tmp_path) if "body.eml" not in f
    )


def test_symlinked_mailbox_rejected(tmp_path):
    root = tmp_path / "maildir"
    (root / "example.org").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "example.org" / "eve").symlink_to(outside)
    body = write_body(tmp_path)
    with pytest.raises(MailboxPathError):
        deliver_to_maildir(root, "example.org", "eve", body, "", "eve@example.org")
    assert os.listdir(outside) == []


def test_header_injection_rejected(tmp_path):
    root = tmp_path / "maildir"
    root.mkdir()
    body = write_body(tmp_path)
    with pytest.raises(ValueError):
        deliver_to_maildir(
            root, "example.org", "alice", body, "a@b\r\nX-Evil: 1", "alice@example.org"
        )
    assert files_under(root / "example.org" / "alice") == []


def users_resolver(users):
    def resolve(local_part, domain):
        return local_part.lower() if local_part.lower() in users else None

    return resolve


async def commit(spool, recipients, sender="bob@example.net"):
    writer = spool.new_message()
    await writer.write(BODY)
    return await writer.commit(sender=sender, recipients=recipients)


async def test_delivery_task_delivers_and_removes(tmp_path, caplog):
    root = tmp_path / "maildir"
    settings = LocalDeliverySettings(root, users_resolver({"alice", "bob"}))
    root.mkdir()
    caplog.set_level(logging.INFO, logger="trimta.deliver")
    async with open_spool(tmp_path / "spool") as (spool, _):
        parts = spool.subscribe()
        async with trio.open_nursery() as nursery:
            await nursery.start(run_local_delivery, spool, settings, parts)
            (part,) = await commit(
                spool, {"example.org": ["alice@example.org", "Bob@example.org"]}
            )
            with trio.fail_after(5):
                while spool.list_parts("example.org"):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    for user in ("alice", "bob"):
        (name,) = os.listdir(root / "example.org" / user / "new")
        assert (root / "example.org" / user / "new" / name).read_bytes().endswith(BODY)
    assert not (
        tmp_path / "spool" / "domains" / "example.org" / (part.mid + ".eml")
    ).exists()
    delivered = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("delivered")
    ]
    assert (
        f"delivered mid={part.mid} domain=example.org "
        "rcpt=alice@example.org mailbox=alice" in delivered
    )
    assert len(delivered) == 2


async def test_unknown_mailbox_marked_failed(tmp_path):
    root = tmp_path / "maildir"
    root.mkdir()
    settings = LocalDeliverySettings(root, users_resolver({"alice"}))
    async with open_spool(tmp_path / "spool") as (spool, _):
        from trimta.deliver.local import LocalDelivery

        (part,) = await commit(
            spool, {"example.org": ["alice@example.org", "nobody@example.org"]}
        )
        delivery = LocalDelivery(spool, settings)
        assert await delivery.deliver_part(part) is None
        assert spool.list_parts("example.org") == []
    assert len(os.listdir(root / "example.org" / "alice" / "new")) == 1
    assert not (root / "example.org" / "nobody").exists()


async def test_failed_write_retries_with_backoff(tmp_path, mock_clock):
    # Jump virtual time only after 50 ms of real idleness, so the worker
    # threads doing file work finish before a jump.
    mock_clock.autojump_threshold = 0.05
    root = tmp_path / "maildir"
    root.mkdir()
    failures = {"left": 2}

    def flaky_fsync(fd):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)

    settings = LocalDeliverySettings(
        root, users_resolver({"alice"}), retry_delay=30.0, fsync=flaky_fsync
    )
    async with open_spool(tmp_path / "spool") as (spool, _):
        parts_send, parts_receive = trio.open_memory_channel(10)
        (part,) = await commit(spool, {"example.org": ["alice@example.org"]})
        async with trio.open_nursery() as nursery:
            await nursery.start(run_local_delivery, spool, settings, parts_receive)
            start = trio.current_time()
            await parts_send.send(part)
            with trio.fail_after(10):
                while (envelope := await spool.load(part)).attempts == 0:
                    await trio.sleep(1)
            assert envelope.attempts == 1
            assert envelope.recipients[0].state == "pending"
            assert "No space left" in envelope.recipients[0].last_error
            with trio.fail_after(1000):
                while spool.list_parts("example.org"):
                    await trio.sleep(5)
            # Two failures: retries after 30 s and then 60 s.
            assert 90 <= trio.current_time() - start <= 96
            nursery.cancel_scope.cancel()
    assert len(os.listdir(root / "example.org" / "alice" / "new")) == 1
    assert os.listdir(root / "example.org" / "alice" / "tmp") == []
