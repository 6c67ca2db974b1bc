#!/usr/bin/env python3
"""Fuzz the SMTP server engine and its DATA reader with atheris (libFuzzer).

Each input is split into chunks at the byte 0xff and fed to a
`ServerConnection` driven like a well-behaved driver that accepts every
sender, recipient, message, ETRN, ATRN and the user "alice". The first
byte picks the engine settings. Any exception escaping the engine is a
finding: a peer's bytes may only ever produce replies and events.

    pip install atheris
    python3 scripts/fuzz_smtp.py -dict=scripts/fuzz_smtp.dict \
        -max_total_time=600 corpus/

An empty corpus folder gets a few valid sessions as seeds, so that the
fuzzer starts inside the protocol instead of having to find EHLO.

The second target, selected with TRIMTA_FUZZ=dotreader, feeds the DATA
reader alone and checks that unstuffing never grows the data.
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports():
    from trimta.smtp import replies, sasl
    from trimta.smtp.dotstuff import MAX_TEXT_LINE, DotReader, Problem
    from trimta.smtp.events import NEED_DATA, AuthAttempt, ConnectionClosed, EndOfMessage, StartTls
    from trimta.smtp.server import ServerConnection, ServerSettings

MAX_EVENTS = 100_000


def settings_from(selector: int) -> ServerSettings:
    """Pick engine settings from the bits of one byte."""
    return ServerSettings(
        hostname="mx.example.test",
        max_message_size=(0, 60, 5000, 10_240_000)[selector & 3],
        max_recipients=1 + (selector >> 2 & 3),
        max_errors=5 + (selector >> 4 & 1) * 15,
        etrn=bool(selector & 0x20),
        starttls=bool(selector & 0x40),
        auth_mechanisms=sasl.MECHANISMS if selector & 0x80 else (),
        allow_plaintext_auth=bool(selector & 0x10),
        odmr=bool(selector & 0x08),
    )


def reply_to(conn: ServerConnection, event) -> None:
    if isinstance(event, StartTls):
        conn.tls_failed()
    elif isinstance(event, AuthAttempt):
        alice = event.credentials.username == "alice"
        conn.send_reply(replies.auth_succeeded() if alice else replies.auth_failed())
    elif conn.awaiting_reply:
        reply = replies.queued("Q1") if isinstance(event, EndOfMessage) else replies.ok()
        conn.send_reply(reply)


def fuzz_engine(data: bytes) -> None:
    if not data:
        return
    conn = ServerConnection(settings_from(data[0]))
    conn.send_greeting()
    chunks = data[1:].split(b"\xff") + [b""]
    for chunk in chunks:
        conn.receive_data(chunk)
        for _ in range(MAX_EVENTS):
            event = conn.next_event()
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                break
            reply_to(conn, event)
        for line in conn.data_to_send().split(b"\r\n")[:-1]:
            if not (len(line) <= 512 and line[:1] in b"2345" and line[3:4] in (b" ", b"-")):
                raise AssertionError(f"malformed reply line {line!r}")
        if isinstance(event, ConnectionClosed):
            return


def fuzz_dot_reader(data: bytes) -> None:
    reader = DotReader(max_size=1 << 20)
    total_in = total_out = 0
    fed = []
    for chunk in data.split(b"\xff"):
        fed.append(chunk)
        total_in += len(chunk)
        total_out += len(reader.feed(chunk))
        if reader.finished:
            break
    if total_out > total_in:
        raise AssertionError("unstuffing produced more octets than it read")
    if reader.finished:
        check_line_length_verdict(reader, b"\r\n" + b"".join(fed))


def check_line_length_verdict(reader: DotReader, stream: bytes) -> None:
    """Compare the reader's too-long verdict with a plain split of the stream.

    The stream starts with the virtual CRLF before the first line. A line
    is too long when more than 999 octets (its CR included) precede an LF.
    """
    end = stream.find(b"\r\n.\r\n")
    longest = max(len(line) for line in stream[: end + 2].split(b"\n"))
    expected = longest > MAX_TEXT_LINE - 1
    if (Problem.LINE_TOO_LONG in reader.problems) != expected:
        raise AssertionError(f"line-length verdict differs: longest line {longest}")


SEEDS = [
    b"\xffEHLO c.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.test>\r\n"
    b"DATA\r\nSubject: x\r\n\r\nbody\r\n..dot\r\n.\r\nQUIT\r\n",
    b"\xffEHLO c.example\r\nAUTH PLAIN AGFsaWNlAHB3\r\nATRN a.example\r\nQUIT\r\n",
    b"\x60EHLO c.example\r\nSTARTTLS\r\nMAIL FROM:<a@example.net>\r\n\xffQUIT\r\n",
    b"\x20HELO c.example\r\nETRN @example.org\r\nMAIL FROM:<> SIZE=10\r\n"
    b"RCPT TO:<Postmaster>\r\nDATA\r\n\xffReceived: x\r\n\r\n.\r\n",
]


def write_seeds(argv: list[str]) -> None:
    """Put the seed sessions into an empty corpus folder given on the command line."""
    folders = [arg for arg in argv[1:] if not arg.startswith("-")]
    if not folders or os.listdir(folders[0]):
        return
    for index, seed in enumerate(SEEDS):
        with open(os.path.join(folders[0], f"seed-{index}"), "wb") as handle:
            handle.write(seed)


def main() -> None:
    target = fuzz_dot_reader if os.environ.get("TRIMTA_FUZZ") == "dotreader" else fuzz_engine
    write_seeds(sys.argv)
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
