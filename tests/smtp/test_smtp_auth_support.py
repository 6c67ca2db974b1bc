"""Fake driver for ServerConnection shared by the STARTTLS and AUTH tests."""

from __future__ import annotations

import base64

from trimta.smtp import replies, sasl
from trimta.smtp.events import NEED_DATA, AuthAttempt, StartTls
from trimta.smtp.server import ServerConnection, ServerSettings

MAX_STEPS = 10_000
CHALLENGE = b"<12345.1700000000@mx.example.test>"
USERS = {"alice@example.test": "correct-horse"}


def check_credentials(credentials: sasl.Credentials) -> bool:
    """Check credentials against USERS the way the real driver does."""
    password = USERS.get(credentials.username)
    if password is None:
        return False
    if credentials.mechanism == "CRAM-MD5":
        expected = sasl.cram_md5_digest(password, credentials.challenge)
        return credentials.secret == expected
    return credentials.secret == password


def b64(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return base64.b64encode(data)


class Driver:
    """Run a ServerConnection, record its events and reply like a permissive MTA.

    Attributes:
        tls_ok: Whether a StartTls handshake "succeeds".
    """

    def __init__(self, *, secure: bool = False, tls_ok: bool = True, **settings):
        settings.setdefault("auth_mechanisms", sasl.MECHANISMS)
        self.conn = ServerConnection(
            ServerSettings("mx.example.test", **settings),
            secure=secure,
            cram_challenge=lambda: CHALLENGE,
        )
        self.tls_ok = tls_ok
        self.events: list = []
        self.conn.send_greeting()
        self.greeting = self.conn.data_to_send()

    def send(self, data: bytes) -> bytes:
        """Feed data, run events until NEED_DATA or close, return the replies."""
        self.conn.receive_data(data)
        for _ in range(MAX_STEPS):
            event = self.conn.next_event()
            if event is NEED_DATA:
                break
            self.events.append(event)
            if isinstance(event, StartTls):
                self._handshake()
            elif self.conn.awaiting_reply:
                self.conn.send_reply(self._answer(event))
            if self.conn.state.name == "CLOSED":
                break
        return self.conn.data_to_send()

    def _handshake(self) -> None:
        if self.tls_ok:
            self.conn.tls_started()
        else:
            self.conn.tls_failed()

    def _answer(self, event) -> replies.Reply:
        if isinstance(event, AuthAttempt):
            if check_credentials(event.credentials):
                return replies.auth_succeeded()
            return replies.auth_failed()
        return replies.ok()

    def codes(self, data: bytes) -> list[str]:
        """Send data and return the final line's code of each reply."""
        wire = self.send(data)
        return [line[:3].decode() for line in wire.split(b"\r\n") if line[3:4] == b" "]
