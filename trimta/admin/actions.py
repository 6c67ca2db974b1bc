"""Queue changes the running daemon makes for `trimta queue` requests."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs

from trimta.deliver.outcome import RecipientOutcome, Verdict
from trimta.deliver.queue import QueueManager
from trimta.spool import names
from trimta.spool.envelope import Envelope, EnvelopeError, PartRef
from trimta.spool.store import Spool, SpoolError

logger = logging.getLogger("trimta.admin")

DELETED_STATUS = "5.0.0"


@attrs.define
class QueueActions:
    """Queue changes requested over the control socket.

    Attributes:
        spool: The daemon's spool.
        queue: The queue manager, for flushes.
        local_domains: Domains delivered into Maildirs.
        held_domains: Domains held for ETRN; a released message of such a
            domain waits for the domain's release.
        start_release: Starts the release of held domains; returns how many
            parts it will try (the ETRN path, so one release per domain).
        route: Hands a released local part back to Maildir delivery.
        bounce: Queues a DSN for deleted messages.
    """

    spool: Spool
    queue: QueueManager
    local_domains: frozenset[str]
    held_domains: frozenset[str]
    start_release: Callable[[list[str]], int]
    route: Callable[[PartRef], Awaitable[None]]
    bounce: Callable[[Envelope, list[RecipientOutcome]], Awaitable[None]]

    async def handle(self, request: dict) -> dict:
        """Run one request and return its response."""
        handlers = {
            "flush": self.flush,
            "hold": self.hold,
            "release": self.release,
            "delete": self.delete,
        }
        command = request.get("command")
        if command not in handlers:
            return {"ok": False, "error": f"unknown command {command!r}"}
        try:
            return await handlers[command](request)
        except (ValueError, SpoolError, EnvelopeError) as exc:
            return {"ok": False, "error": str(exc)}

    async def flush(self, request: dict) -> dict:
        domain = request.get("domain")
        if domain is not None:
            names.dirname_for_domain(domain)
        if domain in self.held_domains:
            count = self.start_release([domain])
        else:
            count = self.queue.flush(domain)
        logger.info("flush domain=%s parts=%d", domain or "*", count)
        return {"ok": True, "parts": count}

    async def hold(self, request: dict) -> dict:
        parts = await self._set_held(request, True)
        return {"ok": True, "parts": len(parts)}

    async def release(self, request: dict) -> dict:
        parts = await self._set_held(request, False)
        for part in parts:
            if part.domain in self.local_domains:
                await self.route(part)
            elif part.domain not in self.held_domains:
                self.queue.deliver_now(part)
        return {"ok": True, "parts": len(parts)}

    async def delete(self, request: dict) -> dict:
        silent = bool(request.get("silent"))
        parts = self._parts_of(request)
        for part in parts:
            envelope = await self.spool.load(part)
            pending = [r for r in envelope.recipients if r.state == "pending"]
            if pending and not silent:
                text = f"{DELETED_STATUS} message deleted from the queue by the administrator"
                failed = [
                    RecipientOutcome(r.address, Verdict.FAILED, DELETED_STATUS, text)
                    for r in pending
                ]
                await self.bounce(envelope, failed)
            await self.spool.remove(part)
            logger.info("deleted mid=%s domain=%s silent=%s", part.mid, part.domain, silent)
        return {"ok": True, "parts": len(parts)}

    async def _set_held(self, request: dict, held: bool) -> list[PartRef]:
        parts = self._parts_of(request)
        for part in parts:
            envelope = await self.spool.load(part)
            envelope.held = held
            await self.spool.save(envelope)
            logger.info("%s mid=%s domain=%s", "held" if held else "released", part.mid, part.domain)
        return parts

    def _parts_of(self, request: dict) -> list[PartRef]:
        mid = names.check_mid(str(request.get("id", "")))
        parts = [
            part
            for domain in self.spool.list_domains()
            for part in self.spool.list_parts(domain)
            if part.mid == mid
        ]
        if not parts:
            raise ValueError(f"no queued message has the id {mid}")
        return parts
