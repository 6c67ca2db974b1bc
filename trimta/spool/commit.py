"""Group commit: batch the durable file work of many sessions into one thread call.

Theory of operation
-------------------
Acknowledging a message with 250 requires that its body, its directory
entries and its envelopes are on stable storage. Done one message at a
time this costs several fsync calls per message (body, envelope per
domain, each directory), and fsync latency, not bandwidth, then caps the
accept rate.

So spool writes are *jobs* handed to one committer task. The committer
takes every job that is waiting, runs them as one batch in one worker
thread, and only then wakes the submitters. A batch runs in four steps:

1. ``write``: each job writes its new files under names that recovery
   ignores or removes (the body in tmp/, ``<mid>.<random>.env.tmp``). A
   job that raises OSError here is rolled back at once and fails alone.
2. The new files' contents are made durable (see the modes below).
3. ``place``: each job links and renames its files to their final names
   (or unlinks, for a removal) and returns the directories it changed.
4. The changed directory entries are made durable, then ``cleanup`` runs
   for every job (for a commit: unlink the temporary body, which needs no
   sync because recovery empties tmp/ anyway).

Contents are durable before any name points at them, so a crash at any
moment leaves each part either complete or absent (or, for an envelope
update, the old envelope). Two modes do steps 2 and 4:

- ``file``: fsync each new file in step 2 and each changed directory once
  in step 4. The cost grows with the batch: two fsyncs per message.
- ``filesystem``: one syncfs(2) of the spool's file system for each of
  steps 2 and 4, whatever the batch size. It also flushes other writers'
  data on that file system, so it suits a spool on a file system of its
  own or a quiet one. It needs Linux.

While a batch runs, new jobs queue in the channel and form the next batch,
so under load the batch size grows with the fsync latency.

A submitter that is cancelled while its job waits or runs does not stop the
job: the committer still completes or rolls it back, so the spool never
contains half a job. The cancelled submitter just does not learn which.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Callable, Iterable, Sequence

import attrs
import trio

from trimta.spool.envelope import PartRef
from trimta.spool.syncfs import SYNC_MODES, syncfs

logger = logging.getLogger("trimta.spool")

FsyncFunction = Callable[[int], None]


@attrs.define(auto_exc=True, str=False)
class SpoolError(Exception):
    """A spool operation failed, so the message is not (or no longer) safe.

    The SMTP driver replies to a failed commit with ``452 4.3.1``.

    Attributes:
        action: the operation that failed ("commit", "save", "remove" ...).
        path: the file or directory involved.
        reason: the error text, usually from the OSError in ``__cause__``.
    """

    action: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"spool {self.action} failed at {self.path}: {self.reason}"


@attrs.define
class CommitStats:
    """Counters of the committer's work, for tests and monitoring.

    Attributes:
        batches: batches run.
        jobs: jobs run, including failed ones.
        file_fsyncs: fsync calls on files.
        dir_fsyncs: fsync calls on directories.
        filesystem_syncs: syncfs calls (``filesystem`` mode).
    """

    batches: int = 0
    jobs: int = 0
    file_fsyncs: int = 0
    dir_fsyncs: int = 0
    filesystem_syncs: int = 0


class Job:
    """A unit of spool file work run inside a batch by the committer thread."""

    action = "write"
    # Whether ``write`` creates files whose contents step 2 must sync.
    writes_files = True

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: SpoolError | None = None

    def write(self, sync: SyncFunctions) -> None:
        """Write this job's new files under temporary names (step 1)."""

    def place(self) -> set[str]:
        """Give the written files their final names; return the directories changed."""
        raise NotImplementedError

    def rollback(self) -> None:
        """Undo what ``write`` and ``place`` created, as far as possible."""

    def cleanup(self) -> None:
        """Release temporary files after the batch, whether it succeeded or not."""

    def succeeded(self) -> None:
        """Run in the Trio thread after the job's directories are synced."""

    def fail(self, path: str, exc: OSError) -> None:
        """Record the error and roll back."""
        reason = exc.strerror or str(exc)
        self.error = SpoolError(self.action, path, reason)
        self.error.__cause__ = exc
        self.rollback()


@attrs.define
class SyncFunctions:
    """The sync calls available to a batch, counted in ``stats``.

    With ``syncfs`` set (the ``filesystem`` mode), files and directories
    are not synced one by one: ``sync_filesystem`` syncs them all at once.
    """

    fsync: FsyncFunction
    stats: CommitStats
    syncfs: FsyncFunction | None = None
    root: str = "."

    @property
    def per_filesystem(self) -> bool:
        return self.syncfs is not None

    def sync_file(self, fd: int) -> None:
        """Fsync an open file descriptor, unless the batch syncs the file system."""
        if self.syncfs is not None:
            return
        self.stats.file_fsyncs += 1
        self.fsync(fd)

    def sync_filesystem(self) -> None:
        """Sync the whole file system that contains the spool root."""
        assert self.syncfs is not None
        self.stats.filesystem_syncs += 1
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.syncfs(fd)
        finally:
            os.close(fd)

    def sync_dir(self, path: str) -> None:
        """Fsync a directory so its entries (links, renames) are durable."""
        self.stats.dir_fsyncs += 1
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.fsync(fd)
        finally:
            os.close(fd)


def write_all(fd: int, chunks: Iterable[bytes]) -> None:
    """Write every chunk to fd, retrying short writes."""
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            written = os.write(fd, view)
            view = view[written:]


def write_synced(path: str, data: bytes, sync: SyncFunctions) -> None:
    """Create path exclusively, write data and fsync it (0o600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        write_all(fd, [data])
        sync.sync_file(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> None:
    """Remove a file during rollback or cleanup, ignoring a missing file."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        # Recovery on the next start removes debris that stays behind here.
        logger.warning("cleanup failed path=%s error=%s", path, exc)


def run_batch(jobs: list[Job], sync: SyncFunctions) -> list[Job]:
    """Run one batch in the current (worker) thread; return the jobs that succeeded."""
    sync.stats.batches += 1
    sync.stats.jobs += len(jobs)
    written = [job for job in jobs if _run_step(job, lambda job: job.write(sync))]
    written = _sync_contents(written, sync)
    placed = []
    for job in written:
        touched: set[str] = set()
        if _run_step(job, lambda job: touched.update(job.place())):
            placed.append((job, touched))
    done = _sync_entries(placed, sync)
    for job in jobs:
        job.cleanup()
    return done


def _run_step(job: Job, step: Callable[[Job], object]) -> bool:
    """Run one step of a job; on failure record the error, roll back, return False."""
    try:
        step(job)
    except SpoolError as exc:
        job.error = exc
        job.rollback()
        return False
    except OSError as exc:
        job.fail(str(exc.filename or "-"), exc)
        return False
    return True


def _sync_contents(jobs: list[Job], sync: SyncFunctions) -> list[Job]:
    """Step 2: make written contents durable; return the jobs still alive."""
    if not sync.per_filesystem or not any(job.writes_files for job in jobs):
        return jobs  # file mode: each file was fsynced as it was written
    try:
        sync.sync_filesystem()
    except OSError as exc:
        for job in jobs:
            job.fail(sync.root, exc)
        return []
    return jobs


def _sync_entries(placed: list[tuple[Job, set[str]]], sync: SyncFunctions) -> list[Job]:
    """Step 4: make the changed directory entries durable; return the jobs done."""
    if sync.per_filesystem:
        try:
            if placed:
                sync.sync_filesystem()
        except OSError as exc:
            for job, _dirs in placed:
                job.fail(sync.root, exc)
            return []
        return [job for job, _dirs in placed]

    # Each directory is fsynced once for the whole batch.
    dir_errors = {}
    for path in sorted(set().union(*(dirs for _job, dirs in placed))):
        try:
            sync.sync_dir(path)
        except OSError as exc:
            dir_errors[path] = exc
    done = []
    for job, dirs in placed:
        failed = sorted(dirs & dir_errors.keys())
        if failed:
            job.fail(failed[0], dir_errors[failed[0]])
        else:
            done.append(job)
    return done


class GroupCommitter:
    """The committer task and the channel that feeds it jobs."""

    def __init__(
        self,
        fsync: FsyncFunction = os.fsync,
        *,
        mode: str = "file",
        root: str = ".",
        filesystem_sync: FsyncFunction | None = None,
    ) -> None:
        """Set up the committer.

        Args:
            fsync: the fsync function of the ``file`` mode.
            mode: "file" or "filesystem" (see the module docstring).
            root: a folder on the spool's file system, for syncfs.
            filesystem_sync: the syncfs function; tests pass a counting one.

        Raises:
            ValueError: an unknown mode, or ``filesystem`` without syncfs.
        """
        if mode not in SYNC_MODES:
            raise ValueError(f"unknown spool sync mode {mode!r}")
        per_filesystem = filesystem_sync or syncfs
        if mode == "filesystem" and per_filesystem is None:
            raise ValueError("this system has no syncfs(2); use the file sync mode")
        self.stats = CommitStats()
        self._sync = SyncFunctions(
            fsync,
            self.stats,
            syncfs=per_filesystem if mode == "filesystem" else None,
            root=root,
        )
        self._send, self._receive = trio.open_memory_channel(math.inf)
        self.running = False

    async def submit(self, job: Job) -> None:
        """Queue a job and wait until its batch is durable.

        Raises:
            SpoolError: the job failed and was rolled back.
            RuntimeError: the committer task is not running.
        """
        self.check_running()
        self._send.send_nowait(job)
        # Cancelling this wait leaves the job queued; see the module docstring.
        await job.done.wait()
        if job.error is not None:
            raise job.error

    def check_running(self) -> None:
        """Raise RuntimeError unless the committer task is running."""
        if not self.running:
            raise RuntimeError(
                "spool committer is not running; start Spool.run_committer "
                "in the daemon nursery before writing to the spool"
            )

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run batches until cancelled; queued jobs then fail with SpoolError."""
        self.running = True
        task_status.started()
        try:
            while True:
                batch = [await self._receive.receive()]
                batch.extend(self._drain())
                # Not cancellable: a batch always finishes or rolls back.
                done = await trio.to_thread.run_sync(run_batch, batch, self._sync)
                for job in done:
                    job.succeeded()
                for job in batch:
                    job.done.set()
        finally:
            self.running = False
            self._fail_queued()

    def _drain(self) -> list[Job]:
        jobs = []
        while True:
            try:
                jobs.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return jobs

    def _fail_queued(self) -> None:
        for job in self._drain():
            job.error = SpoolError(job.action, "-", "spool committer stopped")
            job.cleanup()
            job.done.set()


# Body bytes kept in memory before a worker thread writes them to tmp/.
BODY_BUFFER_LIMIT = 256 * 1024


class BodyFile:
    """A message body being received into tmp/, buffered in memory.

    The file is created only when the buffer first fills, so a small
    message costs no thread hop until its commit batch writes it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = 0
        self._fd: int | None = None
        self._created = False
        self._chunks: list[bytes] = []
        self._buffered = 0

    def add(self, data: bytes) -> bool:
        """Buffer data; return whether the buffer should be flushed."""
        self._chunks.append(bytes(data))
        self._buffered += len(data)
        self.size += len(data)
        return self._buffered >= BODY_BUFFER_LIMIT

    def flush(self) -> None:
        """Write the buffered bytes to the file (blocking)."""
        if self._fd is None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o600)
            self._created = True
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        write_all(self._fd, chunks)

    def finish(self, sync: SyncFunctions) -> None:
        """Write the rest, fsync and close the file (blocking)."""
        self.flush()
        sync.sync_file(self._fd)
        os.close(self._fd)
        self._fd = None

    def discard(self) -> None:
        """Close and remove the temporary file (blocking; idempotent)."""
        self._chunks, self._buffered = [], 0
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._created:
            unlink_quietly(self.path)
            self._created = False


@attrs.define
class Placement:
    """The destination of one domain part of a committed message.

    Attributes:
        directory: the domain directory, ``<spool>/domains/<dirname>``.
        part: the part reference.
        envelope: the serialised envelope of the part.
    """

    directory: str
    part: PartRef
    envelope: bytes


def temporary_envelope_path(directory: str, mid: str) -> str:
    """Return a fresh ``<mid>.<random>.env.tmp`` path in directory."""
    return os.path.join(directory, f"{mid}.{secrets.token_hex(4)}.env.tmp")


class CommitJob(Job):
    """Link a received body into each domain directory and write its envelopes."""

    action = "commit"

    def __init__(
        self,
        body: BodyFile,
        domains_dir: str,
        placements: Sequence[Placement],
        on_committed: Callable[[list[PartRef]], None],
    ) -> None:
        super().__init__()
        self.body = body
        self.domains_dir = domains_dir
        self.placements = list(placements)
        self.on_committed = on_committed
        self._created: list[str] = []
        self._temporaries: list[str] = []
        self._new_directories: set[str] = set()

    def write(self, sync: SyncFunctions) -> None:
        self.body.finish(sync)
        self._temporaries = []
        for placement in self.placements:
            if not os.path.isdir(placement.directory):
                if self._make_directory(placement.directory):
                    self._new_directories.add(placement.directory)
            temporary = temporary_envelope_path(placement.directory, placement.part.mid)
            self._created.append(temporary)
            write_synced(temporary, placement.envelope, sync)
            self._temporaries.append(temporary)

    def place(self) -> set[str]:
        touched = {placement.directory for placement in self.placements}
        if self._new_directories:
            touched.add(self.domains_dir)
        for placement, temporary in zip(self.placements, self._temporaries):
            stem = os.path.join(placement.directory, placement.part.mid)
            # One inode shared by all parts: the body is stored once.
            os.link(self.body.path, stem + ".eml")
            self._created.append(stem + ".eml")
            os.replace(temporary, stem + ".env")
            self._created.append(stem + ".env")
        return touched

    @staticmethod
    def _make_directory(path: str) -> bool:
        """Create a domain directory; return False if it already existed."""
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return False
        return True

    def rollback(self) -> None:
        # Reversed, so each .env goes before its .eml, as in a normal remove.
        for path in reversed(self._created):
            unlink_quietly(path)
        self._created = []
        self.body.discard()

    def cleanup(self) -> None:
        self.body.discard()

    def succeeded(self) -> None:
        self.on_committed([placement.part for placement in self.placements])


class SaveJob(Job):
    """Replace the envelope of an existing part atomically."""

    action = "save"

    def __init__(self, directory: str, mid: str, envelope: bytes) -> None:
        super().__init__()
        self.directory = directory
        self.mid = mid
        self.envelope = envelope
        self._temporary = temporary_envelope_path(directory, mid)

    def write(self, sync: SyncFunctions) -> None:
        stem = os.path.join(self.directory, self.mid)
        if not os.path.exists(stem + ".eml"):
            # Writing the envelope now would leave an .env without a body.
            raise SpoolError(self.action, stem + ".eml", "part no longer exists")
        write_synced(self._temporary, self.envelope, sync)

    def place(self) -> set[str]:
        os.replace(self._temporary, os.path.join(self.directory, self.mid) + ".env")
        return {self.directory}

    def rollback(self) -> None:
        unlink_quietly(self._temporary)


class RemoveJob(Job):
    """Remove a part: the envelope first, then the body link."""

    action = "remove"
    writes_files = False

    def __init__(self, directory: str, mid: str) -> None:
        super().__init__()
        self.directory = directory
        self.mid = mid

    def place(self) -> set[str]:
        stem = os.path.join(self.directory, self.mid)
        # A crash between the two unlinks leaves an .eml without .env, which
        # recovery deletes as debris.
        for suffix in (".env", ".eml"):
            try:
                os.unlink(stem + suffix)
            except FileNotFoundError:
                pass
        return {self.directory}
