"""Accept SMTP connections on every listener and run one session each.

Listeners and sessions live in separate nurseries so that stopping can
happen in order: first the listeners close (no new sessions), then idle
sessions are told `421` at once, and sessions in the middle of a
transaction get `limits.shutdown_grace` to finish before they are
cancelled. Nothing acknowledged is at risk when a session is cancelled:
its partial message is discarded and the client never saw a 250 for it.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections import Counter

import attrs
import trio

from trimta.config.values import HostPort
from trimta.listen.conn import Session, SessionContext, peer_address
from trimta.listen.policy import IPAddress
from trimta.transport import SocketTransport
from trimta.smtp import replies

logger = logging.getLogger("trimta.listen")

# accept() errors that mean "out of resources for now": log, pause, retry.
_ACCEPT_OVERLOAD = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# Seconds between two sweeps for sessions past their deadline: a timeout
# fires up to this much late.
SWEEP_INTERVAL = 0.5


@attrs.define(eq=False)
class ListenError(Exception):
    """A listener that could not be opened.

    Attributes:
        address: The configured address.
        reason: The operating system's error text.
    """

    address: str
    reason: str

    def __str__(self) -> str:
        return (
            f"cannot listen on {self.address}: {self.reason}; choose another "
            "address or port in [[listener]], or stop the program using it"
        )


async def open_listeners(address: HostPort) -> list[trio.SocketListener]:
    """Open the TCP listeners for one configured address.

    Raises:
        ListenError: The address is in use, not local, or not allowed.
    """
    host = None if address.host == "*" else address.host
    try:
        return await trio.open_tcp_listeners(address.port, host=host)
    except OSError as exc:
        raise ListenError(str(address), exc.strerror or str(exc)) from exc


@attrs.define
class SessionLimits:
    """Open-session counters that enforce the per-server and per-client limits."""

    max_sessions: int
    max_per_client: int
    total: int = 0
    per_client: Counter = attrs.Factory(Counter)

    def refusal(self, peer: IPAddress | None) -> replies.Reply | None:
        """Return the reply refusing a new session, or None to admit it."""
        if self.total >= self.max_sessions:
            return replies.too_many_sessions("too many sessions on this server")
        if peer is not None and self.per_client[peer] >= self.max_per_client:
            return replies.too_many_sessions(f"too many sessions from {peer}")
        return None

    def opened(self, peer: IPAddress | None) -> None:
        self.total += 1
        self.per_client[peer] += 1

    def closed(self, peer: IPAddress | None) -> None:
        self.total -= 1
        self.per_client[peer] -= 1
        if self.per_client[peer] <= 0:
            del self.per_client[peer]


@attrs.define
class SmtpServer:
    """All listeners of one daemon and the sessions they accepted."""

    context: SessionContext
    limits: SessionLimits
    _ids: itertools.count = attrs.Factory(lambda: itertools.count(1))

    async def serve(
        self,
        listeners: list[tuple[trio.SocketListener, SessionContext]],
        grace: float,
        stop: trio.Event,
        *,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on every listener until `stop` is set, then stop in order.

        Each listener comes with the session context of its configuration
        (every context shares the daemon's stop event and idle scopes).

        Listeners close first, idle sessions then get 421 at once, and
        sessions in a transaction get `grace` seconds to finish before
        they are cancelled. Returns when every session has ended.
        """
        async with trio.open_nursery() as watching:
            watching.start_soon(self._sweep_deadlines)
            async with trio.open_nursery() as sessions:
                async with trio.open_nursery() as accepting:
                    for listener, context in listeners:
                        accepting.start_soon(
                            self._accept_loop, listener, context, sessions
                        )
                    task_status.started()
                    await stop.wait()
                    accepting.cancel_scope.cancel()
                await self._close_listeners([listener for listener, _ in listeners])
                logger.info(
                    "listeners closed; sessions=%d grace=%gs", self.limits.total, grace
                )
                self.context.stop_idle_sessions()
                sessions.cancel_scope.deadline = trio.current_time() + grace
            watching.cancel_scope.cancel()

    async def _sweep_deadlines(self) -> None:
        """Close sessions whose clients missed a deadline, as long as any run."""
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            self.context.interrupt_overdue_sessions()

    async def _close_listeners(self, listeners: list[trio.SocketListener]) -> None:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()

    async def _accept_loop(
        self,
        listener: trio.SocketListener,
        context: SessionContext,
        sessions: trio.Nursery,
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_OVERLOAD:
                    raise
                logger.warning("accept failed, retrying in 0.1s: %s", os.strerror(exc.errno))
                await trio.sleep(0.1)
                continue
            sessions.start_soon(self._run_session, stream, context)

    async def _run_session(self, stream: trio.SocketStream, context: SessionContext) -> None:
        transport = SocketTransport.take_over(stream)
        peer = peer_address(transport)
        sid = f"{next(self._ids):x}"
        refusal = self.limits.refusal(peer)
        self.limits.opened(peer)
        # At INFO one line per session is enough: the closing one names the
        # client too, and each line costs accept rate.
        logger.debug("session opened sid=%s client=%s", sid, peer)
        try:
            async with transport:
                await Session(context, transport, peer, sid).run(refusal)
        except Exception:
            # One broken session must not take the daemon down.
            logger.exception("session failed sid=%s client=%s", sid, peer)
        finally:
            self.limits.closed(peer)
            logger.info("session closed sid=%s client=%s", sid, peer)
