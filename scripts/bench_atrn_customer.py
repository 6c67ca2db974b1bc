"""Collect held mail over ATRN and count it, for scripts/bench.

The customer connects to an ODMR listener, sends EHLO, authenticates with
AUTH PLAIN and sends ATRN (RFC 2645). After the provider's 250 the
connection turns around: the customer greets with 220 and then serves as
a minimal SMTP sink. It replies 250 to EHLO, HELO, MAIL, RCPT, RSET and
NOOP, 354 to DATA and 250 to the end of the data, and 221 to QUIT. It stores nothing. Like smtp-sink it offers PIPELINING and
8BITMIME, so the provider may pipeline as it would toward smtp-sink.

The clock starts just before ATRN is sent and stops when the 250 for the
expected number of messages has been sent. The customer uses plaintext
AUTH, so the listener needs `allow_plaintext_auth = true`, and it talks
to 127.0.0.1 only.

Usage: python3 scripts/bench_atrn_customer.py PORT USER COUNT
(the password is read from the first line of standard input)
"""

from __future__ import annotations

import base64
import socket
import sys
import time
from dataclasses import dataclass

CUSTOMER_NAME = "customer.bench.example.org"
END_OF_DATA = b"\r\n.\r\n"

# Replies of the turned-around session, by command verb.
REPLIES = {
    b"EHLO": f"250-{CUSTOMER_NAME}\r\n250-PIPELINING\r\n250 8BITMIME\r\n".encode(),
    b"HELO": b"250 " + CUSTOMER_NAME.encode() + b"\r\n",
    b"MAIL": b"250 2.1.0 ok\r\n",
    b"RCPT": b"250 2.1.5 ok\r\n",
    b"RSET": b"250 2.0.0 ok\r\n",
    b"NOOP": b"250 2.0.0 ok\r\n",
    b"DATA": b"354 end data with <CR><LF>.<CR><LF>\r\n",
    b"QUIT": b"221 2.0.0 bye\r\n",
}


class CustomerError(Exception):
    """The ATRN session failed; the message names the step and the reply."""


@dataclass
class Collection:
    """Message and recipient counts and the time of one ATRN session.

    Attributes:
        messages: Messages whose data the customer accepted with 250.
        recipients: RCPT commands received.
        seconds: From sending ATRN to the 250 for the expected message
            count; None when fewer messages came.
    """

    messages: int = 0
    recipients: int = 0
    seconds: float | None = None


class Connection:
    """A socket with a receive buffer and a queue of replies to send.

    Args:
        port: The provider's port on 127.0.0.1.
        timeout: Seconds one read or write may wait.
        session_limit: Seconds the whole session may last.
    """

    def __init__(self, port: int, timeout: float, session_limit: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.session_limit = session_limit
        self.deadline = time.monotonic() + session_limit
        self.buffer = b""
        self.outbox: list[bytes] = []

    def receive(self) -> None:
        """Send the queued replies, then read more data into the buffer.

        Raises:
            CustomerError: the provider closed the connection, or the
                session passed its time limit.
        """
        self.flush()
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise CustomerError(f"the session timed out after {self.session_limit}s")
        self.sock.settimeout(min(self.timeout, remaining))
        chunk = self.sock.recv(65536)
        if not chunk:
            raise CustomerError("the provider closed the connection")
        self.buffer += chunk

    def flush(self) -> None:
        """Send every queued reply in one write."""
        if self.outbox:
            self.sock.sendall(b"".join(self.outbox))
            self.outbox.clear()

    def read_line(self) -> bytes:
        """Return the next line without its CRLF."""
        while b"\r\n" not in self.buffer:
            self.receive()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def read_reply(self) -> bytes:
        """Return the provider's next reply, all lines of it."""
        lines = [self.read_line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.read_line())
        return b"\r\n".join(lines)

    def command(self, line: str, expected: bytes) -> bytes:
        """Send one command and check that the reply starts with expected."""
        self.sock.sendall(line.encode("ascii") + b"\r\n")
        reply = self.read_reply()
        if not reply.startswith(expected):
            verb = line.split(" ", 1)[0]
            raise CustomerError(f"{verb} got {reply[:200]!r}, expected {expected!r}")
        return reply

    def skip_data(self) -> None:
        """Discard message data up to and including the end-of-data line."""
        # RFC 5321 4.1.1.4: the data ends with a line holding one dot. The
        # CRLF of the DATA line comes first, so an empty message is ".\r\n".
        self.buffer = b"\r\n" + self.buffer
        searched = 0
        while (end := self.buffer.find(END_OF_DATA, searched)) < 0:
            # A marker that starts in the last 4 octets may end in new data.
            searched = max(0, len(self.buffer) - len(END_OF_DATA) + 1)
            self.receive()
        self.buffer = self.buffer[end + len(END_OF_DATA) :]

    def close(self) -> None:
        self.sock.close()


def collect(
    port: int,
    user: str,
    password: str,
    count: int,
    timeout: float = 60.0,
    session_limit: float = 900.0,
) -> Collection:
    """Run one ATRN session on 127.0.0.1:port and count the messages.

    Args:
        port: The provider's ODMR listener.
        user: The AUTH user, whose credentials name the held domains.
        password: The user's password.
        count: Messages expected; the clock stops at the 250 for this one.
        timeout: Seconds any one read or write may wait.
        session_limit: Seconds the whole session may last.

    Returns:
        A Collection, with seconds set when count messages came.

    Raises:
        CustomerError: a reply before the turnaround was not the expected
            one, the provider sent a command the sink has no reply for, or
            the session passed session_limit.
        OSError: the connection failed, or one read or write timed out.
    """
    connection = Connection(port, timeout, session_limit)
    try:
        started = request_turnaround(connection, user, password)
        return serve_turnaround(connection, count, started)
    finally:
        connection.close()


def request_turnaround(connection: Connection, user: str, password: str) -> float:
    """Authenticate and send ATRN; return the perf_counter time of the ATRN."""
    greeting = connection.read_reply()
    if not greeting.startswith(b"220"):
        raise CustomerError(f"greeting was {greeting[:200]!r}, expected 220")
    ehlo = connection.command(f"EHLO {CUSTOMER_NAME}", b"250")
    if b"ATRN" not in ehlo.upper():
        raise CustomerError("the provider's EHLO reply does not offer ATRN")
    # RFC 4616: the PLAIN response is authzid NUL authcid NUL password.
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
    connection.command(f"AUTH PLAIN {token}", b"235")
    started = time.perf_counter()
    connection.command("ATRN", b"250")
    return started


def serve_turnaround(connection: Connection, count: int, started: float) -> Collection:
    """Act as the SMTP server after ATRN's 250 until the provider sends QUIT."""
    # RFC 2645: after the 250 to ATRN the roles reverse, so the customer
    # sends the greeting, as a server does, and the provider sends EHLO.
    connection.outbox.append(f"220 {CUSTOMER_NAME} ESMTP\r\n".encode())
    collection = Collection()
    while True:
        line = connection.read_line()
        verb = line[:4].upper()
        if verb not in REPLIES:
            raise CustomerError(
                f"the provider sent {line[:200]!r}; this sink has no reply for it"
            )
        if verb == b"RCPT":
            collection.recipients += 1
        if verb == b"DATA":
            connection.outbox.append(REPLIES[verb])
            connection.flush()
            connection.skip_data()
            record_message(connection, collection, count, started)
            continue
        connection.outbox.append(REPLIES[verb])
        if verb == b"QUIT":
            connection.flush()
            return collection


def record_message(
    connection: Connection, collection: Collection, count: int, started: float
) -> None:
    """Accept one message with 250, and stop the clock at the count-th one."""
    collection.messages += 1
    connection.outbox.append(b"250 2.0.0 received\r\n")
    if collection.messages == count:
        connection.flush()
        collection.seconds = time.perf_counter() - started


def main(argv: list[str]) -> int:
    """Run one session from the command line and print its counts."""
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-2], file=sys.stderr)
        return 2
    port, user, count = int(argv[0]), argv[1], int(argv[2])
    password = sys.stdin.readline().rstrip("\r\n")
    try:
        collection = collect(port, user, password, count)
    except (CustomerError, OSError) as exc:
        print(f"bench_atrn_customer: {exc}", file=sys.stderr)
        return 1
    print(collection)
    return 0 if collection.seconds is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
