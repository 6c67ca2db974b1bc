"""A TCP stream for SMTP connections that yields to Trio only when it must wait.

`trio.SocketStream` passes through the scheduler on every send and every
receive, even when the socket is ready. An SMTP session makes about seven
sends and seven receives per message, and on the accept benchmark that
scheduling was a third of the event loop's time per message. This stream
calls the non-blocking socket directly and waits (a checkpoint) only when
the socket is not ready. Both the listeners' sessions and outbound
delivery use it.

Fairness: a client whose data is always ready would otherwise keep the
loop to itself, so every `FAIR_SHARE` operations that did not wait, the
stream checkpoints once anyway. Cancellation is seen at those
checkpoints and at every wait, which is where a session spends its time.
"""

from __future__ import annotations

import socket

import trio

DEFAULT_RECEIVE_SIZE = 65536
# Operations completed without waiting before the stream yields anyway.
FAIR_SHARE = 16


class SocketTransport(trio.abc.Stream):
    """A stream over a connected non-blocking stdlib socket.

    Attributes:
        socket: The socket, for its addresses (getpeername, getsockname).
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self._closed = False
        self._unyielded = 0

    @classmethod
    def take_over(cls, stream: trio.SocketStream) -> SocketTransport:
        """Move an accepted Trio socket stream's socket into a new transport."""
        trio_socket = stream.socket
        # Naming family and type spares the kernel calls that detect them.
        family, kind, proto = trio_socket.family, trio_socket.type, trio_socket.proto
        return cls(socket.socket(family, kind, proto, trio_socket.detach()))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        with memoryview(data) as view:
            while view:
                try:
                    sent = self.socket.send(view)
                except BlockingIOError:
                    await self._wait(trio.lowlevel.wait_writable)
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(f"send failed: {exc}") from exc
                view = view[sent:]
        await self._take_turn()

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await self._wait(trio.lowlevel.wait_writable)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check_open()
        size = DEFAULT_RECEIVE_SIZE if max_bytes is None else max_bytes
        while True:
            try:
                data = self.socket.recv(size)
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_readable)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
            await self._take_turn()
            return data

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")

    async def _wait(self, wait) -> None:
        self._unyielded = 0
        await wait(self.socket)
        # aclose from another task ends the wait with ClosedResourceError.
        self._check_open()

    async def _take_turn(self) -> None:
        self._unyielded += 1
        if self._unyielded >= FAIR_SHARE:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()
