"""Sans-IO SMTP client engine (RFC 5321 with PIPELINING, STARTTLS and AUTH).

Theory of operation. The driver queues commands with the ``send_*``
methods, writes ``data_to_send()`` to the connection, feeds what it reads
to ``receive_data`` and calls ``next_reply`` until it returns NEED_DATA.
The engine remembers the command that each outstanding reply belongs to
(``pending``), so it can parse the EHLO extensions, recognise the 354 that
opens the message data, respond to AUTH challenges and pick the RFC 5321
4.5.3.2 timeout for the next read (``timeout``).

Commands are checked before they are queued. While replies are pending,
another command may only follow when the server advertised PIPELINING
and the pending group does not end with a command that changes the
session (EHLO, HELO, STARTTLS, AUTH, DATA, NOOP or QUIT, after RFC
2920 3.1). Command arguments must not contain CR or LF, so no
caller value can inject a second command line.

Reply parsing is lenient where leniency is harmless: a reply line may end
in a bare LF, and a line may be up to 4096 octets although RFC 5321
4.5.3.1.5 allows 512. Longer lines, lines without a valid code, mixed
codes in one multi-line reply and replies nobody asked for raise
RemoteProtocolError. A 421 ends the session whenever it arrives
(RFC 5321 3.8).

After the 220 reply to STARTTLS the engine accepts no further input until
the driver has completed the TLS handshake and called ``reset_after_tls``.
Any octet already buffered behind that 220 was sent in plaintext before
the handshake and could be an injected reply (the CVE-2011-0411 class of
attack), so next_reply raises RemoteProtocolError instead of parsing it.

``Transaction`` runs one mail transaction on top of a ClientConnection,
pipelined when the server offers PIPELINING, and returns one result per
recipient.
"""

from __future__ import annotations

import base64
import collections
import enum
import re
from collections.abc import Iterable

import attrs

from trimta.smtp.client_events import (
    Phase,
    RcptResult,
    SendBody,
    TransactionResult,
)
from trimta.smtp.errors import LocalProtocolError, RemoteProtocolError
from trimta.smtp.events import NEED_DATA, NeedData
from trimta.smtp.replies import MAX_REPLY_LINE, Reply, parse_reply_line, show
from trimta.smtp.stuffing import DotStuffer

__all__ = [
    "NEED_DATA",
    "RFC_TIMEOUTS",
    "ClientConnection",
    "ClientState",
    "ClientTimeouts",
    "Phase",
    "RcptResult",
    "SendBody",
    "Transaction",
    "TransactionResult",
    "parse_extensions",
    "timeout_for",
]

_ABOVE_ZERO = attrs.validators.gt(0)


@attrs.frozen
class ClientTimeouts:
    """Seconds the client waits for each reply, and for each send of message data.

    The defaults are the minimum waits of RFC 5321 4.5.3.2. RFC 5321 sets
    no timeout for EHLO, HELO, STARTTLS, AUTH, RSET, NOOP or QUIT, so
    `command` covers those, with the 5 minutes that MAIL and RCPT get.

    Attributes:
        greeting: The 220 greeting (4.5.3.2.1).
        mail: The reply to MAIL (4.5.3.2.2).
        rcpt: The reply to each RCPT (4.5.3.2.3).
        data_init: The 354 reply to DATA (4.5.3.2.4).
        data_block: Each send of message data (4.5.3.2.5).
        data_end: The reply after the final dot (4.5.3.2.6).
        command: The reply to every other command.
    """

    greeting: float = attrs.field(default=5 * 60.0, validator=_ABOVE_ZERO)
    mail: float = attrs.field(default=5 * 60.0, validator=_ABOVE_ZERO)
    rcpt: float = attrs.field(default=5 * 60.0, validator=_ABOVE_ZERO)
    data_init: float = attrs.field(default=2 * 60.0, validator=_ABOVE_ZERO)
    data_block: float = attrs.field(default=3 * 60.0, validator=_ABOVE_ZERO)
    data_end: float = attrs.field(default=10 * 60.0, validator=_ABOVE_ZERO)
    command: float = attrs.field(default=5 * 60.0, validator=_ABOVE_ZERO)

    def for_phase(self, phase: Phase) -> float:
        """Return the seconds to wait for the reply of `phase`, or its data send."""
        return getattr(self, _TIMEOUT_FIELDS.get(phase, "command"))


_TIMEOUT_FIELDS = {
    Phase.GREETING: "greeting",
    Phase.MAIL: "mail",
    Phase.RCPT: "rcpt",
    Phase.DATA: "data_init",
    Phase.DATA_BLOCK: "data_block",
    Phase.DATA_END: "data_end",
}
RFC_TIMEOUTS = ClientTimeouts()

# Lenient reply limits: RFC 5321 4.5.3.1.5 allows 512 octets per line.
MAX_ACCEPTED_REPLY_LINE = 4096
MAX_REPLY_LINES = 200

# Commands that must end a pipelined group: RFC 2920 3.1 lists EHLO, DATA,
# QUIT and NOOP. HELO, STARTTLS and AUTH change the session state too.
_GROUP_ENDERS = frozenset(
    {
        Phase.EHLO,
        Phase.HELO,
        Phase.STARTTLS,
        Phase.AUTH,
        Phase.DATA,
        Phase.NOOP,
        Phase.QUIT,
    }
)
# The only 3xx replies a client can act on.
_INTERMEDIATE = {Phase.DATA: 354, Phase.AUTH: 334}

# MAIL and RCPT parameters go out only when the server advertised the
# extension that defines them. Other keywords need an extension of the
# same name.
_PARAMETER_EXTENSIONS = {
    "SIZE": "SIZE",  # RFC 1870
    "BODY": "8BITMIME",  # RFC 6152
    "SMTPUTF8": "SMTPUTF8",  # RFC 6531
    "RET": "DSN",  # RFC 3461
    "ENVID": "DSN",
    "NOTIFY": "DSN",
    "ORCPT": "DSN",
    "AUTH": "AUTH",  # RFC 4954 5, the MAIL AUTH= parameter
}
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# RFC 5321 4.1.2 esmtp-value, plus non-ASCII as RFC 6531 3.3 allows.
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+")


def timeout_for(phase: Phase) -> float:
    """Return the RFC 5321 4.5.3.2 timeout in seconds for a reply or data send."""
    return RFC_TIMEOUTS.for_phase(phase)


class ClientState(enum.Enum):
    """Phase of a client session."""

    GREETING = "GREETING"  # waiting for the server's greeting
    READY = "READY"  # commands may be sent
    TLS_HANDSHAKE = "TLS_HANDSHAKE"  # STARTTLS got 220: wrap, then reset_after_tls
    DATA = "DATA"  # after the 354: message data, then end_message
    CLOSED = "CLOSED"  # after QUIT, a 421 or the end of input


class _ReplyReader:
    """Splitter of received bytes into complete, possibly multi-line replies."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.complete = 0  # replies returned so far
        self._lines: list[tuple[int, str | None, str]] = []

    def next_reply(self) -> Reply | None:
        """Return the next complete reply, or None when more input is needed."""
        for _ in range(MAX_REPLY_LINES + 1):
            line = self._take_line()
            if line is None:
                return None
            code, is_last, status, text = parse_reply_line(line)
            self._add_line(code, status, text)
            if is_last:
                self.complete += 1
                return self._build()
        raise RemoteProtocolError(f"invalid reply: more than {MAX_REPLY_LINES} lines")

    def clear(self) -> None:
        """Discard every buffered octet and any partial multi-line reply."""
        self.buffer.clear()
        self._lines.clear()

    def _take_line(self) -> bytes | None:
        # A bare LF is accepted as a line end (lenient), and the CR of a CRLF
        # is removed here.
        end = self.buffer.find(b"\n", 0, MAX_ACCEPTED_REPLY_LINE)
        if end < 0:
            if len(self.buffer) >= MAX_ACCEPTED_REPLY_LINE:
                raise RemoteProtocolError(
                    f"reply line longer than {MAX_ACCEPTED_REPLY_LINE} octets"
                    f" (RFC 5321 allows {MAX_REPLY_LINE}):"
                    f" {show(bytes(self.buffer[:40]))}"
                )
            return None
        line = bytes(self.buffer[:end]).removesuffix(b"\r")
        del self.buffer[: end + 1]
        return line

    def _add_line(self, code: int, status: str | None, text: str) -> None:
        # RFC 5321 4.2.1: every line of a multi-line reply has the same code.
        if self._lines and code != self._lines[0][0]:
            first = self._lines[0][0]
            self._lines.clear()
            raise RemoteProtocolError(
                f"invalid multi-line reply: it mixes codes {first} and {code},"
                " but all lines must carry the same code"
            )
        # RFC 5321 4.2: the second digit is 0-5, so 559 is the highest code.
        if code > 559:
            raise RemoteProtocolError(f"invalid reply code {code}: must be 200-559")
        self._lines.append((code, status, text))

    def _build(self) -> Reply:
        code, status, _ = self._lines[0]
        texts = tuple(text for _, _, text in self._lines)
        self._lines.clear()
        return Reply(code, status, texts)


def parse_extensions(reply: Reply) -> dict[str, str]:
    """Parse a 250 EHLO reply into upper-case keyword -> parameter text.

    The first line is the server's greeting; each later line is one
    extension keyword with optional parameters (RFC 5321 4.1.1.1). The
    pre-standard "AUTH=LOGIN PLAIN" form, which some servers send as well
    for old clients, is merged into AUTH. Lines that do not start with a valid
    keyword are skipped.
    """
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, parameter = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            parameter = f"{keyword[5:]} {parameter}"
            keyword = "AUTH"
        if not _KEYWORD.fullmatch(keyword):
            continue
        if keyword == "AUTH" and keyword in extensions:
            parameter = f"{extensions[keyword]} {parameter}"
        extensions[keyword] = " ".join(parameter.split())
    return extensions


def format_parameters(params: dict[str, str | None]) -> str:
    """Format ESMTP parameters as " KEY=value KEY" for a MAIL or RCPT line.

    Raises:
        LocalProtocolError: a keyword or value is not valid esmtp syntax.
    """
    words = []
    for keyword, value in params.items():
        if not _KEYWORD.fullmatch(keyword):
            raise LocalProtocolError(f"invalid ESMTP parameter keyword {keyword!r}")
        if value is None:
            words.append(f" {keyword}")
            continue
        if not _VALUE.fullmatch(value):
            raise LocalProtocolError(
                f"invalid value {value!r} for ESMTP parameter {keyword}: needs"
                " printable characters without spaces or '='"
            )
        words.append(f" {keyword}={value}")
    return "".join(words)


def _encode_base64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class ClientConnection:
    """State machine for one SMTP client session; see the module docstring.

    ``extensions`` maps each keyword of the last EHLO reply (upper case) to
    its parameter text; it is empty after HELO, a failed EHLO and
    ``reset_after_tls``.
    """

    def __init__(
        self,
        *,
        local_hostname: str,
        expect_greeting: bool = True,
        timeouts: ClientTimeouts = RFC_TIMEOUTS,
    ) -> None:
        """Create a session.

        Args:
            local_hostname: the name sent with EHLO or HELO, a domain or an
                address literal such as "[192.0.2.1]".
            expect_greeting: false when the session starts without a 220,
                e.g. on a connection that already carried one.
            timeouts: the waits that ``timeout`` reports for each phase.
        """
        if not local_hostname or any(c in local_hostname for c in " \r\n\0"):
            raise LocalProtocolError(
                f"local_hostname {local_hostname!r} must be one word, e.g."
                " mail.example.org"
            )
        self.local_hostname = local_hostname
        self.timeouts = timeouts
        self.extensions: dict[str, str] = {}
        self.extended = False
        self.tls_active = False
        self.authenticated = False
        self._reader = _ReplyReader()
        self._output = bytearray()
        self._pending: collections.deque[Phase] = collections.deque()
        self._auth_responses: collections.deque[str] = collections.deque()
        self._stuffer: DotStuffer | None = None
        self._eof = False
        self._state = ClientState.READY
        if expect_greeting:
            self._state = ClientState.GREETING
            self._pending.append(Phase.GREETING)

    # Public read-only state.

    @property
    def state(self) -> ClientState:
        """Current phase of the session."""
        return self._state

    @property
    def pending(self) -> tuple[Phase, ...]:
        """Commands whose replies have not arrived yet, oldest first."""
        return tuple(self._pending)

    @property
    def timeout(self) -> float:
        """Seconds to wait for the next reply or data send (RFC 5321 4.5.3.2)."""
        if self._state is ClientState.DATA:
            return self.timeouts.for_phase(Phase.DATA_BLOCK)
        if self._pending:
            return self.timeouts.for_phase(self._pending[0])
        return self.timeouts.command

    def supports(self, keyword: str) -> bool:
        """Return whether the last EHLO reply advertised keyword."""
        return keyword.upper() in self.extensions

    @property
    def max_size(self) -> int | None:
        """SIZE limit in octets from the EHLO reply; None if absent or 0."""
        words = self.extensions.get("SIZE", "").split()
        if words and words[0].isascii() and words[0].isdigit():
            return int(words[0]) or None
        return None

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        """SASL mechanisms the server advertised with AUTH, upper case."""
        return frozenset(self.extensions.get("AUTH", "").upper().split())

    # Input and output.

    @property
    def replies_received(self) -> int:
        """Count of complete replies parsed so far, for per-reply deadlines."""
        return self._reader.complete

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; b"" means the server closed its side.

        Raises:
            LocalProtocolError: called after b"", or between the 220 to
                STARTTLS and ``reset_after_tls``.
        """
        if self._eof:
            raise LocalProtocolError("receive_data called after end of input (b'')")
        if self._state is ClientState.TLS_HANDSHAKE:
            raise LocalProtocolError(
                "receive_data called before reset_after_tls: input before the"
                " TLS handshake must be discarded"
            )
        if not data:
            self._eof = True
        else:
            self._reader.buffer += data

    def data_to_send(self) -> bytes:
        """Return and clear the queued command and message bytes."""
        out = bytes(self._output)
        self._output.clear()
        return out

    def next_reply(self) -> Reply | NeedData:
        """Parse the next complete reply from the received bytes.

        Returns:
            The reply, or NEED_DATA: send ``data_to_send()``, then feed
            more input.

        Raises:
            RemoteProtocolError: the reply is malformed, unexpected, or the
                server closed the connection while a reply was pending.
            LocalProtocolError: called during the TLS handshake.
        """
        if self._state is ClientState.TLS_HANDSHAKE:
            raise LocalProtocolError("call reset_after_tls before next_reply")
        reply = self._reader.next_reply()
        if reply is None:
            if self._eof:
                self._state = ClientState.CLOSED
                raise RemoteProtocolError(self._closed_message())
            return NEED_DATA
        return self._handle_reply(reply)

    def reset_after_tls(self) -> None:
        """Forget the session state after the TLS handshake (RFC 3207 4.2).

        Buffered input is discarded, extensions and authentication are
        forgotten, and the driver must send EHLO again.
        """
        self._require_state(ClientState.TLS_HANDSHAKE, "reset_after_tls")
        self._reader.clear()
        self._forget_extensions()
        self.authenticated = False
        self.tls_active = True
        self._state = ClientState.READY

    # Session commands.

    def send_ehlo(self) -> None:
        """Queue EHLO; a 2xx reply fills ``extensions``."""
        self._send_command(Phase.EHLO, f"EHLO {self.local_hostname}")
        self._forget_extensions()

    def send_helo(self) -> None:
        """Queue HELO, e.g. after the server rejected EHLO with 5xx."""
        self._send_command(Phase.HELO, f"HELO {self.local_hostname}")
        self._forget_extensions()

    def send_starttls(self) -> None:
        """Queue STARTTLS; after its 220 wrap the connection in TLS.

        Raises:
            LocalProtocolError: TLS is already active (RFC 3207 4.2).
        """
        if self.tls_active:
            raise LocalProtocolError("STARTTLS sent twice: TLS is already active")
        self._send_command(Phase.STARTTLS, "STARTTLS")

    def send_auth_plain(self, username: str, password: str, authzid: str = "") -> None:
        """Queue AUTH PLAIN with its initial response (RFC 4616, RFC 4954 4).

        Raises:
            LocalProtocolError: a value contains NUL, which PLAIN uses as
                separator. The message never contains the password.
        """
        if "\0" in username or "\0" in password or "\0" in authzid:
            raise LocalProtocolError(
                "AUTH PLAIN user name, password and authzid must not contain NUL"
            )
        # NOTE: AUTH is allowed without TLS; the driver checks tls_active.
        token = _encode_base64(f"{authzid}\0{username}\0{password}")
        self._send_command(Phase.AUTH, f"AUTH PLAIN {token}")
        self._auth_responses.clear()

    def send_auth_login(self, username: str, password: str) -> None:
        """Queue AUTH LOGIN; the engine responds to the two 334 challenges itself.

        Each 334 reply is still returned by ``next_reply``, so the driver
        keeps sending ``data_to_send()`` until 235 or an error arrives.
        """
        self._send_command(Phase.AUTH, "AUTH LOGIN")
        self._auth_responses = collections.deque(
            [_encode_base64(username), _encode_base64(password)]
        )

    def send_rset(self) -> None:
        """Queue RSET."""
        self._send_command(Phase.RSET, "RSET")

    def send_noop(self) -> None:
        """Queue NOOP."""
        self._send_command(Phase.NOOP, "NOOP")

    def send_quit(self) -> None:
        """Queue QUIT; the session closes when its reply arrives."""
        self._send_command(Phase.QUIT, "QUIT")

    # Transaction commands.

    def send_mail(
        self, sender: str, params: dict[str, str | None] | None = None
    ) -> tuple[str, ...]:
        """Queue MAIL FROM:<sender> with the parameters the server supports.

        Args:
            sender: the reverse-path without brackets; "" sends "<>".
            params: ESMTP parameters, upper-case keyword -> value or None.

        Returns:
            The keywords left out because the server did not advertise
            their extension; the caller decides whether that is fatal.
        """
        kept, dropped = self.filter_parameters(params or {})
        _check_path("sender", sender)
        self._send_command(Phase.MAIL, f"MAIL FROM:<{sender}>{format_parameters(kept)}")
        return dropped

    def send_rcpt(
        self, recipient: str, params: dict[str, str | None] | None = None
    ) -> tuple[str, ...]:
        """Queue RCPT TO:<recipient>; returns the dropped keywords like send_mail."""
        kept, dropped = self.filter_parameters(params or {})
        _check_path("recipient", recipient)
        self._send_command(
            Phase.RCPT, f"RCPT TO:<{recipient}>{format_parameters(kept)}"
        )
        return dropped

    def send_data(self) -> None:
        """Queue DATA; message data may only follow its 354 reply."""
        self._send_command(Phase.DATA, "DATA")

    def send_message_data(self, chunk: bytes) -> None:
        """Queue a chunk of message content, dot-stuffed (RFC 5321 4.5.2)."""
        self._require_state(ClientState.DATA, "send_message_data")
        assert self._stuffer is not None
        self._output += self._stuffer.stuff(chunk)

    def end_message(self) -> None:
        """Queue the final CRLF "." CRLF, adding a CRLF if the data lacks one."""
        self._require_state(ClientState.DATA, "end_message")
        assert self._stuffer is not None
        self._output += self._stuffer.finish()
        self._stuffer = None
        self._pending.append(Phase.DATA_END)
        self._state = ClientState.READY

    def filter_parameters(
        self, params: dict[str, str | None]
    ) -> tuple[dict[str, str | None], tuple[str, ...]]:
        """Split params into those the server supports and the dropped keywords.

        Raises:
            LocalProtocolError: a keyword is not valid esmtp-keyword syntax.
        """
        kept: dict[str, str | None] = {}
        dropped = []
        for keyword, value in params.items():
            if not _KEYWORD.fullmatch(keyword):
                raise LocalProtocolError(f"invalid ESMTP parameter keyword {keyword!r}")
            upper = keyword.upper()
            if self.supports(_PARAMETER_EXTENSIONS.get(upper, upper)):
                kept[upper] = value
            else:
                dropped.append(upper)
        return kept, tuple(dropped)

    # Internals: sending.

    def _require_state(self, state: ClientState, call: str) -> None:
        if self._state is not state:
            raise LocalProtocolError(
                f"{call} is only valid in state {state.name}, not {self._state.name}"
            )

    def _send_command(self, phase: Phase, line: str) -> None:
        self._require_state(ClientState.READY, f"sending {phase.name}")
        if self._pending:
            self._check_pipelining(phase)
        if "\r" in line or "\n" in line:
            raise LocalProtocolError(f"{phase.name} command contains CR or LF")
        self._output += line.encode("utf-8") + b"\r\n"
        self._pending.append(phase)

    def _check_pipelining(self, phase: Phase) -> None:
        waiting = self._pending[-1]
        if not self.supports("PIPELINING"):
            raise LocalProtocolError(
                f"cannot send {phase.name} before the reply to {waiting.name}:"
                " the server did not advertise PIPELINING"
            )
        if waiting in _GROUP_ENDERS:
            raise LocalProtocolError(
                f"cannot send {phase.name} before the reply to {waiting.name}:"
                f" {waiting.name} must end a pipelined group (RFC 2920 3.1)"
            )

    def _forget_extensions(self) -> None:
        self.extensions = {}
        self.extended = False

    # Internals: replies.

    def _closed_message(self) -> str:
        if self._pending:
            return (
                "connection closed by the server while waiting for the reply"
                f" to {self._pending[0].name}"
            )
        return "connection closed by the server"

    def _handle_reply(self, reply: Reply) -> Reply:
        if not self._pending:
            # RFC 5321 3.8: a server may send 421 and close at any time.
            if reply.code == 421:
                self._close()
                return reply
            raise RemoteProtocolError(
                f"unexpected reply, no command is waiting: {reply.code}"
                f" {show(reply.text)}"
            )
        phase = self._pending.popleft()
        if reply.code // 100 == 3 and _INTERMEDIATE.get(phase) != reply.code:
            raise RemoteProtocolError(
                f"invalid reply {reply.code} to {phase.name}: {show(reply.text)}"
            )
        handler = _REPLY_HANDLERS.get(phase)
        if handler is not None:
            handler(self, reply)
        if reply.code == 421:
            self._close()
        return reply

    def _close(self) -> None:
        self._pending.clear()
        self._auth_responses.clear()
        self._stuffer = None
        self._state = ClientState.CLOSED

    def _on_greeting(self, reply: Reply) -> None:
        # After a 554 greeting the server still expects QUIT (RFC 5321 3.1),
        # so commands stay possible and the driver checks the code.
        self._state = ClientState.READY

    def _on_ehlo(self, reply: Reply) -> None:
        if reply.code // 100 == 2:
            self.extensions = parse_extensions(reply)
            self.extended = True

    def _on_starttls(self, reply: Reply) -> None:
        if reply.code != 220:
            return
        if self._reader.buffer:
            count = len(self._reader.buffer)
            self._reader.clear()
            self._close()
            raise RemoteProtocolError(
                f"server sent {count} octets after its 220 reply to STARTTLS,"
                " before the TLS handshake; they could be injected replies,"
                " so the session is unsafe"
            )
        self._state = ClientState.TLS_HANDSHAKE

    def _on_auth(self, reply: Reply) -> None:
        if reply.code == 334:
            # RFC 4954 4: "*" cancels an exchange the client cannot continue.
            response = self._auth_responses.popleft() if self._auth_responses else "*"
            self._output += response.encode("ascii") + b"\r\n"
            self._pending.append(Phase.AUTH)
            return
        self._auth_responses.clear()
        if reply.code == 235:
            self.authenticated = True

    def _on_data(self, reply: Reply) -> None:
        if reply.code == 354:
            self._stuffer = DotStuffer()
            self._state = ClientState.DATA

    def _on_quit(self, reply: Reply) -> None:
        self._close()


_REPLY_HANDLERS = {
    Phase.GREETING: ClientConnection._on_greeting,
    Phase.EHLO: ClientConnection._on_ehlo,
    Phase.STARTTLS: ClientConnection._on_starttls,
    Phase.AUTH: ClientConnection._on_auth,
    Phase.DATA: ClientConnection._on_data,
    Phase.QUIT: ClientConnection._on_quit,
}


def _check_path(role: str, address: str) -> None:
    # A path may hold quoted spaces, but CR, LF or NUL would break the line.
    if any(c in address for c in "\r\n\0"):
        raise LocalProtocolError(f"{role} {address!r} contains CR, LF or NUL")


class Transaction:
    """One mail transaction (MAIL, RCPT..., DATA, message) over a ClientConnection.

    The driver calls ``next_action`` in a loop. NEED_DATA means: send
    ``client.data_to_send()``, read, feed ``client.receive_data`` and ask
    again. SendBody means: the server replied 354, so stream the message
    with ``client.send_message_data`` and ``client.end_message``, then ask
    again. A TransactionResult ends the transaction, and every later call
    returns the same result.

    With PIPELINING (RFC 2920) MAIL, every RCPT and DATA go out as one
    group. Without it, each command waits for the previous reply, and DATA
    is only sent once some RCPT got 2xx. When the transaction stops after
    the server accepted MAIL but before the final dot (no recipient
    accepted, or DATA refused), the transaction sends RSET and consumes its
    reply, so the session is ready for the next transaction.
    """

    def __init__(
        self,
        client: ClientConnection,
        sender: str,
        recipients: Iterable[str | tuple[str, dict[str, str | None]]],
        mail_params: dict[str, str | None] | None = None,
    ) -> None:
        """Prepare a transaction; nothing is queued before ``next_action``.

        Args:
            client: a session that has completed EHLO or HELO.
            sender: the reverse-path without brackets, "" for "<>".
            recipients: addresses, or (address, RCPT parameters) pairs.
            mail_params: MAIL parameters such as SIZE, BODY or RET.

        Raises:
            LocalProtocolError: recipients is empty.
        """
        self.client = client
        self.sender = sender
        self.mail_params = dict(mail_params or {})
        self.recipients = tuple(_recipient_pair(item) for item in recipients)
        if not self.recipients:
            raise LocalProtocolError("a transaction needs at least one recipient")
        self.pipelined = False
        self._started = False
        self._expected: collections.deque[Phase] = collections.deque()
        self._mail_reply: Reply | None = None
        self._rcpt_replies: list[Reply] = []
        self._data_reply: Reply | None = None
        self._final_reply: Reply | None = None
        self._closing: Reply | None = None
        self._sending_body = False
        self._result: TransactionResult | None = None

    @property
    def accepted_count(self) -> int:
        """Number of recipients the server accepted at RCPT so far."""
        if not _positive(self._mail_reply):
            return 0
        return sum(1 for reply in self._rcpt_replies if _positive(reply))

    def next_action(self) -> SendBody | TransactionResult | NeedData:
        """Queue commands and consume replies up to the next step for the driver.

        Raises:
            LocalProtocolError: called after SendBody before end_message.
            RemoteProtocolError: from ``ClientConnection.next_reply``; the
                driver may then call ``abort`` for per-recipient results.
        """
        if self._result is not None:
            return self._result
        if not self._started:
            self._start()
            return NEED_DATA
        if self._sending_body:
            if self.client.state is ClientState.DATA:
                raise LocalProtocolError(
                    "call end_message after the message data, before next_action"
                )
            self._sending_body = False
        return self._consume_replies()

    def abort(self, reply: Reply) -> TransactionResult:
        """End the transaction after a connection failure or timeout.

        Recipients already decided keep their replies. Every other
        recipient gets ``reply``, typically a 451, because RFC 5321 3.8
        treats a lost connection as a 451 reply.
        """
        if self._result is None:
            self._closing = reply
            self._result = self._build_result()
        return self._result

    # Internals: sending.

    def _start(self) -> None:
        self._started = True
        self.pipelined = self.client.supports("PIPELINING")
        self._send(Phase.MAIL)
        if self.pipelined:
            for _ in self.recipients:
                self._send(Phase.RCPT)
            self._send(Phase.DATA)

    def _send(self, phase: Phase) -> None:
        client = self.client
        if phase is Phase.MAIL:
            client.send_mail(self.sender, self.mail_params)
        elif phase is Phase.RCPT:
            address, params = self.recipients[self._queued_rcpts()]
            client.send_rcpt(address, params)
        elif phase is Phase.DATA:
            client.send_data()
        else:
            client.send_rset()
        self._expected.append(phase)

    def _queued_rcpts(self) -> int:
        waiting = sum(1 for phase in self._expected if phase is Phase.RCPT)
        return len(self._rcpt_replies) + waiting

    # Internals: replies.

    def _consume_replies(self) -> SendBody | TransactionResult | NeedData:
        # Each pass consumes one reply. A transaction receives one reply per
        # recipient plus at most MAIL, DATA, the final reply and RSET.
        for _ in range(len(self.recipients) + 5):
            reply = self.client.next_reply()
            if reply is NEED_DATA:
                return NEED_DATA
            phase = self._expected.popleft()
            action = self._handle(phase, reply)
            if action is not None:
                return action
        raise LocalProtocolError("transaction consumed more replies than it sent")

    def _handle(
        self, phase: Phase, reply: Reply
    ) -> SendBody | TransactionResult | None:
        _REPLY_SLOTS[phase](self, reply)
        if reply.code == 421:
            # RFC 5321 3.8: the server closes, so no further replies come.
            self._closing = reply
            return self._finish()
        if phase is Phase.MAIL and not self.pipelined:
            return self._after_unpipelined_mail(reply)
        if phase is Phase.RCPT and not self.pipelined:
            return self._after_unpipelined_rcpt()
        if phase is Phase.DATA:
            return self._after_data(reply)
        if phase in (Phase.DATA_END, Phase.RSET):
            return self._finish()
        return None

    def _after_unpipelined_mail(self, reply: Reply) -> TransactionResult | None:
        if not _positive(reply):
            return self._finish()
        self._send(Phase.RCPT)
        return None

    def _after_unpipelined_rcpt(self) -> TransactionResult | None:
        if len(self._rcpt_replies) < len(self.recipients):
            self._send(Phase.RCPT)
        elif self.accepted_count:
            self._send(Phase.DATA)
        else:
            # DATA would only get 503 or 554 (RFC 5321 3.3), so RSET closes
            # the transaction that MAIL opened.
            self._send(Phase.RSET)
        return None

    def _after_data(self, reply: Reply) -> SendBody | TransactionResult | None:
        if reply.code == 354 and self.accepted_count:
            self._sending_body = True
            self._expected.append(Phase.DATA_END)
            return SendBody()
        if reply.code == 354:
            # A server that replies 354 although every RCPT failed gets an
            # empty message, so no content reaches it.
            self.client.end_message()
            self._expected.append(Phase.DATA_END)
            return None
        if _positive(self._mail_reply):
            self._send(Phase.RSET)
            return None
        return self._finish()

    def _store_mail(self, reply: Reply) -> None:
        self._mail_reply = reply

    def _store_rcpt(self, reply: Reply) -> None:
        self._rcpt_replies.append(reply)

    def _store_data(self, reply: Reply) -> None:
        self._data_reply = reply

    def _store_final(self, reply: Reply) -> None:
        self._final_reply = reply

    def _ignore(self, reply: Reply) -> None:
        pass

    # Internals: results.

    def _finish(self) -> TransactionResult:
        self._expected.clear()
        self._result = self._build_result()
        return self._result

    def _build_result(self) -> TransactionResult:
        results = tuple(
            self._decide(index, address)
            for index, (address, _) in enumerate(self.recipients)
        )
        return TransactionResult(
            results=results,
            mail_reply=self._mail_reply,
            rcpt_replies=tuple(self._rcpt_replies),
            data_reply=self._data_reply,
            final_reply=self._final_reply,
        )

    def _decide(self, index: int, address: str) -> RcptResult:
        """Return the first reply that settled this recipient's fate."""
        rcpt = self._rcpt_replies[index] if index < len(self._rcpt_replies) else None
        steps = (
            (Phase.MAIL, self._mail_reply, _positive),
            (Phase.RCPT, rcpt, _positive),
            (Phase.DATA, self._data_reply, lambda reply: reply.code == 354),
            (Phase.DATA_END, self._final_reply, lambda reply: False),
        )
        for phase, reply, passed in steps:
            if reply is None:
                closing = self._closing
                if closing is None:
                    raise LocalProtocolError("transaction result built too early")
                return RcptResult(address, closing, phase)
            if not passed(reply):
                return RcptResult(address, reply, phase)
        raise AssertionError("unreachable: the DATA_END step never passes")


_REPLY_SLOTS = {
    Phase.MAIL: Transaction._store_mail,
    Phase.RCPT: Transaction._store_rcpt,
    Phase.DATA: Transaction._store_data,
    Phase.DATA_END: Transaction._store_final,
    Phase.RSET: Transaction._ignore,
}


def _positive(reply: Reply | None) -> bool:
    return reply is not None and reply.code // 100 == 2


def _recipient_pair(
    item: str | tuple[str, dict[str, str | None]],
) -> tuple[str, dict[str, str | None]]:
    if isinstance(item, str):
        return item, {}
    address, params = item
    return address, dict(params)
