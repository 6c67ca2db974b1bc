"""The filesystem sync mode: one syncfs per batch step, contents before names."""

import errno
import os

import pytest
import trio

from trimta.spool.store import SpoolError, open_spool
from trimta.spool.syncfs import syncfs

BODY = b"Subject: sync\r\n\r\nHello.\r\n"

pytestmark = pytest.mark.skipif(syncfs is None, reason="no syncfs(2) here")


def final_names(root):
    """Return the .eml and .env files under the spool's domain folders."""
    found = []
    for directory, _subdirs, files in os.walk(root / "domains"):
        found += [name for name in files if name.endswith((".eml", ".env"))]
    return sorted(found)


async def commit(spool, domain="example.org"):
    writer = spool.new_message()
    await writer.write(BODY)
    return await writer.commit(sender="", recipients={domain: [f"a@{domain}"]})


async def test_batch_costs_two_syncfs_and_no_fsync(tmp_path):
    calls = []

    def counting_syncfs(fd):
        calls.append(fd)
        syncfs(fd)

    async with open_spool(
        tmp_path, sync_mode="filesystem", filesystem_sync=counting_syncfs
    ) as (spool, _):
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(commit, spool)
        stats = spool.stats
        assert stats.jobs == 40
        assert stats.file_fsyncs == 0
        assert stats.dir_fsyncs == 0
        assert stats.filesystem_syncs == 2 * stats.batches
        assert len(calls) == stats.filesystem_syncs
        assert stats.batches < 40
        assert len(final_names(tmp_path)) == 80


async def test_contents_synced_before_names_appear(tmp_path):
    seen = []

    def observing_syncfs(fd):
        seen.append(final_names(tmp_path))
        syncfs(fd)

    async with open_spool(
        tmp_path, sync_mode="filesystem", filesystem_sync=observing_syncfs
    ) as (spool, _):
        (part,) = await commit(spool)
        await spool.remove(part)
    # Commit: contents synced with no final name yet, then the names.
    assert seen[0] == []
    assert seen[1] == [f"{part.mid}.eml", f"{part.mid}.env"]
    # Remove: nothing to write, so its one sync follows the unlinks.
    assert seen[2:] == [[]]


async def test_failed_syncfs_rolls_back_whole_batch(tmp_path):
    failing = True

    def flaky_syncfs(fd):
        if failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        syncfs(fd)

    async with open_spool(
        tmp_path, sync_mode="filesystem", filesystem_sync=flaky_syncfs
    ) as (spool, _):
        errors = []

        async def commit_expecting_failure(domain):
            try:
                await commit(spool, domain)
            except SpoolError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for domain in ("example.org", "example.com", "example.net"):
                nursery.start_soon(commit_expecting_failure, domain)
        assert len(errors) == 3
        assert all("Input/output error" in str(error) for error in errors)
        assert final_names(tmp_path) == []
        assert os.listdir(tmp_path / "tmp") == []

        failing = False
        (part,) = await commit(spool)
        assert final_names(tmp_path) == [f"{part.mid}.eml", f"{part.mid}.env"]


async def test_unknown_mode_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown spool sync mode"):
        async with open_spool(tmp_path, sync_mode="sometimes"):
            pass
