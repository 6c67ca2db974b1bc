"""Property tests for ServerConnection with arbitrary client byte streams."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trimta.smtp import replies, sasl
from trimta.smtp.events import (
    NEED_DATA,
    AuthAttempt,
    ConnectionClosed,
    DataStarted,
    Ehlo,
    EndOfMessage,
    MessageAborted,
    MessageData,
    StartTls,
)
from trimta.smtp.server import ServerConnection, ServerSettings

MAX_STEPS = 50_000

COMMANDS = [
    b"EHLO client.example.net",
    b"HELO client.example.net",
    b"MAIL FROM:<alice@example.net>",
    b"MAIL FROM:<> SIZE=10",
    b"MAIL FROM:<\xce\xb4@example.net> SMTPUTF8",
    b"RCPT TO:<bob@example.test>",
    b"RCPT TO:<Postmaster>",
    b"RCPT TO:<bob@@example.test>",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"VRFY bob",
    b"HELP",
    b"ETRN example.org",
    b"ATRN",
    b"ATRN a.example,b.example",
    b"BDAT 5 LAST",
    b"TURN",
    b"QUIT",
    b"STARTTLS",
    b"AUTH PLAIN",
    b"AUTH PLAIN AGFsaWNlAHB3",
    b"AUTH PLAIN =",
    b"AUTH LOGIN YWxpY2U=",
    b"AUTH CRAM-MD5",
    b"AUTH X-UNKNOWN",
    b"*",
    b"=",
    b"cHc=",
    b"YWxpY2UgMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    b"Received: from x",
    b"Subject: hello",
    b".",
    b"..x",
    b"",
]
SEPARATORS = [b"\r\n", b"\r", b"\n", b".", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"\r\n.\r"]

pieces = st.one_of(
    st.builds(lambda command: command + b"\r\n", st.sampled_from(COMMANDS)),
    st.sampled_from(SEPARATORS),
    st.binary(max_size=40),
    st.builds(
        lambda octet, count: octet * count,
        st.sampled_from([b"x", b".", b"\r", b"\n", b" ", b"\r\n"]),
        st.integers(0, 3000),
    ),
)
# Most streams open a transaction first so that the DATA phase is reached.
OPENERS = [
    b"",
    b"EHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n",
    b"HELO c.example\r\nMAIL FROM:<> SIZE=1\r\nRCPT TO:<Postmaster>\r\nDATA\r\n",
]
streams = st.builds(
    lambda opener, body: opener + b"".join(body),
    st.sampled_from(OPENERS),
    st.lists(pieces, max_size=40),
)
server_settings = st.builds(
    ServerSettings,
    hostname=st.just("mx.example.test"),
    max_message_size=st.sampled_from([0, 60, 5000]),
    max_recipients=st.integers(1, 3),
    max_errors=st.integers(1, 30),
    etrn=st.booleans(),
    starttls=st.booleans(),
    auth_mechanisms=st.sampled_from([(), sasl.MECHANISMS, ("CRAM-MD5",)]),
    allow_plaintext_auth=st.booleans(),
    require_auth=st.booleans(),
    odmr=st.booleans(),
)
CRAM_CHALLENGE = b"<1.0@mx.example.test>"


def answer(conn: ServerConnection, event) -> None:
    """Reply to an event the way a driver that accepts "alice" would."""
    if isinstance(event, StartTls):
        # Without a TLS peer the handshake fails; the session then ends
        # the same way however the input was split.
        conn.tls_failed()
    elif isinstance(event, AuthAttempt):
        alice = event.credentials.username == "alice"
        conn.send_reply(replies.auth_succeeded() if alice else replies.auth_failed())
    elif conn.awaiting_reply:
        reply = (
            replies.queued("Q1") if isinstance(event, EndOfMessage) else replies.ok()
        )
        conn.send_reply(reply)


def run(config: ServerSettings, chunks: list[bytes]) -> tuple[list, bytes, list[bytes]]:
    """Drive a session like a well-behaved driver that accepts everything.

    Returns the events, the wire bytes and the replies tagged by the
    command phase that produced them.
    """
    conn = ServerConnection(config, cram_challenge=lambda: CRAM_CHALLENGE)
    conn.send_greeting()
    events: list = []
    wire = bytearray(conn.data_to_send())
    pending = list(chunks) + [b""]
    for _ in range(MAX_STEPS):
        event = conn.next_event()
        if event is NEED_DATA:
            wire += conn.data_to_send()
            conn.receive_data(pending.pop(0))
            continue
        events.append(event)
        answer(conn, event)
        if isinstance(event, ConnectionClosed):
            break
    else:
        raise AssertionError("session did not finish within MAX_STEPS events")
    wire += conn.data_to_send()
    return events, bytes(wire), events


def normalise(events: list) -> list:
    """Merge adjacent MessageData events and drop those of aborted messages.

    Chunking decides how content is split into MessageData events, and
    how much of a too-big message is emitted before the limit is crossed;
    the driver discards an aborted message's data anyway.
    """
    out: list = []
    for event in events:
        if isinstance(event, MessageData) and out and isinstance(out[-1], MessageData):
            out[-1] = MessageData(out[-1].data + event.data)
        elif isinstance(event, MessageAborted):
            if out and isinstance(out[-1], MessageData):
                out.pop()
            out.append(event)
        else:
            out.append(event)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


COMMON = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@COMMON
@given(server_settings, streams, st.lists(st.integers(0, 10**6), max_size=30))
def test_chunking_does_not_change_session(config, data, cuts):
    whole_events, whole_wire, _ = run(config, [data] if data else [])
    split_events, split_wire, _ = run(config, split(data, cuts))
    assert normalise(split_events) == normalise(whole_events)
    assert split_wire == whole_wire


@COMMON
@given(server_settings, streams)
def test_byte_by_byte_feeding_matches(config, data):
    data = data[:3000]
    whole_events, whole_wire, _ = run(config, [data] if data else [])
    single_events, single_wire, _ = run(
        config, [data[i : i + 1] for i in range(len(data))]
    )
    assert normalise(single_events) == normalise(whole_events)
    assert single_wire == whole_wire


REPLY_LINE = re.compile(rb"([2-5][0-9]{2})([ -])([\x20-\x7e]*)")
STATUS = re.compile(rb"[245]\.[0-9]{1,3}\.[0-9]{1,3} ")


@COMMON
@given(server_settings, streams)
def test_every_reply_line_well_formed(config, data):
    events, wire, _ = run(config, [data] if data else [])
    assert isinstance(events[-1], ConnectionClosed)
    assert wire.endswith(b"\r\n")
    lines = wire.split(b"\r\n")[:-1]
    ehlo_replies = sum(isinstance(event, Ehlo) for event in events)
    data_starts = sum(isinstance(event, DataStarted) for event in events)
    exempt = 0
    for line in lines:
        assert len(line) + 2 <= 512
        match = REPLY_LINE.fullmatch(line)
        assert match, line
        code, text = match[1], match[3]
        if STATUS.match(text) and text[0:1] == code[0:1]:
            continue
        # RFC 2034: only the greeting, HELO/EHLO replies, 354 and the
        # 334 AUTH challenges lack a code.
        assert code in (b"220", b"250", b"354", b"334"), line
        if match[2] == b" ":
            exempt += 1
    challenges = sum(line.startswith(b"334") for line in lines)
    assert exempt == 1 + ehlo_replies + data_starts + challenges


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=10))
def test_random_bytes_never_raise(data, cuts):
    config = ServerSettings("mx.example.test", max_errors=1000)
    events, wire, _ = run(config, split(data, cuts))
    assert isinstance(events[-1], ConnectionClosed)
    assert wire.startswith(b"220 ")
