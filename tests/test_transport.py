"""SocketTransport: direct socket calls, fair turns, errors as Trio's."""

from __future__ import annotations

import socket
import ssl

import pytest
import trio
import trio.testing
import trustme

from trimta.transport import FAIR_SHARE, SocketTransport


def transport_pair() -> tuple[SocketTransport, socket.socket]:
    ours, theirs = socket.socketpair()
    return SocketTransport(ours), theirs


async def test_round_trip_both_ways():
    transport, peer = transport_pair()
    with peer:
        await transport.send_all(b"220 ready\r\n")
        assert peer.recv(100) == b"220 ready\r\n"
        peer.sendall(b"QUIT\r\n")
        assert await transport.receive_some(100) == b"QUIT\r\n"
        await transport.aclose()


async def test_receive_waits_until_data_arrives():
    transport, peer = transport_pair()
    received = []

    async def receive():
        received.append(await transport.receive_some())

    with peer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.sleep(0.05)
            assert received == []
            peer.sendall(b"EHLO x\r\n")
        assert received == [b"EHLO x\r\n"]
        await transport.aclose()


async def test_ready_data_still_yields_to_other_tasks():
    transport, peer = transport_pair()
    other_ran = 0

    async def other():
        nonlocal other_ran
        while True:
            other_ran += 1
            await trio.lowlevel.checkpoint()

    with peer:
        peer.sendall(b"x" * (FAIR_SHARE * 8))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            for _ in range(FAIR_SHARE * 8):
                assert await transport.receive_some(1) == b"x"
            nursery.cancel_scope.cancel()
        # Each fair turn lets the other task run once.
        assert other_ran >= 7
        await transport.aclose()


async def test_end_of_input_is_empty_bytes():
    transport, peer = transport_pair()
    peer.close()
    assert await transport.receive_some() == b""
    await transport.aclose()


async def test_send_to_closed_peer_is_broken():
    transport, peer = transport_pair()
    peer.close()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):
            await transport.send_all(b"x" * 65536)
    await transport.aclose()


async def test_use_after_close_is_closed_error():
    transport, peer = transport_pair()
    with peer:
        await transport.aclose()
        await transport.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await transport.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            await transport.send_all(b"x")


async def test_close_wakes_a_waiting_receive():
    transport, peer = transport_pair()
    with peer:
        async with trio.open_nursery() as nursery:

            async def receive():
                with pytest.raises(trio.ClosedResourceError):
                    await transport.receive_some()

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await transport.aclose()


async def test_carries_a_tls_stream():
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("mx.example").configure_cert(server_context)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    ours, theirs = socket.socketpair()
    server = trio.SSLStream(SocketTransport(ours), server_context, server_side=True)
    client = trio.SSLStream(
        trio.SocketStream(trio.socket.from_stdlib_socket(theirs)),
        client_context,
        server_hostname="mx.example",
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    await client.send_all(b"EHLO x\r\n")
    assert await server.receive_some() == b"EHLO x\r\n"
    await server.send_all(b"250 ok\r\n")
    assert await client.receive_some() == b"250 ok\r\n"
    await server.transport_stream.aclose()
    await client.transport_stream.aclose()
