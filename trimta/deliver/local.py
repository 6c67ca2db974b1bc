"""Local delivery: copy spooled messages into Maildir mailboxes.

Mailboxes live at ``<maildir_root>/<domain>/<mailbox_name>/`` with the
usual ``tmp``, ``new`` and ``cur`` subdirectories. A message is written to
``tmp/<unique>``, fsynced, linked into ``new/``, and then ``new/`` is
fsynced, following the Maildir description by D. J. Bernstein
(https://cr.yp.to/proto/maildir.html).

Crash behaviour: each recipient is marked delivered in the spool right
after its Maildir file is durable. A crash between those two steps makes
the next attempt deliver that one recipient again; nothing is lost.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import trio

from trimta.deliver.mailbox import mailbox_name
from trimta.deliver.outcome import RecipientOutcome, Verdict
from trimta.spool import names
from trimta.spool.envelope import Envelope, EnvelopeError, PartRef, Recipient
from trimta.spool.store import Spool, SpoolError

logger = logging.getLogger("trimta.deliver")

_COPY_BLOCK = 64 * 1024
_counter = itertools.count()


@attrs.define
class LocalDeliverySettings:
    """Settings of the local delivery task.

    Attributes:
        maildir_root: the directory that contains one directory per domain.
        resolve_mailbox: maps (local part, domain) to a mailbox (before
            encoding with ``mailbox_name``), or None if there is none.
        retry_delay: the first retry delay after a failed attempt, seconds;
            it doubles with each attempt.
        max_retry_delay: the maximum retry delay, in seconds.
        max_concurrent: parts delivered at the same time.
        fsync: the fsync function; tests pass a counting or failing one.
        bounce: queues a DSN for recipients that failed for good; None
            only logs them.
    """

    maildir_root: Path
    resolve_mailbox: Callable[[str, str], str | None]
    retry_delay: float = 60.0
    max_retry_delay: float = 3600.0
    max_concurrent: int = 4
    fsync: Callable[[int], None] = os.fsync
    bounce: Callable[[Envelope, list[RecipientOutcome]], Awaitable[None]] | None = None


class MailboxPathError(ValueError):
    """A mailbox path that would leave the Maildir root."""


def unique_name() -> str:
    """Return a Maildir file name: ``<time>.M<usec>P<pid>Q<counter>.<host>``."""
    now = time.time_ns() // 1000
    seconds, micros = divmod(now, 1_000_000)
    return f"{seconds}.M{micros}P{os.getpid()}Q{next(_counter)}.{_safe_hostname()}"


def _safe_hostname() -> str:
    # The Maildir description writes "/" and ":" in host names as octal
    # escapes (\057, \072). This code escapes other unusual characters too.
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
    host = socket.gethostname() or "localhost"
    return "".join(c if c in allowed else f"\\{ord(c):03o}" for c in host)


def trace_headers(sender: str, recipient: str, line_ending: bytes) -> bytes:
    """Build the Return-Path and Delivered-To header lines.

    Raises:
        ValueError: an address contains CR, LF or NUL (header injection).
    """
    for value in (sender, recipient):
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"address {value!r} contains CR, LF or NUL")
    lines = [f"Return-Path: <{sender}>", f"Delivered-To: {recipient}"]
    return b"".join(line.encode("utf-8") + line_ending for line in lines)


def deliver_to_maildir(
    root: Path,
    domain: str,
    mailbox: str,
    body_path: Path,
    sender: str,
    recipient: str,
    fsync: Callable[[int], None] = os.fsync,
) -> Path:
    """Write one message into a Maildir ``new/`` directory (blocking).

    Args:
        mailbox: an encoded mailbox name (see ``mailbox_name``).

    Returns:
        The path of the delivered file.

    Raises:
        MailboxPathError: the mailbox would resolve outside ``root``.
        ValueError: the domain or an address is invalid.
        OSError: a file operation failed; nothing is left in ``new/``.
    """
    directory = _prepare_mailbox(root, domain, mailbox, fsync)
    name = unique_name()
    temporary = directory / "tmp" / name
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o600)
    try:
        _write_message(fd, body_path, sender, recipient, fsync)
        os.link(temporary, directory / "new" / name)
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    os.close(fd)
    os.unlink(temporary)
    _sync_dir(directory / "new", fsync)
    return directory / "new" / name


def _write_message(
    fd: int, body_path: Path, sender: str, recipient: str, fsync: Callable[[int], None]
) -> None:
    with open(body_path, "rb") as body:
        block = body.read(_COPY_BLOCK)
        # Match the body's line ending so the file stays consistent.
        first_line = block.split(b"\n", 1)[0]
        line_ending = b"\r\n" if first_line.endswith(b"\r") else b"\n"
        _write_all(fd, trace_headers(sender, recipient, line_ending))
        while block:
            _write_all(fd, block)
            block = body.read(_COPY_BLOCK)
    fsync(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _prepare_mailbox(
    root: Path, domain: str, mailbox: str, fsync: Callable[[int], None]
) -> Path:
    domain_dir = root / names.dirname_for_domain(domain)
    directory = domain_dir / mailbox
    _check_inside(root, domain_dir, directory)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _make_dir(domain_dir, fsync)
    _make_dir(directory, fsync)
    created = [_make_dir(directory / sub, None) for sub in ("tmp", "new", "cur")]
    if any(created):
        _sync_dir(directory, fsync)
    # Check again now that the directories exist and symlinks can resolve.
    _check_inside(root, domain_dir, directory)
    return directory


def _check_inside(root: Path, domain_dir: Path, directory: Path) -> None:
    resolved_root = root.resolve()
    resolved = directory.resolve()
    parent_ok = resolved.parent == domain_dir.resolve()
    if not parent_ok or domain_dir.resolve().parent != resolved_root:
        raise MailboxPathError(
            f"mailbox path {directory} resolves to {resolved}, outside "
            f"{resolved_root}/<domain>/; check for symlinks in the Maildir root"
        )


def _make_dir(path: Path, fsync: Callable[[int], None] | None) -> bool:
    """Create path (0o700) if missing and return whether it was created.

    When fsync is given, the parent is fsynced after a creation.
    """
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return False
    if fsync is not None:
        _sync_dir(path.parent, fsync)
    return True


def _sync_dir(path: Path, fsync: Callable[[int], None]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def split_address(address: str) -> tuple:
    """Split an address at its last "@" into (local part, domain)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


class LocalDelivery:
    """Deliver parts of local domains, retrying failed recipients later."""

    def __init__(self, spool: Spool, settings: LocalDeliverySettings) -> None:
        self.spool = spool
        self.settings = settings
        self._limiter = trio.CapacityLimiter(settings.max_concurrent)
        self._in_flight: set[PartRef] = set()

    def schedule(self, nursery: trio.Nursery, part: PartRef, delay: float) -> None:
        """Start delivering part after delay seconds, unless it is already queued."""
        if part in self._in_flight:
            return
        self._in_flight.add(part)
        nursery.start_soon(self._run_part, nursery, part, delay)

    async def _run_part(
        self, nursery: trio.Nursery, part: PartRef, delay: float
    ) -> None:
        try:
            await trio.sleep(delay)
            async with self._limiter:
                retry = await self._attempt(part)
        finally:
            self._in_flight.discard(part)
        if retry is not None:
            self.schedule(nursery, part, retry)

    async def _attempt(self, part: PartRef) -> float | None:
        try:
            return await self.deliver_part(part)
        except SpoolError as exc:
            logger.error(
                "spool error mid=%s domain=%s error=%s", part.mid, part.domain, exc
            )
            return self.settings.retry_delay
        except EnvelopeError as exc:
            # A broken envelope will not parse on retry either; an operator
            # must look at it. Recovery moves it to corrupt/ on restart.
            logger.error(
                "unreadable envelope mid=%s domain=%s error=%s",
                part.mid,
                part.domain,
                exc,
            )
            return None

    async def deliver_part(self, part: PartRef) -> float | None:
        """Deliver every pending recipient of part once.

        Returns:
            None when the part is finished and removed, else the delay in
            seconds before the next attempt.
        """
        envelope = await self.spool.load(part)
        if envelope.held:
            logger.info("skipped held mid=%s domain=%s", part.mid, part.domain)
            return None
        body = self.spool.body_path(part)
        failed = []
        for recipient in envelope.recipients:
            if recipient.state == "pending":
                # A Maildir copy that is written must also be recorded, or a
                # stop in between would deliver it again after the restart.
                with trio.CancelScope(shield=True):
                    await self._deliver_recipient(envelope, recipient, body)
                    await self.spool.save(envelope)
                if recipient.state == "failed":
                    failed.append(_failure_outcome(recipient))
        if failed and self.settings.bounce is not None:
            # Queued before the part goes: a crash in between sends the DSN
            # twice rather than never.
            await self.settings.bounce(envelope, failed)
        if envelope.is_done():
            await self.spool.remove(part)
            return None
        return await self._defer(envelope)

    async def _defer(self, envelope: Envelope) -> float:
        envelope.attempts += 1
        delay = min(
            self.settings.retry_delay * 2 ** (envelope.attempts - 1),
            self.settings.max_retry_delay,
        )
        envelope.next_attempt = time.time() + delay
        await self.spool.save(envelope)
        logger.info(
            "deferred mid=%s domain=%s attempts=%d retry-in=%.0f",
            envelope.id,
            envelope.domain,
            envelope.attempts,
            delay,
        )
        return delay

    async def _deliver_recipient(
        self, envelope: Envelope, recipient: Recipient, body: Path
    ) -> None:
        local, _domain = split_address(recipient.address)
        try:
            mailbox = self.settings.resolve_mailbox(local, envelope.domain)
            if mailbox is None:
                raise LookupError(f"5.1.1 no mailbox for {recipient.address}")
            name = mailbox_name(mailbox)
            await trio.to_thread.run_sync(
                deliver_to_maildir,
                self.settings.maildir_root,
                envelope.domain,
                name,
                body,
                envelope.sender,
                recipient.address,
                self.settings.fsync,
            )
        except OSError as exc:
            self._mark(
                envelope, recipient, "pending", f"4.3.0 Maildir write failed: {exc}"
            )
        except (LookupError, ValueError) as exc:
            self._mark(envelope, recipient, "failed", str(exc))
        else:
            self._mark(envelope, recipient, "delivered", None)
            logger.info(
                "delivered mid=%s domain=%s rcpt=%s mailbox=%s",
                envelope.id,
                envelope.domain,
                recipient.address,
                name,
            )

    def _mark(
        self, envelope: Envelope, recipient: Recipient, state: str, error: str | None
    ) -> None:
        recipient.state = state
        recipient.last_error = error
        if error is None:
            return
        event = "failed" if state == "failed" else "delivery-error"
        logger.warning(
            "%s mid=%s domain=%s rcpt=%s error=%s",
            event,
            envelope.id,
            envelope.domain,
            recipient.address,
            error,
        )


async def run_local_delivery(
    spool: Spool,
    settings: LocalDeliverySettings,
    parts_channel: trio.MemoryReceiveChannel,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Deliver each PartRef received on parts_channel into Maildir.

    Runs until the channel closes and every scheduled attempt (including
    retries) has finished, or until cancelled. A part's first attempt waits
    until its envelope's ``next_attempt``.
    """
    delivery = LocalDelivery(spool, settings)
    async with trio.open_nursery() as nursery:
        task_status.started()
        async for part in parts_channel:
            nursery.start_soon(_schedule_when_due, delivery, nursery, part)


async def _schedule_when_due(
    delivery: LocalDelivery, nursery: trio.Nursery, part: PartRef
) -> None:
    try:
        envelope = await delivery.spool.load(part)
    except (SpoolError, EnvelopeError) as exc:
        logger.error(
            "cannot load part mid=%s domain=%s error=%s", part.mid, part.domain, exc
        )
        return
    delivery.schedule(nursery, part, max(0.0, envelope.next_attempt - time.time()))


def _failure_outcome(recipient: Recipient) -> RecipientOutcome:
    """Describe a recipient that failed for good, for its DSN."""
    text = recipient.last_error or "5.0.0 local delivery failed"
    status = text.split(" ", 1)[0]
    if not status[:1].isdigit():
        status = "5.0.0"
    return RecipientOutcome(recipient.address, Verdict.FAILED, status, text)
