"""The control socket: how `trimta queue` asks a running daemon to act.

The daemon listens on a Unix socket inside its spool (`control.sock`,
mode 0600 inside the 0700 spool, so only the spool's owner can use it).
A request is one line of JSON, `{"command": "...", ...}`, and the answer
one line of JSON, `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
Requests that change the queue go through the daemon so that they never
race with delivery.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

logger = logging.getLogger("trimta.admin")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024
CLIENT_TIMEOUT = 30.0

Handler = Callable[[dict], Awaitable[dict]]


class NoDaemonError(Exception):
    """No daemon replied on the control socket."""


def socket_path(spool: Path) -> Path:
    """Return the control socket's path for a spool folder."""
    return spool / SOCKET_NAME


async def serve_control(spool: Path, handler: Handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve control requests on the spool's socket until cancelled."""
    async with _bound_socket(socket_path(spool)) as listener:
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(_serve_one, stream, handler)


@contextlib.asynccontextmanager
async def _bound_socket(path: Path):
    """Bind the Unix socket (replacing a stale one) and remove it on exit."""
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        yield listener
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        sock.close()


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        try:
            with trio.fail_after(CLIENT_TIMEOUT):
                request = await _read_line(stream)
            answer = await handler(json.loads(request))
        except (ValueError, trio.TooSlowError) as exc:
            answer = {"ok": False, "error": f"invalid request: {exc}"}
        except Exception as exc:  # one bad request must not stop the socket
            logger.exception("control request failed")
            answer = {"ok": False, "error": f"request failed: {exc}"}
        try:
            await stream.send_all(json.dumps(answer).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]


def send_request(spool: Path, request: dict, timeout: float = CLIENT_TIMEOUT) -> dict:
    """Send one request to the daemon of `spool` and return its response.

    Raises:
        NoDaemonError: Nothing listens on the control socket.
    """
    path = socket_path(spool)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        try:
            client.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NoDaemonError(
                f"no trimta daemon is listening on {path}; start `trimta serve` with "
                "this configuration, or check the spool path"
            ) from exc
        client.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
