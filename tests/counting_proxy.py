"""Run a TCP proxy on 127.0.0.1 that counts the connections passing through it.

The proxy forwards every connection it accepts to one next hop and
records how many were open at once, so a test can check a connection
limit from outside the process under test. It runs Trio in a thread of
its own, so synchronous tests can use it like the smtp-sink helper.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import trio

START_TIMEOUT = 10.0
RECEIVE_SIZE = 65536


@attrs.define
class ConnectionCounts:
    """Connections seen by the proxy.

    A connection counts as open from its accept until its client shuts
    down the sending side. When a client closes one connection and at
    once opens the next, the proxy may see the accept before the end of
    the old one, so each accept first drops connections whose end is
    already waiting in the socket buffer.

    Attributes:
        peak: The most connections that were open at the same time.
        total: Connections accepted since the start.
    """

    peak: int = 0
    total: int = 0
    open_sockets: set = attrs.Factory(set)

    def opened(self, sock: trio.socket.SocketType) -> None:
        self.open_sockets = {s for s in self.open_sockets if not _eof_waiting(s)}
        self.open_sockets.add(sock)
        self.total += 1
        self.peak = max(self.peak, len(self.open_sockets))

    def closed(self, sock: trio.socket.SocketType) -> None:
        self.open_sockets.discard(sock)


def _eof_waiting(sock: trio.socket.SocketType) -> bool:
    # A peek that returns no bytes without blocking means the peer's FIN
    # is next in the buffer. Trio's recv is async, so the peek goes
    # through a duplicate of the descriptor.
    try:
        with socket.fromfd(sock.fileno(), sock.family, sock.type) as duplicate:
            return duplicate.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


@attrs.define
class CountingProxy:
    """A running proxy: its port and its counts.

    The counts are updated only from the proxy's Trio thread; the GIL
    makes reading one integer from the test's thread safe.
    """

    port: int
    target: tuple[str, int]
    counts: ConnectionCounts


async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    """Copy bytes one way until the source closes, then close the sink's write side."""
    try:
        while data := await source.receive_some(RECEIVE_SIZE):
            await sink.send_all(data)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _forward(client: trio.SocketStream, proxy: CountingProxy) -> None:
    # The count covers the whole client connection, including the time
    # spent connecting to the next hop.
    proxy.counts.opened(client.socket)
    try:
        async with client:
            try:
                upstream = await trio.open_tcp_stream(*proxy.target)
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_pump, upstream, client)
                await _pump(client, upstream)
                # The client has finished sending: its connection is over.
                proxy.counts.closed(client.socket)
    finally:
        proxy.counts.closed(client.socket)


async def _serve(target: tuple[str, int], ready: queue.Queue, stop: trio.Event) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    proxy = CountingProxy(port, target, ConnectionCounts())

    async def handle(stream: trio.SocketStream) -> None:
        await _forward(stream, proxy)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        ready.put((proxy, trio.lowlevel.current_trio_token()))
        await stop.wait()
        nursery.cancel_scope.cancel()


@contextmanager
def run_counting_proxy(target: tuple[str, int]) -> Iterator[CountingProxy]:
    """Start a proxy to `target` (host, port) on a free port, and yield it."""
    ready: queue.Queue = queue.Queue()
    stop = trio.Event()
    thread = threading.Thread(target=trio.run, args=(_serve, target, ready, stop))
    thread.start()
    token = None
    try:
        try:
            proxy, token = ready.get(timeout=START_TIMEOUT)
        except queue.Empty:
            raise RuntimeError(
                f"the counting proxy to {target} did not start"
            ) from None
        yield proxy
    finally:
        if token is not None:
            trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(START_TIMEOUT)
