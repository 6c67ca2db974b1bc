"""Sans-IO SMTP server engine (RFC 5321 with PIPELINING, SIZE, 8BITMIME,
SMTPUTF8, ENHANCEDSTATUSCODES, DSN parameters, ETRN, STARTTLS and AUTH).

Theory of operation. The driver feeds received bytes to ``receive_data``
and calls ``next_event`` until it returns NEED_DATA, then sends
``data_to_send()`` and reads more. The engine answers most commands
itself and queues the replies. For MAIL, RCPT, the end of a message and
ETRN it returns an event and stops until the driver calls ``send_reply``,
because only the driver knows the relay policy and the spool. Commands
are handled strictly in order: while a reply is owed, pipelined input
stays in the buffer (RFC 2920 3.1).

The command buffer never holds more than the longest allowed command
line (12288 octets for AUTH lines and SASL responses, RFC 4954 4) plus
what the driver fed since the last NEED_DATA. An over-long line
is discarded as it arrives, and once its CRLF comes it gets exactly one
500 5.5.6. In the DATA state every received byte goes straight to the
DotReader, which returns message content as MessageData events and keeps
at most four octets.

When the peer closes the connection (``receive_data(b"")``) the engine
returns ConnectionClosed once the complete lines before the EOF have been
handled. In the DATA state it first returns MessageAborted carrying a 451
reply that is never sent, so the driver discards the partial message on
the same path as any rejected message.

STARTTLS (RFC 3207) returns StartTls after queueing the 220 and drops
every byte buffered behind the command: a client (or an attacker in the
path) may have pipelined plaintext commands after STARTTLS, and those
must never run as if they came over TLS. Input fed before the driver
calls ``tls_started`` is dropped too. ``tls_started`` then forgets the
EHLO name, the transaction and any AUTH, so the client must greet again.

AUTH (RFC 4954) runs the mechanisms of ``trimta.smtp.sasl``. While an
exchange is open the engine is in the AUTH state and reads each line as
a base64 response. When the mechanism has credentials, the engine
returns AuthAttempt, and the driver checks them and replies 235 or 535.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable

import attrs

from trimta.smtp import replies, sasl
from trimta.smtp.address import (
    Address,
    AddressError,
    normalize_domain,
    parse_address_literal,
)
from trimta.smtp.dotstuff import DotReader, Problem
from trimta.smtp.errors import LocalProtocolError, RemoteProtocolError
from trimta.smtp.events import (
    NEED_DATA,
    Atrn,
    AuthAttempt,
    NeedData,
    ConnectionClosed,
    DataStarted,
    Ehlo,
    EndOfMessage,
    Etrn,
    Event,
    MailFrom,
    MessageAborted,
    MessageData,
    Quit,
    RcptTo,
    StartTls,
)
from trimta.smtp.parse import (
    MAX_ANY_COMMAND_LINE,
    MAX_COMMAND_LINE,
    max_line_length,
    parse_command,
    parse_mail_argument,
    parse_rcpt_argument,
    split_path_argument,
)
from trimta.smtp.replies import Reply


class State(enum.Enum):
    """Phase of a server session."""

    GREETING = "GREETING"  # before send_greeting or refuse_session
    COMMAND = "COMMAND"
    DATA = "DATA"  # between the 354 and the final dot
    STARTTLS = "STARTTLS"  # after the 220 to STARTTLS, until the handshake ends
    AUTH = "AUTH"  # reading SASL responses after a 334
    CLOSED = "CLOSED"


@attrs.frozen
class ServerSettings:
    """Settings of one server session.

    ``hostname`` is the name used in the greeting, EHLO and 221 replies.
    ``max_message_size`` is in octets, advertised with SIZE; 0 means no
    limit. ``max_recipients`` caps accepted RCPTs per transaction (RFC 5321
    4.5.3.1.8 requires at least 100). After ``max_errors`` syntax or
    sequence errors or failed AUTH attempts the session ends with 421
    4.7.0. ``etrn`` advertises ETRN; without it ETRN gets 502.

    ``starttls`` offers STARTTLS before TLS is active. ``auth_mechanisms``
    lists the SASL mechanisms (names from ``sasl.MECHANISMS``) offered;
    empty means AUTH gets 502. PLAIN and LOGIN are offered only over TLS
    unless ``allow_plaintext_auth`` is set. ``require_auth`` rejects MAIL
    before a successful AUTH with 530 (RFC 6409 submission).
    """

    hostname: str
    max_message_size: int = 10_240_000
    max_recipients: int = 100
    max_errors: int = 20
    etrn: bool = False
    greeting_text: str = "ESMTP trimta"
    starttls: bool = False
    auth_mechanisms: tuple[str, ...] = ()
    allow_plaintext_auth: bool = False
    require_auth: bool = False
    odmr: bool = False


class _LineTooLong(enum.Enum):
    LINE_TOO_LONG = "LINE_TOO_LONG"


_LINE_TOO_LONG = _LineTooLong.LINE_TOO_LONG

_PROBLEM_REPLIES = {
    Problem.BARE_LINE_ENDING: lambda reader: replies.bad_line_ending(),
    Problem.TOO_BIG: lambda reader: replies.too_big(reader.max_size),
    Problem.LINE_TOO_LONG: lambda reader: replies.text_line_too_long(),
    Problem.MAIL_LOOP: lambda reader: replies.mail_loop(reader.received_headers),
}


class ServerConnection:
    """State machine for one SMTP server session; see the module docstring."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        secure: bool = False,
        cram_challenge: Callable[[], bytes] | None = None,
    ) -> None:
        """Create a session in the GREETING state.

        Args:
            settings: Protocol settings of the listener.
            secure: TLS is already active (implicit TLS on accept).
            cram_challenge: Makes each CRAM-MD5 challenge; the driver
                passes one that includes the time (RFC 2195 2). The
                default uses a timestamp of 0 because the engine reads
                no clock.
        """
        self.settings = settings
        self._secure = secure
        self._cram_challenge = cram_challenge or (
            lambda: sasl.new_cram_challenge(settings.hostname, 0)
        )
        self._auth_user: str | None = None
        self._mechanism: sasl.Mechanism | None = None
        self._state = State.GREETING
        self._input = bytearray()
        self._scan_from = 0  # offset in _input where the CRLF search resumes
        self._discard_limit = 0  # nonzero while an over-long line is skipped
        self._eof = False
        self._output = bytearray()
        self._events: collections.deque[Event] = collections.deque()
        self._awaiting: Event | None = None
        self._errors = 0
        self._helo_name: str | None = None
        self._extended = False
        self._reader: DotReader | None = None
        self._reset_transaction()

    # Public read-only state.

    @property
    def state(self) -> State:
        """Current phase of the session."""
        return self._state

    @property
    def awaiting_reply(self) -> bool:
        """Whether the driver owes a reply to the last event."""
        return self._awaiting is not None

    @property
    def helo_name(self) -> str | None:
        """Client name from the last successful EHLO or HELO."""
        return self._helo_name

    @property
    def extended(self) -> bool:
        """Whether the client greeted with EHLO rather than HELO."""
        return self._extended

    @property
    def secure(self) -> bool:
        """Whether TLS is active on the connection."""
        return self._secure

    @property
    def auth_user(self) -> str | None:
        """User name of the successful AUTH, or None before one."""
        return self._auth_user

    @property
    def in_transaction(self) -> bool:
        """Whether a MAIL command was accepted and the transaction is open."""
        return self._in_transaction

    @property
    def sender(self) -> Address | None:
        """Accepted reverse-path; None for ``<>`` or outside a transaction."""
        return self._sender

    @property
    def mail_params(self) -> dict[str, str | None]:
        """ESMTP parameters of the accepted MAIL command."""
        return dict(self._mail_params)

    @property
    def recipients(self) -> tuple[Address, ...]:
        """Recipients accepted so far in this transaction."""
        return tuple(self._recipients)

    @property
    def recipient_params(self) -> tuple[dict[str, str | None], ...]:
        """ESMTP parameters of each accepted recipient, in the same order."""
        return tuple(dict(params) for params in self._recipient_params)

    # Driver API.

    def send_greeting(self) -> None:
        """Queue the 220 greeting and start reading commands."""
        self._require_state(State.GREETING, "send_greeting")
        settings = self.settings
        self._queue(replies.greeting(settings.hostname, settings.greeting_text))
        self._state = State.COMMAND

    def refuse_session(self, reply: Reply) -> None:
        """Queue a 421 or 554 in place of the greeting and close the session."""
        self._require_state(State.GREETING, "refuse_session")
        self._queue(reply)
        self._state = State.CLOSED

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; b"" means the peer closed its side."""
        if self._eof:
            raise LocalProtocolError("receive_data called after end of input (b'')")
        if not data:
            self._eof = True
        elif self._state not in (State.CLOSED, State.STARTTLS):
            # RFC 3207 4.2 (CVE-2011-0411): bytes that arrive before the
            # handshake ends are plaintext and must never be run.
            self._input += data

    def next_event(self) -> Event | NeedData:
        """Handle buffered input up to the next event for the driver.

        Returns:
            An event, or NEED_DATA when all buffered input is handled.

        Raises:
            LocalProtocolError: a reply is still owed, or the greeting was
                not sent yet.
        """
        if self._awaiting is not None:
            raise LocalProtocolError(
                f"send_reply is owed for {type(self._awaiting).__name__}"
            )
        if self._events:
            return self._pop_event()
        if self._state is State.GREETING:
            raise LocalProtocolError("call send_greeting or refuse_session first")
        if self._state is State.DATA:
            return self._next_data_event()
        if self._state in (State.COMMAND, State.AUTH):
            return self._next_command_event()
        if self._state is State.STARTTLS:
            raise LocalProtocolError("call tls_started or tls_failed after StartTls")
        return ConnectionClosed()

    def send_reply(self, reply: Reply) -> None:
        """Answer the pending MailFrom, RcptTo, EndOfMessage, Etrn or AuthAttempt.

        A 2xx reply to MailFrom opens the transaction and a 2xx reply to
        RcptTo adds the recipient. Any reply to EndOfMessage ends the
        transaction. A 235 to AuthAttempt authenticates the session, and
        a 5xx to it counts against ``max_errors``. A 421 reply also closes
        the session (RFC 5321 3.8).

        Raises:
            LocalProtocolError: no event is waiting, or reply is 3xx.
        """
        event = self._awaiting
        if event is None:
            raise LocalProtocolError(
                "send_reply called but no event is waiting for a reply"
            )
        if reply.code // 100 == 3:
            raise LocalProtocolError(
                f"a {reply.code} reply cannot answer {type(event).__name__}"
            )
        self._awaiting = None
        if isinstance(event, AuthAttempt) and reply.code // 100 == 5:
            self._reject(reply)
        else:
            self._queue(reply)
        if reply.code // 100 == 2:
            self._apply_success(event)
        if isinstance(event, EndOfMessage):
            self._reset_transaction()
        if reply.code == 421:
            self._state = State.CLOSED
        if isinstance(event, Atrn) and reply.code // 100 == 2:
            # RFC 2645 4.3: after 250 the roles reverse; whatever the client
            # pipelined behind ATRN is not ours to read.
            self._input.clear()
            self._state = State.CLOSED

    def tls_started(self) -> None:
        """Record a finished TLS handshake and reset the session (RFC 3207 4.2).

        The client must send EHLO again, and any transaction or AUTH from
        before the handshake is forgotten.
        """
        self._require_state(State.STARTTLS, "tls_started")
        self._secure = True
        self._helo_name, self._extended = None, False
        self._auth_user = None
        self._reset_transaction()
        self._state = State.COMMAND

    def tls_failed(self) -> None:
        """Close the session after a failed TLS handshake, sending nothing."""
        self._require_state(State.STARTTLS, "tls_failed")
        self._state = State.CLOSED

    def close(self, reply: Reply) -> None:
        """Queue a closing reply (e.g. 421 4.4.2 timeout) and end the session."""
        if self._state is State.CLOSED:
            raise LocalProtocolError("close called on a closed session")
        self._awaiting = None
        self._mechanism = None
        self._events.clear()
        self._queue(reply)
        self._state = State.CLOSED

    def data_to_send(self) -> bytes:
        """Return and clear the queued reply bytes."""
        out = bytes(self._output)
        self._output.clear()
        return out

    # Internals: bookkeeping.

    def _require_state(self, state: State, call: str) -> None:
        if self._state is not state:
            raise LocalProtocolError(
                f"{call} is only valid in state {state.name}, not {self._state.name}"
            )

    def _queue(self, reply: Reply) -> None:
        self._output += reply.to_bytes()

    def _reject(self, reply: Reply) -> ConnectionClosed | None:
        """Queue an error reply that counts against max_errors."""
        self._queue(reply)
        self._errors += 1
        if self._errors < self.settings.max_errors:
            return None
        self._queue(replies.too_many_errors())
        self._state = State.CLOSED
        return ConnectionClosed()

    def _reset_transaction(self) -> None:
        """Clear the mail transaction (RSET, EHLO, HELO, end of message)."""
        self._in_transaction = False
        self._sender: Address | None = None
        self._mail_params: dict[str, str | None] = {}
        self._utf8 = False
        self._rcpt_seen = False
        self._recipients: list[Address] = []
        self._recipient_params: list[dict[str, str | None]] = []

    def _apply_success(self, event: Event) -> None:
        if isinstance(event, MailFrom):
            self._in_transaction = True
            self._sender = event.sender
            self._mail_params = dict(event.params)
            self._utf8 = "SMTPUTF8" in event.params
        elif isinstance(event, RcptTo):
            self._recipients.append(event.recipient)
            self._recipient_params.append(dict(event.params))
        elif isinstance(event, AuthAttempt):
            self._auth_user = event.credentials.username

    def _pop_event(self) -> Event:
        event = self._events.popleft()
        if isinstance(event, EndOfMessage):
            self._awaiting = event
        return event

    def _await(self, event: Event) -> Event:
        self._awaiting = event
        return event

    # Internals: command phase.

    def _next_command_event(self) -> Event | NeedData:
        while self._state in (State.COMMAND, State.AUTH):
            line = self._take_line()
            if line is None:
                if not self._eof:
                    return NEED_DATA
                self._state = State.CLOSED
                return ConnectionClosed()
            event = self._handle_line(line)
            if event is not None:
                return event
        return self.next_event()

    def _take_line(self) -> bytes | _LineTooLong | None:
        """Remove one CRLF-terminated line from the input buffer."""
        buffer = self._input
        index = buffer.find(b"\r\n", self._scan_from)
        if index < 0:
            self._skip_long_line()
            return None
        line = bytes(buffer[:index])
        del buffer[: index + 2]
        self._scan_from = 0
        if self._discard_limit:
            return _LINE_TOO_LONG
        return line

    def _skip_long_line(self) -> None:
        """Drop the start of a line that can no longer fit (memory bound)."""
        buffer = self._input
        # Every limit is at least MAX_ANY_COMMAND_LINE, so a shorter buffer
        # needs no look at its verb.
        if not self._discard_limit and len(buffer) >= MAX_ANY_COMMAND_LINE:
            limit = self._line_limit(buffer)
            if len(buffer) >= limit:
                self._discard_limit = limit
        if self._discard_limit:
            # Keep a final CR: it may pair with an LF in the next input.
            keep = 1 if buffer.endswith(b"\r") else 0
            del buffer[: len(buffer) - keep]
        self._scan_from = max(0, len(buffer) - 1)

    def _line_limit(self, line: bytes | bytearray) -> int:
        """Return the length limit, CRLF included, for the line being read."""
        if self._state is State.AUTH:
            return sasl.MAX_RESPONSE_LINE
        return _line_limit(line)

    def _handle_line(self, line: bytes | _LineTooLong) -> Event | None:
        if self._state is State.AUTH:
            return self._handle_auth_line(line)
        if line is _LINE_TOO_LONG:
            limit, self._discard_limit = self._discard_limit, 0
            return self._reject(replies.line_too_long(limit))
        # The length check comes first so that the reply is the same
        # whether the line arrived whole or was discarded piecemeal.
        if len(line) + 2 > MAX_COMMAND_LINE:
            limit = _line_limit(line)
            if len(line) + 2 > limit:
                return self._reject(replies.line_too_long(limit))
        # RFC 5321 2.3.8: CR and LF only appear together as the line end.
        if b"\r" in line or b"\n" in line:
            return self._reject(replies.bare_line_ending_in_command())
        try:
            command = parse_command(line)
        except RemoteProtocolError as error:
            return self._reject(error.reply)
        handler = _COMMANDS.get(command.verb)
        if handler is None:
            return self._reject(replies.unknown_command(command.verb))
        try:
            return handler(self, command.argument)
        except RemoteProtocolError as error:
            return self._reject(error.reply)

    # Command handlers: each returns an event or None, and raises
    # RemoteProtocolError with the reply for a syntax error.

    def _do_ehlo(self, argument: str) -> Event | None:
        return self._greet(argument, extended=True)

    def _do_helo(self, argument: str) -> Event | None:
        return self._greet(argument, extended=False)

    def _greet(self, argument: str, *, extended: bool) -> Event | None:
        verb = "EHLO" if extended else "HELO"
        _check_client_name(verb, argument)
        # RFC 5321 4.1.4: a later EHLO or HELO resets like RSET.
        self._reset_transaction()
        self._helo_name, self._extended = argument, extended
        hostname = self.settings.hostname
        if extended:
            self._queue(replies.ehlo_ok(hostname, argument, self._extensions()))
        else:
            self._queue(replies.helo_ok(hostname, argument))
        return Ehlo(argument, extended)

    def _extensions(self) -> list[str]:
        keywords = [
            "PIPELINING",
            f"SIZE {self.settings.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
        ]
        if self.settings.etrn:
            keywords.append("ETRN")
        if self.settings.odmr:
            keywords.append("ATRN")
        if self.settings.starttls and not self._secure:
            keywords.append("STARTTLS")
        mechanisms = self._offered_mechanisms()
        if mechanisms:
            keywords.append("AUTH " + " ".join(mechanisms))
        return keywords

    def _offered_mechanisms(self) -> list[str]:
        """List the mechanisms usable now: PLAIN and LOGIN need TLS or a waiver."""
        plaintext_ok = self._secure or self.settings.allow_plaintext_auth
        return [
            name
            for name in self.settings.auth_mechanisms
            if plaintext_ok or name not in sasl.PLAINTEXT_MECHANISMS
        ]

    def _do_mail(self, argument: str) -> Event | None:
        if self.settings.odmr:
            return self._reject(replies.odmr_no_mail("MAIL"))
        if self._helo_name is None:
            return self._reject(replies.bad_sequence("send EHLO or HELO before MAIL"))
        if self._in_transaction:
            text = "nested MAIL: a transaction is already open, send RSET first"
            return self._reject(replies.bad_sequence(text))
        if self.settings.require_auth and self._auth_user is None:
            return self._reject(replies.auth_required())
        if self.settings.auth_mechanisms:
            argument = _drop_auth_parameter(argument)
        sender, params = parse_mail_argument(argument)
        limit = self.settings.max_message_size
        # RFC 1870 6.1: refuse a declared size over the limit at MAIL.
        if limit and int(params.get("SIZE") or 0) > limit:
            self._queue(replies.too_big(limit))
            return None
        return self._await(MailFrom(sender, params))

    def _do_rcpt(self, argument: str) -> Event | None:
        if self.settings.odmr:
            return self._reject(replies.odmr_no_mail("RCPT"))
        if not self._in_transaction:
            return self._reject(replies.bad_sequence("send MAIL FROM before RCPT TO"))
        self._rcpt_seen = True
        recipient, params = parse_rcpt_argument(argument, utf8=self._utf8)
        limit = self.settings.max_recipients
        if len(self._recipients) >= limit:
            # RFC 5321 4.5.3.1.10: 452, so that the client retries later.
            self._queue(replies.too_many_recipients(limit))
            return None
        return self._await(RcptTo(recipient, params))

    def _do_data(self, argument: str) -> Event | None:
        if self.settings.odmr:
            return self._reject(replies.odmr_no_mail("DATA"))
        _check_no_argument("DATA", argument)
        if not self._in_transaction:
            return self._reject(
                replies.bad_sequence("send MAIL FROM and RCPT TO before DATA")
            )
        if not self._rcpt_seen:
            return self._reject(replies.bad_sequence("send RCPT TO before DATA"))
        if not self._recipients:
            # RFC 2920 3.1: never 354 when every RCPT was rejected.
            self._queue(replies.no_valid_recipients())
            return None
        self._queue(replies.start_mail_input())
        self._reader = DotReader(self.settings.max_message_size)
        self._state = State.DATA
        return DataStarted()

    def _do_rset(self, argument: str) -> Event | None:
        _check_no_argument("RSET", argument)
        self._reset_transaction()
        self._queue(replies.ok("reset"))
        return None

    def _do_noop(self, argument: str) -> Event | None:
        self._queue(replies.ok())
        return None

    def _do_vrfy(self, argument: str) -> Event | None:
        if not argument.strip():
            raise _syntax("VRFY needs a user name or mailbox")
        self._queue(replies.cannot_verify())
        return None

    def _do_help(self, argument: str) -> Event | None:
        self._queue(replies.help_text())
        return None

    def _do_quit(self, argument: str) -> Event | None:
        _check_no_argument("QUIT", argument)
        self._queue(replies.service_closing(self.settings.hostname))
        self._state = State.CLOSED
        return Quit()

    def _do_etrn(self, argument: str) -> Event | None:
        if not self.settings.etrn:
            return self._reject(replies.not_implemented("ETRN"))
        if self._helo_name is None or self._in_transaction:
            return self._reject(
                replies.bad_sequence("ETRN needs EHLO first and no open transaction")
            )
        if not argument.strip():
            text = "ETRN needs a node name, e.g. ETRN example.org (RFC 1985)"
            raise RemoteProtocolError(text, replies.parameter_error(text))
        # The driver parses the node, "@" and "#" forms (RFC 1985 section 3)
        # with trimta.ondemand.etrn, because its replies depend on the spool.
        return self._await(Etrn(argument.strip()))

    def _do_starttls(self, argument: str) -> Event | None:
        if not self.settings.starttls:
            return self._reject(replies.not_implemented("STARTTLS"))
        if self._secure:
            return self._reject(replies.tls_already_active())
        if argument:
            # RFC 3207 4: the command takes no parameters.
            raise _syntax(f"STARTTLS takes no argument, got {replies.show(argument)}")
        if self._in_transaction:
            text = "STARTTLS is not allowed during a mail transaction, send RSET first"
            return self._reject(replies.bad_sequence(text))
        self._queue(replies.tls_ready())
        # Drop whatever the client pipelined after STARTTLS (RFC 3207 4.2).
        self._input.clear()
        self._scan_from = 0
        self._discard_limit = 0
        self._state = State.STARTTLS
        return StartTls()

    def _do_auth(self, argument: str) -> Event | None:
        if not self.settings.auth_mechanisms:
            return self._reject(replies.not_implemented("AUTH"))
        problem = self._auth_sequence_problem()
        if problem:
            return self._reject(replies.bad_sequence(problem))
        name, _, initial = argument.strip().partition(" ")
        name, initial = name.upper(), initial.strip()
        if not name:
            raise _syntax("AUTH needs a mechanism name, e.g. AUTH PLAIN")
        offered = self._offered_mechanisms()
        if name not in self.settings.auth_mechanisms:
            return self._reject(replies.auth_mechanism_unknown(name, offered))
        if name not in offered:
            return self._reject(replies.auth_encryption_required(name))
        mechanism = sasl.start_mechanism(name, self._cram_challenge())
        try:
            # RFC 4954 4: "=" stands for an empty initial response.
            response = sasl.decode_response(initial.encode()) if initial else None
            step = mechanism.step(response)
        except sasl.SaslError as error:
            return self._reject(replies.auth_malformed(error.reason))
        return self._take_auth_step(mechanism, step)

    def _auth_sequence_problem(self) -> str:
        """Explain why AUTH is out of order now (RFC 4954 4), or return ""."""
        if self._helo_name is None or not self._extended:
            return "send EHLO before AUTH"
        if self._auth_user is not None:
            return "already authenticated: AUTH is allowed once per session"
        if self._in_transaction:
            return "AUTH is not allowed during a mail transaction"
        return ""

    def _handle_auth_line(self, line: bytes | _LineTooLong) -> Event | None:
        # Whatever the line holds, this exchange ends unless the mechanism
        # sends another challenge.
        mechanism, self._mechanism = self._mechanism, None
        self._state = State.COMMAND
        assert mechanism is not None
        if line is _LINE_TOO_LONG or len(line) + 2 > sasl.MAX_RESPONSE_LINE:
            self._discard_limit = 0
            return self._reject(replies.line_too_long(sasl.MAX_RESPONSE_LINE))
        if line == b"*":
            self._queue(replies.auth_cancelled())
            return None
        try:
            step = mechanism.step(sasl.decode_response(line))
        except sasl.SaslError as error:
            return self._reject(replies.auth_malformed(error.reason))
        return self._take_auth_step(mechanism, step)

    def _take_auth_step(
        self, mechanism: sasl.Mechanism, step: sasl.Step
    ) -> Event | None:
        if isinstance(step, sasl.Challenge):
            self._queue(replies.auth_challenge(sasl.encode_challenge(step.data)))
            self._mechanism = mechanism
            self._state = State.AUTH
            return None
        return self._await(AuthAttempt(step))

    def _do_atrn(self, argument: str) -> Event | None:
        """Handle ATRN (RFC 2645 4.3) on an ODMR listener."""
        if not self.settings.odmr:
            return self._reject(replies.not_implemented("ATRN"))
        if self._helo_name is None:
            return self._reject(replies.bad_sequence("send EHLO before ATRN"))
        if self._auth_user is None:
            return self._reject(replies.auth_required("ATRN"))
        domains = []
        for name in filter(None, (part.strip() for part in argument.split(","))):
            try:
                domains.append(normalize_domain(name))
            except AddressError as error:
                text = f"ATRN takes domain names separated by commas: {error}"
                raise RemoteProtocolError(text, replies.parameter_error(text)) from None
        return self._await(Atrn(tuple(domains)))

    def _do_turn(self, argument: str) -> Event | None:
        return self._reject(replies.turn_refused())

    def _not_implemented(self, verb: str) -> Event | None:
        return self._reject(replies.not_implemented(verb))

    # Internals: DATA phase.

    def _next_data_event(self) -> Event | NeedData:
        reader = self._reader
        assert reader is not None
        data = bytes(self._input)
        self._input.clear()
        content = reader.feed(data) if data else b""
        if reader.finished:
            self._input += reader.remainder
            self._events.append(self._finish_message(reader))
            if not content:
                return self._pop_event()
        if content:
            return MessageData(content)
        if self._eof:
            return self._abort_on_eof()
        return NEED_DATA

    def _finish_message(self, reader: DotReader) -> Event:
        self._reader = None
        self._state = State.COMMAND
        problem = reader.problem
        if problem is not None:
            reply = _PROBLEM_REPLIES[problem](reader)
            self._queue(reply)
            self._reset_transaction()
            return MessageAborted(reply)
        return EndOfMessage(reader.size, reader.received_headers)

    def _abort_on_eof(self) -> Event:
        self._reader = None
        self._reset_transaction()
        self._state = State.CLOSED
        self._events.append(ConnectionClosed())
        return MessageAborted(replies.connection_lost())


def _line_limit(line: bytes | bytearray) -> int:
    """Return the length limit for a command line from its first word."""
    verb = bytes(line[:9]).partition(b" ")[0].decode("ascii", "replace").upper()
    if verb == "AUTH":
        # RFC 4954 4: AUTH with an initial response may fill 12288 octets.
        return sasl.MAX_RESPONSE_LINE
    return max_line_length(verb)


def _drop_auth_parameter(argument: str) -> str:
    """Remove the MAIL parameter AUTH=, which RFC 4954 5 lets a server ignore.

    Servers that advertise AUTH must accept the parameter. trimta does not
    relay the submitter identity, so it treats every message as AUTH=<>.
    """
    path, rest = split_path_argument(argument, "FROM")
    words = [word for word in rest.split() if not word.upper().startswith("AUTH=")]
    return " ".join([f"FROM:{path}", *words])


def _syntax(text: str) -> RemoteProtocolError:
    return RemoteProtocolError(text, replies.syntax_error(text))


def _check_no_argument(verb: str, argument: str) -> None:
    if argument:
        text = f"{verb} takes no argument, got {replies.show(argument)}"
        raise RemoteProtocolError(text, replies.parameter_error(text))


def _check_client_name(verb: str, name: str) -> None:
    """Check the EHLO/HELO argument: one printable ASCII word."""
    if not name or not name.isascii() or not name.isprintable() or " " in name:
        raise _syntax(
            f"{verb} needs a domain or address literal, got {replies.show(name)}"
        )
    if name.startswith("["):
        try:
            parse_address_literal(name)
        except AddressError as error:
            raise _syntax(
                f"{verb} address literal {replies.show(name)} is invalid:"
                f" {error.reason}"
            ) from error
    # NOTE: other names are not checked against the Domain grammar because
    # many real clients send names with "_" or without a dot.


def _not_implemented(verb: str):
    def handle(connection: ServerConnection, argument: str) -> Event | None:
        return connection._not_implemented(verb)

    return handle


# Known commands. RFC 5321 4.2.4: 500 for unknown verbs, 502 for known
# commands this server does not offer. BDAT is refused because CHUNKING
# is not advertised (RFC 3030 2).
_COMMANDS = {
    "EHLO": ServerConnection._do_ehlo,
    "HELO": ServerConnection._do_helo,
    "MAIL": ServerConnection._do_mail,
    "RCPT": ServerConnection._do_rcpt,
    "DATA": ServerConnection._do_data,
    "RSET": ServerConnection._do_rset,
    "NOOP": ServerConnection._do_noop,
    "VRFY": ServerConnection._do_vrfy,
    "HELP": ServerConnection._do_help,
    "QUIT": ServerConnection._do_quit,
    "ETRN": ServerConnection._do_etrn,
    "TURN": ServerConnection._do_turn,
    "EXPN": _not_implemented("EXPN"),
    "BDAT": _not_implemented("BDAT"),
    "STARTTLS": ServerConnection._do_starttls,
    "AUTH": ServerConnection._do_auth,
    "ATRN": ServerConnection._do_atrn,
}
