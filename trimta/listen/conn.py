"""One SMTP session: drive the sans-IO server engine over a Trio stream.

The engine parses commands and replies to what it can by itself; this module
supplies what needs the outside world: the recipient policy, the spool, the
clock (deadlines) and the socket. The loop asks the engine for its next
event, sends the queued replies whenever the engine needs more input (so
pipelined replies go out together, RFC 2920), and dispatches each event
to a handler through a table.

Deadlines: a command line must arrive whole within `command_timeout` of
the previous reply, so a client dribbling one byte now and then is closed
even though it is never silent. During DATA the message must end within
`data_timeout` plus one second per `min_data_rate` octets received, and no
read may wait longer than `data_timeout`. Sending a reply has the
command deadline too, so a client that stops reading is closed.

Each session records the deadline of its current wait for the client;
`SmtpServer` sweeps every open session twice a second and cancels the
ones past their deadline. A sweep is far cheaper than a cancel scope per
read, and the accept rate pays for every read.

TLS: for STARTTLS the engine answers 220 and returns StartTls; this
module sends the 220, wraps the socket in a server-side `trio.SSLStream`
and runs the handshake within `command_timeout`. Implicit TLS runs the
same handshake before the greeting. A failed handshake closes the session
with one log line.

AUTH: the engine returns AuthAttempt with the credentials. They are
checked against the credentials file in a worker thread (scrypt is slow
on purpose). A failure is answered only after a delay that grows per
client address (`trimta.auth.throttle`). Log lines name the user and the
mechanism, never a password, digest or AUTH response.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import ssl
import time
from collections import defaultdict

import attrs
import trio

from trimta.auth.credentials import CredentialStore
from trimta.auth.throttle import AuthThrottle
from trimta.listen.policy import Accepted, IPAddress, RecipientPolicy
from trimta.listen.received import clean_helo, format_received
from trimta.listen.submission import HeaderCompleter
from trimta.ondemand.etrn import EtrnService
from trimta.ondemand.odmr import AtrnService
from trimta.smtp import replies, sasl
from trimta.smtp.events import (
    NEED_DATA,
    Atrn,
    AuthAttempt,
    ConnectionClosed,
    DataStarted,
    Ehlo,
    EndOfMessage,
    Etrn,
    MailFrom,
    MessageAborted,
    MessageData,
    Quit,
    RcptTo,
    StartTls,
)
from trimta.smtp.server import ServerConnection, ServerSettings, State
from trimta.spool.envelope import ClientInfo, Recipient
from trimta.spool.store import MessageWriter, Spool, SpoolError

logger = logging.getLogger("trimta.listen")

RECEIVE_SIZE = 65536
# Octets of commands given to the engine between two checkpoints: about 700
# pipelined NOOPs, some milliseconds of work.
COMMAND_SLICE = 4096
# Seconds allowed to send the 421 after a deadline or a stop.
CLOSING_REPLY_GRACE = 5.0
# Seconds allowed to send the 421 when the shutdown grace is over, for
# each session at once, so stopping takes at most this much longer.
SHUTDOWN_REPLY_GRACE = 1.0


@attrs.define
class SessionContext:
    """What every session of one daemon shares.

    Attributes:
        settings: Engine settings (host name and protocol limits).
        policy: Recipient rules.
        spool: The message spool.
        command_timeout: Seconds allowed for one whole command line.
        data_timeout: Seconds of DATA allowed beyond what the rate earns.
        min_data_rate: Octets per second that earn one more second of DATA.
        etrn: The ETRN service, or None where ETRN is not offered.
        tls_context: Server TLS context for STARTTLS or implicit TLS.
        implicit_tls: Run the TLS handshake on accept, before the greeting.
        credentials: Users for AUTH, or None where AUTH is not offered.
        auth_throttle: Failure delays per client address, shared by all
            listeners.
        submission: Add Message-ID and Date to messages that lack them
            (RFC 6409 8.2, 8.3).
        stopping: Set when the daemon stops; idle sessions then close.
        sessions: Every open session of every listener, for the deadline
            sweep and for stopping.
    """

    settings: ServerSettings
    policy: RecipientPolicy
    spool: Spool
    command_timeout: float
    data_timeout: float
    min_data_rate: int
    etrn: EtrnService | None = None
    tls_context: ssl.SSLContext | None = None
    implicit_tls: bool = False
    credentials: CredentialStore | None = None
    auth_throttle: AuthThrottle = attrs.Factory(AuthThrottle)
    submission: bool = False
    atrn: AtrnService | None = None
    stopping: trio.Event = attrs.Factory(trio.Event)
    sessions: set[Session] = attrs.Factory(set)

    def stop_idle_sessions(self) -> None:
        """Mark the daemon as stopping and interrupt every idle session."""
        self.stopping.set()
        for session in list(self.sessions):
            session.interrupt_if_idle()

    def interrupt_overdue_sessions(self) -> None:
        """Interrupt every session whose client missed its deadline."""
        now = trio.current_time()
        for session in list(self.sessions):
            session.interrupt_if_overdue(now)


@attrs.define
class _Transaction:
    """The MAIL transaction in progress."""

    sender: str
    params: dict[str, str | None]
    recipients: dict[str, list[Recipient]] = attrs.Factory(lambda: defaultdict(list))
    writer: MessageWriter | None = None

    def add(self, accepted: Accepted, params: dict[str, str | None]) -> None:
        group = self.recipients[accepted.domain]
        if any(recipient.address == accepted.address for recipient in group):
            return
        notify = params.get("NOTIFY")
        group.append(
            Recipient(
                address=accepted.address,
                orcpt=params.get("ORCPT"),
                notify=None if notify is None else notify.upper().split(","),
            )
        )

    def addresses(self) -> list[str]:
        return [r.address for group in self.recipients.values() for r in group]


class Session:
    """One client connection, from greeting to close.

    Args:
        context: State shared by the daemon's sessions.
        stream: The connected stream.
        peer: The client's IP address (None when unknown).
        sid: Session id used in every log line.
    """

    def __init__(
        self,
        context: SessionContext,
        stream: trio.abc.Stream,
        peer: IPAddress | None,
        sid: str,
    ) -> None:
        self.context = context
        self.stream = stream
        self.peer = peer
        self.local = local_address(stream)
        self.sid = sid
        self.engine = ServerConnection(
            context.settings,
            secure=context.implicit_tls,
            cram_challenge=self._new_cram_challenge,
        )
        self.helo = ""
        self.extended = False
        self.transaction: _Transaction | None = None
        self._deadline = math.inf
        # The deadline of the current wait for the client (inf when not
        # waiting), and whether the session waits between transactions.
        self._waiting_until = math.inf
        self._idle = False
        self._interrupt = trio.CancelScope()
        # Received input not yet given to the engine (see _feed).
        self._backlog = b""
        # True from the start of a send until it completes.
        self._sending = False
        self._data_started = 0.0
        self._data_octets = 0
        self._spool_failure = replies.spool_unavailable()
        self._header_completer: HeaderCompleter | None = None
        self._handlers = {
            Ehlo: self._on_ehlo,
            MailFrom: self._on_mail,
            RcptTo: self._on_rcpt,
            DataStarted: self._on_data_started,
            MessageData: self._on_message_data,
            EndOfMessage: self._on_end_of_message,
            MessageAborted: self._on_message_aborted,
            Etrn: self._on_etrn,
            Atrn: self._on_atrn,
            StartTls: self._on_starttls,
            AuthAttempt: self._on_auth,
            Quit: self._on_quit,
        }

    async def run(self, refusal: replies.Reply | None = None) -> None:
        """Serve the session until either side ends it.

        Args:
            refusal: A reply (421 or 554) to send instead of the greeting,
                for a session over a limit.
        """
        self._restart_command_deadline()
        self.context.sessions.add(self)
        try:
            with self._interrupt:
                if self.context.implicit_tls and not await self._start_tls():
                    return
                if refusal is None:
                    self.engine.send_greeting()
                else:
                    self.engine.refuse_session(refusal)
                await self._serve()
            if self._interrupt.cancelled_caught:
                await self._close_interrupted()
        except trio.Cancelled:
            # The shutdown grace ran out: tell the client before the close.
            await self._say_shutting_down()
            raise
        finally:
            self.context.sessions.discard(self)
            await self._discard_transaction()
            await self._close_tls()

    async def _say_shutting_down(self) -> None:
        """Send 421 4.3.2 while the session is being cancelled, if possible."""
        if self._sending or self.engine.state in (State.CLOSED, State.STARTTLS):
            return
        self.engine.close(replies.shutting_down(self.context.settings.hostname))
        with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_REPLY_GRACE):
            await self._flush()
        logger.info("closing sid=%s: shutdown grace over", self.sid)

    def interrupt_if_idle(self) -> None:
        """Cancel the session's wait if it waits between transactions."""
        if self._idle:
            self._interrupt.cancel()

    def interrupt_if_overdue(self, now: float) -> None:
        """Cancel the session's wait if its client missed the deadline."""
        if now >= self._waiting_until:
            self._interrupt.cancel()

    async def _close_interrupted(self) -> None:
        """Send 421 after a deadline or a stop, within a short grace."""
        if self._sending:
            # A send cut short leaves the stream in an unknown state (a TLS
            # record half written), and this client does not read anyway.
            logger.info("timeout sid=%s while sending replies", self.sid)
            return
        self._close_on_interrupt()
        with trio.move_on_after(CLOSING_REPLY_GRACE):
            await self._flush()

    async def _start_tls(self) -> bool:
        """Run the server side of the TLS handshake; log and return False on failure."""
        assert self.context.tls_context is not None
        tls_stream = trio.SSLStream(
            self.stream, self.context.tls_context, server_side=True
        )
        with trio.CancelScope(deadline=self._deadline) as scope:
            try:
                await tls_stream.do_handshake()
            except trio.BrokenResourceError as exc:
                reason = exc.__cause__ or exc
                logger.warning(
                    "tls failed sid=%s client=%s error=%s", self.sid, self.peer, reason
                )
                return False
        if scope.cancelled_caught:
            logger.warning(
                "tls failed sid=%s client=%s error=timeout", self.sid, self.peer
            )
            return False
        self.stream = tls_stream
        logger.info(
            "tls started sid=%s version=%s cipher=%s",
            self.sid,
            tls_stream.version(),
            (tls_stream.cipher() or ("?",))[0],
        )
        return True

    async def _close_tls(self) -> None:
        """Send the TLS close_notify; the caller closes the socket itself."""
        if not isinstance(self.stream, trio.SSLStream):
            return
        with trio.move_on_after(1):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _new_cram_challenge(self) -> bytes:
        # RFC 2195 2: the challenge contains a random number and a timestamp.
        return sasl.new_cram_challenge(self.context.settings.hostname, int(time.time()))

    async def _serve(self) -> None:
        while True:
            event = self.engine.next_event()
            if event is NEED_DATA:
                if not await self._flush() or self.engine.state is State.CLOSED:
                    return
                await self._receive()
                continue
            if isinstance(event, ConnectionClosed):
                await self._flush()
                return
            await self._handlers[type(event)](event)

    async def _flush(self) -> bool:
        """Send queued replies; return False when the peer is gone."""
        data = self.engine.data_to_send()
        if not data:
            return True
        self._waiting_until = self._deadline
        self._sending = True
        try:
            await self.stream.send_all(data)
            self._sending = False
            if self.engine.state is State.COMMAND:
                # The deadline counts from the previous reply, including
                # one the engine made by itself (NOOP, RSET, errors).
                self._restart_command_deadline()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            logger.info("connection lost sid=%s while sending a reply", self.sid)
            return False
        finally:
            self._waiting_until = math.inf
        return True

    async def _receive(self) -> None:
        """Read more input into the engine, or close on a deadline or stop."""
        if self._backlog:
            # Let other sessions run between two slices of pipelined commands.
            await trio.lowlevel.checkpoint()
            self._feed(self._backlog)
            return
        idle = self.engine.state is State.COMMAND and not self.engine.in_transaction
        if idle and self.context.stopping.is_set():
            self.engine.close(replies.shutting_down(self.context.settings.hostname))
            return
        self._waiting_until = self._current_deadline()
        self._idle = idle
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        finally:
            self._waiting_until = math.inf
            self._idle = False
        if self._interrupt.cancel_called:
            # Interrupted just as input arrived: the interrupt wins, here
            # rather than at some later await such as a commit.
            await trio.lowlevel.checkpoint()
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Give input to the engine; commands go in slices of COMMAND_SLICE.

        The engine replies to NOOP or RSET by itself, so one read of
        pipelined commands could keep the event loop for thousands of
        replies. A slice bounds the work done between two checkpoints.
        """
        if self.engine.state is State.DATA:
            self._data_octets += len(data)
        elif len(data) > COMMAND_SLICE:
            data, self._backlog = data[:COMMAND_SLICE], data[COMMAND_SLICE:]
            self.engine.receive_data(data)
            return
        self._backlog = b""
        self.engine.receive_data(data)

    def _close_on_interrupt(self) -> None:
        hostname = self.context.settings.hostname
        if self.context.stopping.is_set():
            logger.info("closing sid=%s: trimta is stopping", self.sid)
            self.engine.close(replies.shutting_down(hostname))
        else:
            logger.info("timeout sid=%s state=%s", self.sid, self.engine.state.name)
            self.engine.close(replies.timeout(hostname))

    def _current_deadline(self) -> float:
        if self.engine.state is not State.DATA:
            return self._deadline
        context = self.context
        now = trio.current_time()
        idle_limit = now + context.data_timeout
        if context.min_data_rate <= 0:
            return idle_limit
        earned = self._data_octets / context.min_data_rate
        return min(idle_limit, self._data_started + context.data_timeout + earned)

    def _restart_command_deadline(self) -> None:
        self._deadline = trio.current_time() + self.context.command_timeout

    async def _on_ehlo(self, event: Ehlo) -> None:
        await self._discard_transaction()
        self.helo = event.name
        self.extended = event.extended
        logger.debug("helo sid=%s name=%s", self.sid, clean_helo(event.name))

    async def _on_mail(self, event: MailFrom) -> None:
        await self._discard_transaction()
        sender = "" if event.sender is None else str(event.sender)
        self.transaction = _Transaction(sender=sender, params=dict(event.params))
        self.engine.send_reply(replies.sender_ok())

    async def _on_rcpt(self, event: RcptTo) -> None:
        decision = self.context.policy.check(
            event.recipient,
            self.peer,
            self.local,
            authenticated=self.engine.auth_user is not None,
        )
        accepted = decision.accepted
        if accepted is not None and self.transaction is not None:
            self.transaction.add(accepted, event.params)
        else:
            logger.info(
                "recipient rejected sid=%s rcpt=<%s> client=%s reply=%d",
                self.sid,
                event.recipient,
                self.peer,
                decision.reply.code,
            )
        self.engine.send_reply(decision.reply)

    async def _on_data_started(self, event: DataStarted) -> None:
        transaction = self.transaction
        assert transaction is not None, "the engine opened DATA without MAIL"
        self._data_started = trio.current_time()
        self._data_octets = 0
        transaction.writer = self.context.spool.new_message()
        mid = transaction.writer.mid
        if self.context.submission:
            message_id = f"<{mid}@{self.context.settings.hostname}>"
            self._header_completer = HeaderCompleter(message_id)
        await self._write(transaction, self._received_header(transaction, mid))

    async def _on_message_data(self, event: MessageData) -> None:
        transaction = self.transaction
        data = event.data
        if self._header_completer is not None:
            data = self._header_completer.feed(data)
        if transaction is not None and transaction.writer is not None:
            await self._write(transaction, data)

    async def _write(self, transaction: _Transaction, data: bytes) -> None:
        try:
            await transaction.writer.write(data)
        except SpoolError as exc:
            # Keep reading to the final dot, where the failure gets its reply.
            logger.error("spool write failed sid=%s: %s", self.sid, exc)
            self._spool_failure = _spool_failure_reply(exc)
            await self._discard_transaction(keep=True)

    async def _on_end_of_message(self, event: EndOfMessage) -> None:
        transaction = self.transaction
        completer, self._header_completer = self._header_completer, None
        if completer is not None and transaction is not None and transaction.writer:
            await self._write(transaction, completer.finish())
        writer = None if transaction is None else transaction.writer
        if writer is None:
            self.transaction = None
            self.engine.send_reply(self._spool_failure)
            return
        try:
            await self._commit(transaction, writer)
        except SpoolError as exc:
            logger.error("spool commit failed sid=%s mid=%s: %s", self.sid, writer.mid, exc)
            await writer.abort()
            self.engine.send_reply(_spool_failure_reply(exc))
        else:
            self.engine.send_reply(replies.queued(writer.mid))
        finally:
            self.transaction = None

    async def _commit(self, transaction: _Transaction, writer: MessageWriter) -> None:
        client = ClientInfo(helo=clean_helo(self.helo), address=str(self.peer or ""))
        await writer.commit(
            sender=transaction.sender,
            recipients=dict(transaction.recipients),
            params=transaction.params,
            client=client,
        )
        logger.info(
            "queued sid=%s mid=%s from=<%s> rcpts=%d size=%d",
            self.sid,
            writer.mid,
            transaction.sender,
            len(transaction.addresses()),
            writer.size,
        )

    async def _on_message_aborted(self, event: MessageAborted) -> None:
        self._header_completer = None
        logger.info(
            "message rejected sid=%s reply=%s",
            self.sid,
            replies.show(event.reply.to_bytes().decode("ascii", "replace").strip()),
        )
        await self._discard_transaction()

    async def _on_etrn(self, event: Etrn) -> None:
        service = self.context.etrn
        if service is None:
            self.engine.send_reply(replies.not_implemented("ETRN"))
            return
        reply = await service.handle(event.argument, self.peer)
        logger.info(
            "etrn sid=%s client=%s node=%s reply=%d", self.sid, self.peer,
            replies.show(event.argument), reply.code,
        )
        self.engine.send_reply(reply)

    async def _on_starttls(self, event: StartTls) -> None:
        # RFC 3207 4.2: input sent before the handshake is plaintext and
        # must never run, the slices not yet given to the engine included.
        self._backlog = b""
        # The 220 must reach the client before the handshake starts, and
        # the handshake gets a whole command_timeout of its own.
        sent = await self._flush()
        self._restart_command_deadline()
        if sent and await self._start_tls():
            self.engine.tls_started()
            self.helo, self.extended = "", False
        else:
            self.engine.tls_failed()

    async def _on_auth(self, event: AuthAttempt) -> None:
        credentials = event.credentials
        store = self.context.credentials
        user_text = replies.show(credentials.username)
        if store is None:
            self.engine.send_reply(replies.auth_unavailable())
            return
        try:
            user = await trio.to_thread.run_sync(store.check, credentials)
        except ValueError as exc:
            logger.error(
                "auth check failed sid=%s user=%s: %s", self.sid, user_text, exc
            )
            self.engine.send_reply(replies.auth_unavailable())
            return
        throttle = self.context.auth_throttle
        if user is None:
            delay = throttle.record_failure(self.peer, trio.current_time())
            logger.warning(
                "auth failed sid=%s client=%s mechanism=%s user=%s delay=%gs",
                self.sid, self.peer, credentials.mechanism, user_text, delay,
            )
            await trio.sleep(delay)
            self.engine.send_reply(replies.auth_failed())
            return
        throttle.record_success(self.peer)
        logger.info(
            "auth succeeded sid=%s client=%s mechanism=%s user=%s",
            self.sid, self.peer, credentials.mechanism, user_text,
        )
        self.engine.send_reply(replies.auth_succeeded())

    async def _on_atrn(self, event: Atrn) -> None:
        service = self.context.atrn
        if service is None or self.engine.auth_user is None:
            self.engine.send_reply(replies.not_implemented("ATRN"))
            return
        grant = service.grant(self.engine.auth_user, list(event.domains))
        logger.info(
            "atrn sid=%s user=%s requested=%s reply=%d", self.sid, self.engine.auth_user,
            ",".join(event.domains) or "*", grant.reply.code,
        )
        self.engine.send_reply(grant.reply)
        try:
            if grant.domains and await self._flush():
                await service.turn_around(self.stream, grant, self.peer)
        finally:
            grant.release()

    async def _on_quit(self, event: Quit) -> None:
        await self._discard_transaction()

    async def _discard_transaction(self, *, keep: bool = False) -> None:
        """Drop the open transaction and any partly written body.

        Args:
            keep: Keep the transaction itself (so DATA can finish and be
                answered) and drop only its body.
        """
        transaction = self.transaction
        if transaction is not None and transaction.writer is not None:
            writer, transaction.writer = transaction.writer, None
            await writer.abort()
        if not keep:
            self.transaction = None

    def _received_header(self, transaction: _Transaction, mid: str) -> bytes:
        recipients = transaction.addresses()
        smtputf8 = "SMTPUTF8" in transaction.params
        if smtputf8:
            protocol = "UTF8SMTP"
        elif self.extended:
            protocol = "ESMTP"
        else:
            protocol = "SMTP"
        if protocol != "SMTP":
            # RFC 3848 and RFC 6531 7: "S" for TLS, "A" for AUTH.
            protocol += "S" if self.engine.secure else ""
            protocol += "A" if self.engine.auth_user is not None else ""
        return format_received(
            helo=self.helo,
            client_address=str(self.peer or "unknown"),
            hostname=self.context.settings.hostname,
            protocol=protocol,
            queue_id=mid,
            recipient=recipients[0] if len(recipients) == 1 else None,
        )


def _spool_failure_reply(error: SpoolError) -> replies.Reply:
    """Pick 452 4.3.1 for a full file system, else 451 4.3.0."""
    cause = error.__cause__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return replies.storage_full()
    return replies.spool_unavailable()


def peer_address(stream: trio.abc.Stream) -> IPAddress | None:
    """Return the IP address of a socket stream's peer, or None."""
    return _socket_address(stream, "getpeername")


def local_address(stream: trio.abc.Stream) -> IPAddress | None:
    """Return the local IP address of a socket stream, or None."""
    return _socket_address(stream, "getsockname")


def _socket_address(stream: trio.abc.Stream, method: str) -> IPAddress | None:
    socket = getattr(stream, "socket", None)
    if socket is None:
        return None
    try:
        host = getattr(socket, method)()[0]
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except (OSError, ValueError, IndexError, TypeError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address
