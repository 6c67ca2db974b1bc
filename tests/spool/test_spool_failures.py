"""Spool behaviour on write errors: full disks and failing fsync."""

import errno
import os
import subprocess

import pytest
import trio

from trimta.spool.store import SpoolError, open_spool

BODY = b"Subject: x\r\n\r\nbody\r\n"


def spool_files(root):
    """Return every file below root, relative, sorted."""
    found = []
    for directory, _subdirs, files in os.walk(root):
        found += [os.path.relpath(os.path.join(directory, f), root) for f in files]
    return sorted(found)


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a 512 KiB tmpfs, or skip when mounting is not permitted."""
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    result = subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "size=512k,mode=0700",
            "tmpfs",
            str(mount_point),
        ],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


async def test_full_disk_write_raises_spool_error(small_tmpfs):
    async with open_spool(small_tmpfs / "spool") as (spool, _):
        writer = spool.new_message()
        with pytest.raises(SpoolError) as caught:
            for _ in range(8):
                await writer.write(b"x" * (128 * 1024))
        assert caught.value.__cause__.errno == errno.ENOSPC
        await writer.abort()
        assert spool_files(small_tmpfs / "spool") == []


async def test_full_disk_commit_leaves_nothing(small_tmpfs):
    async with open_spool(small_tmpfs / "spool") as (spool, _):
        # Leave less free space than the body needs, so the commit batch fails.
        filler = small_tmpfs / "filler"
        filler.write_bytes(b"f" * (400 * 1024))
        writer = spool.new_message()
        await writer.write(b"y" * (200 * 1024))
        with pytest.raises(SpoolError) as caught:
            await writer.commit(
                sender="", recipients={"example.org": ["a@example.org"]}
            )
        assert caught.value.action == "commit"
        assert "No space left" in str(caught.value)
        await writer.abort()
        assert spool_files(small_tmpfs / "spool") == []
        filler.unlink()
        # The spool works again once space is free.
        writer = spool.new_message()
        await writer.write(BODY)
        (part,) = await writer.commit(
            sender="", recipients={"example.org": ["a@example.org"]}
        )
        assert spool.body_path(part).read_bytes() == BODY


def failing_directory_fsync(fd):
    """Fsync files normally but fail with EIO on directories."""
    if os.path.isdir(f"/proc/self/fd/{fd}"):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    os.fsync(fd)


async def test_failed_directory_fsync_fails_batch(tmp_path):
    async with open_spool(tmp_path, fsync=failing_directory_fsync) as (spool, _):
        errors = []

        async def commit_one():
            writer = spool.new_message()
            await writer.write(BODY)
            try:
                await writer.commit(
                    sender="",
                    recipients={
                        "example.org": ["a@example.org"],
                        "example.com": ["b@example.com"],
                    },
                )
            except SpoolError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(commit_one)
        assert len(errors) == 5
        assert all(e.action == "commit" for e in errors)
        assert spool_files(tmp_path) == []


async def test_failed_file_fsync_fails_commit(tmp_path):
    def failing_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    async with open_spool(tmp_path, fsync=failing_fsync) as (spool, _):
        writer = spool.new_message()
        await writer.write(BODY)
        with pytest.raises(SpoolError, match="Input/output error"):
            await writer.commit(
                sender="", recipients={"example.org": ["a@example.org"]}
            )
        assert spool_files(tmp_path) == []
