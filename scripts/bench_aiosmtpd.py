"""Run an aiosmtpd server that stores each message durably, for scripts/bench.

Each message is written to its own file and fsynced before the 250 reply,
so the benchmark compares durable accepts. The write and the fsync run in
a worker thread so that one slow fsync does not stall the other sessions.
The directory entry is not fsynced. The server listens on 127.0.0.1 only
and runs until SIGTERM or SIGINT.

Usage: python3 scripts/bench_aiosmtpd.py PORT DIRECTORY [MAX_SIZE]
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys

from aiosmtpd.smtp import SMTP

HOSTNAME = "aiosmtpd.bench.example.org"


class DurableHandler:
    """An aiosmtpd handler that writes each message to a file and fsyncs it."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.numbers = itertools.count(1)

    async def handle_DATA(self, server, session, envelope) -> str:
        """Store the message, then return the 250 reply."""
        name = f"{os.getpid()}.{next(self.numbers)}.eml"
        path = os.path.join(self.directory, name)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, write_durably, path, envelope.original_content)
        return f"250 2.0.0 queued as {name}"


def write_durably(path: str, content: bytes) -> None:
    """Write content to a new file at path and fsync the file."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(descriptor, view) :]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


async def serve(port: int, directory: str, max_size: int) -> None:
    """Serve SMTP on 127.0.0.1:port until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    handler = DurableHandler(directory)

    def build_protocol() -> SMTP:
        return SMTP(handler, hostname=HOSTNAME, data_size_limit=max_size)

    server = await loop.create_server(build_protocol, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str]) -> int:
    """Parse the arguments and run the server."""
    if len(argv) not in (3, 4):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    max_size = int(argv[3]) if len(argv) == 4 else 33_554_432
    os.makedirs(argv[2], mode=0o700, exist_ok=True)
    asyncio.run(serve(int(argv[1]), argv[2], max_size))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
