"""Session deadlines and interrupts over in-memory streams.

A lockstep stream pair replaces the socket: its send_all waits until
the other side reads, which is how a client that never reads looks to
the session, and no real socket buffer has a size a test can rely on.
"""

from __future__ import annotations

import logging

import trio
import trio.testing

from trimta.config.model import Config
from trimta.listen.conn import Session, SessionContext
from trimta.listen.policy import RecipientPolicy
from trimta.smtp.server import ServerSettings
from trimta.spool.store import open_spool

TIMEOUT = 2.0


async def read_reply(stream) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        data += await stream.receive_some(1)
    return data


def make_context(spool) -> SessionContext:
    return SessionContext(
        settings=ServerSettings(hostname="mx.trimta.test"),
        policy=RecipientPolicy(Config()),
        spool=spool,
        command_timeout=TIMEOUT,
        data_timeout=TIMEOUT,
        min_data_rate=0,
    )


async def sweep(context: SessionContext) -> None:
    while True:
        await trio.sleep(0.5)
        context.interrupt_overdue_sessions()


async def test_unread_reply_after_quit_ends_quietly(tmp_path, autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="trimta")
    async with open_spool(tmp_path) as (spool, _):
        context = make_context(spool)
        client, server = trio.testing.lockstep_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sweep, context)
            nursery.start_soon(Session(context, server, None, "1").run)
            assert (await read_reply(client)).startswith(b"220")
            # QUIT closes the engine; its 221 then waits for a reader.
            await client.send_all(b"QUIT\r\n")
            await trio.sleep(TIMEOUT * 3)
            assert context.sessions == set()
            nursery.cancel_scope.cancel()
    assert "while sending replies" in caplog.text
    assert "Traceback" not in caplog.text


async def test_reply_never_read_is_interrupted(tmp_path, autojump_clock):
    async with open_spool(tmp_path) as (spool, _):
        context = make_context(spool)
        client, server = trio.testing.lockstep_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sweep, context)
            nursery.start_soon(Session(context, server, None, "2").run)
            await trio.sleep(TIMEOUT * 3)
            # The greeting was never read, and the session has given up.
            assert context.sessions == set()
            nursery.cancel_scope.cancel()
