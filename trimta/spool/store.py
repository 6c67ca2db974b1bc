"""The durable per-domain spool: receive, commit, recover, read and remove parts.

The on-disk layout and the crash guarantees are documented in
docs/spool-format.md. All durable writes go through the group committer in
``trimta.spool.commit``; this module builds the jobs, reads files and runs
recovery.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import trio

from trimta.spool import names
from trimta.spool.commit import (
    BodyFile,
    CommitJob,
    CommitStats,
    FsyncFunction,
    GroupCommitter,
    Placement,
    RemoveJob,
    SaveJob,
    SpoolError,
)
from trimta.spool.envelope import (
    ClientInfo,
    Envelope,
    EnvelopeError,
    PartRef,
    Recipient,
    dump_envelope,
    parse_envelope,
)

logger = logging.getLogger("trimta.spool")

__all__ = ["MessageWriter", "Spool", "SpoolError", "open_spool"]

# New parts whose envelopes are kept for their first load (about 1 KiB each).
FRESH_ENVELOPES = 2000


class MessageWriter:
    """A message body being received; created by ``Spool.new_message``.

    Call ``write`` for each block of the (unstuffed) body, then either
    ``commit`` or ``abort``. A writer is not safe for concurrent use.
    """

    def __init__(self, spool: Spool, mid: str) -> None:
        self.mid = mid
        self.arrival = time.time()
        self._spool = spool
        self._body = BodyFile(os.path.join(spool.tmp_dir, mid + ".eml"))
        self._open = True

    @property
    def size(self) -> int:
        """Octets written so far."""
        return self._body.size

    async def write(self, data: bytes) -> None:
        """Append data to the body; a worker thread writes each full buffer.

        Raises:
            SpoolError: writing the temporary file failed (e.g. ENOSPC).
        """
        self._check_open()
        if not self._body.add(data):
            return
        try:
            await trio.to_thread.run_sync(self._body.flush)
        except OSError as exc:
            raise SpoolError(
                "write", self._body.path, exc.strerror or str(exc)
            ) from exc

    async def commit(
        self,
        *,
        sender: str,
        recipients: Mapping[str, Sequence[Recipient | str]],
        params: Mapping[str, str | None] | None = None,
        client: ClientInfo | None = None,
    ) -> list[PartRef]:
        """Make the message durable in every recipient domain.

        When this returns, the body, each domain's envelope and their
        directory entries are fsynced, so the caller may reply 250.

        Args:
            sender: the MAIL FROM address, "" for the null reverse-path.
            recipients: recipients keyed by normalised domain; each is a
                Recipient or a bare address.
            params: MAIL FROM ESMTP parameters (upper-case keys).
            client: the submitting client.

        Returns:
            One PartRef per domain, in the order of ``recipients``.

        Raises:
            ValueError: a domain is invalid or has no recipients (the body
                stays; call ``abort``).
            SpoolError: the commit failed and left no files behind.
            RuntimeError: the committer task is not running.

        If the caller is cancelled while waiting, the committer still
        finishes the job, so the message may be queued without a 250.
        """
        self._check_open()
        envelopes = self._envelopes(sender, recipients, params or {}, client)
        placements = [
            Placement(
                os.path.dirname(self._spool._stem(envelope.part)),
                envelope.part,
                dump_envelope(envelope),
            )
            for envelope in envelopes
        ]
        self._spool._committer.check_running()
        job = CommitJob(
            self._body,
            self._spool.domains_dir,
            placements,
            lambda _parts: self._spool._committed(envelopes),
        )
        self._open = False  # the committer owns the body file from here
        await self._spool._committer.submit(job)
        return [placement.part for placement in placements]

    async def abort(self) -> None:
        """Discard the body; does nothing after ``commit`` was called."""
        if not self._open:
            return
        self._open = False
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._body.discard)

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError(f"message {self.mid} is already committed or aborted")

    def _envelopes(
        self,
        sender: str,
        recipients: Mapping[str, Sequence[Recipient | str]],
        params: Mapping[str, str | None],
        client: ClientInfo | None,
    ) -> list[Envelope]:
        if not recipients:
            raise ValueError(f"message {self.mid} has no recipients")
        envelopes = []
        for domain, rcpts in recipients.items():
            names.dirname_for_domain(domain)  # raises ValueError for a bad domain
            if not rcpts:
                raise ValueError(
                    f"message {self.mid}: domain {domain} has no recipients"
                )
            envelope = Envelope(
                id=self.mid,
                domain=domain,
                sender=sender,
                recipients=[_as_recipient(r) for r in rcpts],
                arrival=self.arrival,
                size=self._body.size,
                params=dict(params),
                client=client or ClientInfo(),
                next_attempt=self.arrival,
            )
            envelopes.append(envelope)
        return envelopes


def _as_recipient(recipient: Recipient | str) -> Recipient:
    if isinstance(recipient, Recipient):
        return recipient
    return Recipient(address=recipient)


class Spool:
    """A spool directory: per-domain envelopes sharing hard-linked bodies.

    Call ``await open()`` once, start ``run_committer`` in the daemon
    nursery, and then use the other methods. ``open_spool`` does all three.

    Args:
        root: the spool directory; created (0o700) if missing.
        fsync: the fsync function; tests pass a counting or failing one.
        sync_mode: "file" (an fsync per file and directory) or "filesystem"
            (one syncfs per batch step); see ``trimta.spool.commit``.
        filesystem_sync: the syncfs function; tests pass a counting one.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        fsync: FsyncFunction = os.fsync,
        sync_mode: str = "file",
        filesystem_sync: FsyncFunction | None = None,
    ) -> None:
        self.root = Path(root)
        self.tmp_dir = str(self.root / "tmp")
        self.domains_dir = str(self.root / "domains")
        self.corrupt_dir = str(self.root / "corrupt")
        self._committer = GroupCommitter(
            fsync, mode=sync_mode, root=str(self.root), filesystem_sync=filesystem_sync
        )
        self._subscribers: list[trio.MemorySendChannel] = []
        self._locks: dict[str, trio.Lock] = {}
        self._opened = False
        # Envelopes of parts just committed, so that the first load of a
        # new part needs no file read; bounded, oldest dropped first.
        self._fresh: collections.OrderedDict[PartRef, Envelope] = (
            collections.OrderedDict()
        )

    @property
    def stats(self) -> CommitStats:
        """The committer's counters (batches, jobs, fsyncs)."""
        return self._committer.stats

    async def open(self) -> list[PartRef]:
        """Create the directories, run recovery and return the complete parts.

        Recovery removes debris of interrupted writes and moves unparsable
        envelopes to ``corrupt/``; see docs/spool-format.md.

        Returns:
            Every complete part, sorted by message id.
        """
        parts = await trio.to_thread.run_sync(recover_spool, self.root)
        self._opened = True
        return parts

    async def run_committer(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the group committer until cancelled; start it in the daemon nursery."""
        try:
            await self._committer.run(task_status=task_status)
        finally:
            for channel in self._subscribers:
                channel.close()
            self._subscribers = []

    def new_message(self) -> MessageWriter:
        """Allocate a message id and a writer for its body."""
        if not self._opened:
            raise RuntimeError("call 'await spool.open()' before writing messages")
        return MessageWriter(self, names.new_mid())

    def subscribe(self) -> trio.MemoryReceiveChannel:
        """Return a channel that receives a PartRef for each newly committed part.

        Parts arrive right after their batch is durable, in commit order.
        The channel is unbounded, so the subscriber must keep reading; it
        closes when the committer stops. Parts found by ``open`` are not sent.
        """
        send, receive = trio.open_memory_channel(math.inf)
        self._subscribers.append(send)
        return receive

    def _committed(self, envelopes: list[Envelope]) -> None:
        """Keep the new parts' envelopes for their first load, then publish them."""
        for envelope in envelopes:
            self._fresh[envelope.part] = envelope
        while len(self._fresh) > FRESH_ENVELOPES:
            self._fresh.popitem(last=False)
        self._publish([envelope.part for envelope in envelopes])

    def _publish(self, parts: list[PartRef]) -> None:
        for channel in list(self._subscribers):
            try:
                for part in parts:
                    channel.send_nowait(part)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(channel)

    def list_domains(self) -> list[str]:
        """Return the domains that have a spool directory, sorted."""
        entries = os.listdir(self.domains_dir)
        return sorted(name for name in entries if names.is_domain_dirname(name))

    def list_parts(self, domain: str) -> list[PartRef]:
        """Return the parts of a domain whose envelope exists, sorted by mid."""
        directory = os.path.join(self.domains_dir, names.dirname_for_domain(domain))
        try:
            entries = os.listdir(directory)
        except FileNotFoundError:
            return []
        mids = (name[: -len(".env")] for name in entries if name.endswith(".env"))
        return sorted(PartRef(mid, domain) for mid in mids if names.is_mid(mid))

    async def load_domain(self, domain: str) -> list[Envelope]:
        """Read the envelope of every part of a domain in one worker thread.

        One thread call for the whole domain, not one per part, so that a
        scan of thousands of parts costs little more than the parsing. It
        takes no lock, so a part removed during the scan is left out. An
        envelope that does not parse is logged and left out, and recovery
        moves it to ``corrupt/`` at the next start.

        Returns:
            The envelopes that could be read, sorted by message id.
        """
        return await trio.to_thread.run_sync(self._read_domain, domain)

    def _read_domain(self, domain: str) -> list[Envelope]:
        envelopes = []
        for part in self.list_parts(domain):
            path = self._stem(part) + ".env"
            try:
                with open(path, "rb") as file:
                    envelope = parse_envelope(file.read())
                if envelope.part != part:
                    raise EnvelopeError(f"envelope describes {envelope.part}")
            except FileNotFoundError:
                continue  # delivered or bounced since the listing
            except (OSError, EnvelopeError) as exc:
                logger.error(
                    "cannot read envelope mid=%s domain=%s error=%s",
                    part.mid, part.domain, exc,
                )
                continue
            envelopes.append(envelope)
        return envelopes

    def body_path(self, part: PartRef) -> Path:
        """Return the path of a part's body (shared by all parts of the message)."""
        return Path(self._stem(part) + ".eml")

    async def load(self, part: PartRef, *, peek: bool = False) -> Envelope:
        """Read a part's envelope.

        Args:
            part: the part.
            peek: the caller only reads the envelope and never changes it,
                so a kept envelope of a new part stays kept for the next load.

        Raises:
            SpoolError: the envelope file cannot be read (e.g. removed).
            EnvelopeError: the file does not parse or names another part.
        """
        fresh = self._fresh.get(part) if peek else self._fresh.pop(part, None)
        if fresh is not None:
            return fresh
        path = self._stem(part) + ".env"
        try:
            content = await trio.to_thread.run_sync(Path(path).read_bytes)
        except OSError as exc:
            raise SpoolError("load", path, exc.strerror or str(exc)) from exc
        envelope = parse_envelope(content)
        if envelope.part != part:
            raise EnvelopeError(
                f"envelope {path} describes {envelope.part}, not {part}"
            )
        return envelope

    async def save(self, envelope: Envelope) -> None:
        """Replace a part's envelope atomically and durably (via the committer).

        Raises:
            SpoolError: the write failed or the part no longer exists.
        """
        self._fresh.pop(envelope.part, None)
        directory = os.path.dirname(self._stem(envelope.part))
        job = SaveJob(directory, envelope.id, dump_envelope(envelope))
        await self._committer.submit(job)

    async def remove(self, part: PartRef) -> None:
        """Remove a part durably: envelope first, then its body link."""
        self._fresh.pop(part, None)
        directory = os.path.dirname(self._stem(part))
        await self._committer.submit(RemoveJob(directory, part.mid))

    def lock(self, domain: str) -> trio.Lock:
        """Return the per-domain lock (an async context manager) of this process."""
        names.dirname_for_domain(domain)
        return self._locks.setdefault(domain, trio.Lock())

    def _stem(self, part: PartRef) -> str:
        # PartRef validates mid and domain, so this path stays in the spool.
        dirname = names.dirname_for_domain(part.domain)
        return os.path.join(self.domains_dir, dirname, names.check_mid(part.mid))


def recover_spool(root: Path) -> list[PartRef]:
    """Create the spool directories and clean up after a crash (blocking).

    Returns:
        Every complete part (``.eml`` and a parsable ``.env``), sorted.
    """
    for directory in (root, root / "tmp", root / "domains", root / "corrupt"):
        directory.mkdir(mode=0o700, exist_ok=True)
    _empty_directory(root / "tmp")
    parts: list[PartRef] = []
    with os.scandir(root / "domains") as entries:
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                logger.warning("recovery skipped non-directory path=%s", entry.path)
            elif not names.is_domain_dirname(entry.name):
                logger.warning("recovery skipped unknown directory path=%s", entry.path)
            else:
                parts.extend(_recover_domain(root, entry.name))

    # Sort by (mid, domain), the order PartRef defines, as plain tuples.
    # PartRef's generated __lt__ took a tenth of recovery time.
    parts.sort(key=lambda part: (part.mid, part.domain))
    logger.info("recovered root=%s parts=%d", root, len(parts))
    return parts


def _empty_directory(directory: Path) -> None:
    # tmp/ only contains bodies of unacknowledged messages.
    for path in directory.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        logger.info("recovery removed path=%s reason=unfinished-body", path)


def _recover_domain(root: Path, dirname: str) -> list[PartRef]:
    # Plain strings and os.scandir, not Path objects, because recovery
    # runs before trimta listens and visits every file of the spool.
    directory = os.path.join(root, "domains", dirname)
    bodies, envelopes = set(), set()
    with os.scandir(directory) as entries:
        for entry in entries:
            stem, _, suffix = entry.name.partition(".")
            if entry.name.endswith(".env.tmp"):
                _remove_debris(entry.path, "unfinished-envelope")
            elif names.is_mid(stem) and suffix in ("eml", "env"):
                (bodies if suffix == "eml" else envelopes).add(stem)
            else:
                logger.warning("recovery skipped unknown file path=%s", entry.path)

    # Either half alone belongs to a part that was never acknowledged or
    # was being removed, so it is debris.
    for mid in bodies - envelopes:
        _remove_debris(os.path.join(directory, mid + ".eml"), "body-without-envelope")
    for mid in envelopes - bodies:
        _remove_debris(os.path.join(directory, mid + ".env"), "envelope-without-body")
    parts = []
    for mid in bodies & envelopes:
        if _check_envelope(root, directory, mid, dirname):
            parts.append(PartRef(mid, dirname))
    return parts


def _remove_debris(path: str, reason: str) -> None:
    os.unlink(path)
    logger.info("recovery removed path=%s reason=%s", path, reason)


def _check_envelope(root: Path, directory: str, mid: str, dirname: str) -> bool:
    with open(os.path.join(directory, mid + ".env"), "rb") as file:
        content = file.read()
    try:
        envelope = parse_envelope(content)
        if envelope.id != mid or envelope.domain != dirname:
            raise EnvelopeError(f"envelope describes {envelope.part}")
    except EnvelopeError as exc:
        _quarantine(root, Path(directory), PartRef(mid, dirname), exc)
        return False
    return True


def _quarantine(root: Path, directory: Path, part: PartRef, error: Exception) -> None:
    target = root / "corrupt" / part.domain
    target.mkdir(mode=0o700, exist_ok=True)
    for suffix in (".env", ".eml"):
        os.replace(directory / (part.mid + suffix), target / (part.mid + suffix))
    logger.warning(
        "corrupt envelope mid=%s domain=%s moved-to=%s error=%s",
        part.mid,
        part.domain,
        target,
        error,
    )


@contextlib.asynccontextmanager
async def open_spool(
    root: str | Path,
    *,
    fsync: FsyncFunction = os.fsync,
    sync_mode: str = "file",
    filesystem_sync: FsyncFunction | None = None,
) -> AsyncIterator[tuple[Spool, list[PartRef]]]:
    """Open a spool with its committer running in a private nursery.

    Yields:
        The spool and the complete parts found by recovery.
    """
    spool = Spool(
        root, fsync=fsync, sync_mode=sync_mode, filesystem_sync=filesystem_sync
    )
    parts = await spool.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(spool.run_committer)
        yield spool, parts
        nursery.cancel_scope.cancel()
