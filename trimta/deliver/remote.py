"""Deliver spooled parts to their next hop over SMTP: the client engine on Trio.

`RemoteDeliverer.connect(domain)` finds the next hops (a configured route
wins, else MX lookup), connects to each in turn until one greets with 220,
says EHLO (HELO when EHLO is refused), upgrades with STARTTLS as the route
asks, authenticates when the route has credentials, and yields a
`RemoteSession` that carries one message after another over that
connection. Every wait has the client timeout of the reply it waits for
(`RemoteSettings.timeouts`, by default the RFC 5321 4.5.3.2 minimums),
so a next hop that never replies cannot hold a worker forever. The
transaction then ends with 451 4.4.2, and its recipients are deferred.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import ssl
import stat
from pathlib import Path
from typing import BinaryIO

import attrs
import trio

from trimta.config.model import Route
from trimta.deliver.mx import MxResolver, NextHop, PermanentFailure, TemporaryFailure
from trimta.deliver.outcome import DestinationError, RecipientOutcome, Verdict
from trimta.smtp.client import (
    NEED_DATA,
    RFC_TIMEOUTS,
    ClientConnection,
    ClientState,
    ClientTimeouts,
    SendBody,
    Transaction,
    TransactionResult,
)
from trimta.smtp.errors import LocalProtocolError, RemoteProtocolError
from trimta.smtp.replies import Reply
from trimta.spool.envelope import Envelope
from trimta.transport import SocketTransport

logger = logging.getLogger("trimta.deliver")

BODY_BLOCK = 1 << 20
# Bodies up to this size are read in the event loop thread, in one read.
INLINE_BODY = 64 * 1024
QUIT_TIMEOUT = 10.0
RECEIVE_SIZE = 65536


class _HopFailed(Exception):
    """This next hop cannot take mail now; try the next one."""


@attrs.frozen
class RemoteSettings:
    """Settings of outbound connections, taken from the configuration.

    Attributes:
        hostname: trimta's name, sent in EHLO.
        routes: Configured routes by domain; "*" is the smarthost.
        resolver: MX and address lookups.
        connect_timeout: Seconds allowed for each TCP connect and TLS
            handshake.
        timeouts: Seconds allowed for each reply and each send of message
            data.
    """

    hostname: str
    routes: dict[str, Route]
    resolver: MxResolver
    connect_timeout: float = 30.0
    timeouts: ClientTimeouts = RFC_TIMEOUTS


class RemoteDeliverer:
    """Opens SMTP sessions to the next hop of a domain."""

    def __init__(self, settings: RemoteSettings) -> None:
        self.settings = settings
        self._tls_contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}

    def route_for(self, domain: str) -> Route | None:
        """Return the configured route of a domain, the smarthost, or None."""
        routes = self.settings.routes
        return routes.get(domain) or routes.get("*")

    @contextlib.asynccontextmanager
    async def connect(self, domain: str):
        """Open a session with the first next hop of `domain` that greets.

        Raises:
            DestinationError: Routing failed or no next hop could be used.
        """
        route = self.route_for(domain)
        hops = await self._next_hops(domain, route)
        session = await self._open_first(domain, hops, route)
        try:
            yield session
        finally:
            await session.close()

    async def _next_hops(self, domain: str, route: Route | None) -> list[NextHop]:
        resolver = self.settings.resolver
        try:
            if route is None:
                return list((await resolver.resolve(domain)).hops)
            hops: list[NextHop] = []
            for host_port in route.hosts:
                hops += await _route_hops(resolver, host_port.host, host_port.port)
            return hops
        except PermanentFailure as failure:
            raise DestinationError(True, failure.status, failure.text) from failure
        except TemporaryFailure as failure:
            raise DestinationError(False, failure.status, failure.text) from failure

    async def _open_first(
        self, domain: str, hops: list[NextHop], route: Route | None
    ) -> RemoteSession:
        errors = []
        for hop in hops:
            try:
                return await self._open(hop, route)
            except _HopFailed as failure:
                logger.warning(
                    "next hop failed domain=%s host=%s address=%s port=%d error=%s",
                    domain, hop.host, hop.address, hop.port, failure,
                )
                errors.append(f"{hop.host}[{hop.address}]:{hop.port}: {failure}")
        if not hops:
            errors.append("no next hop")
        raise DestinationError(
            False, "4.4.1", "no next hop could be used: " + "; ".join(errors)
        )

    async def _open(self, hop: NextHop, route: Route | None) -> RemoteSession:
        tls = route.tls if route is not None else "opportunistic"
        context = self._tls_context(route)
        stream = await self._connect_stream(hop, context, implicit=tls == "implicit")
        client = ClientConnection(
            local_hostname=self.settings.hostname, timeouts=self.settings.timeouts
        )
        session = RemoteSession(stream, hop, client)
        try:
            await session.start(route, context, self.settings.connect_timeout)
        except BaseException:
            await session.close(quit=False)
            raise
        return session

    async def _connect_stream(
        self, hop: NextHop, context: ssl.SSLContext, *, implicit: bool
    ) -> trio.abc.Stream:
        timeout = self.settings.connect_timeout
        try:
            with trio.fail_after(timeout):
                connected = await trio.open_tcp_stream(hop.address, hop.port)
                stream: trio.abc.Stream = SocketTransport.take_over(connected)
                if implicit:
                    stream = trio.SSLStream(stream, context, server_hostname=hop.host)
                    await stream.do_handshake()
        except trio.TooSlowError:
            raise _HopFailed(f"connect timed out after {timeout:g}s") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise _HopFailed(f"connect failed: {_describe(exc)}") from exc
        return stream

    def _tls_context(self, route: Route | None) -> ssl.SSLContext:
        verify = route is not None and route.tls in ("required", "implicit")
        cafile = str(route.ca_file) if verify and route.ca_file else None
        key = (verify, cafile)
        # Building a context reads the CA store (about 50 ms here), so each
        # kind is built once and shared by every connection.
        if key not in self._tls_contexts:
            try:
                self._tls_contexts[key] = _build_tls_context(verify, cafile)
            except CaFileError as exc:
                # Defer rather than end the worker. The daemon checks every
                # ca_file at start, so here the file has changed since.
                raise _HopFailed(str(exc)) from exc
        return self._tls_contexts[key]


@attrs.define(eq=False)
class CaFileError(Exception):
    """A route's ca_file that cannot be loaded as PEM CA certificates.

    Attributes:
        path: The file.
        reason: What is wrong with it.
    """

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"cannot load ca_file {self.path}: {self.reason}"


def load_ca_file(path: Path) -> ssl.SSLContext:
    """Build a verifying client TLS context that trusts the CAs in `path`.

    Raises:
        CaFileError: The file is missing, unreadable or contains no PEM
            certificate.
    """
    try:
        return ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        # OpenSSL raises this for a file without any PEM certificate.
        reason = f"no PEM certificate found ({exc.reason or exc})"
        raise CaFileError(path, reason) from exc
    except OSError as exc:
        reason = f"cannot read the file: {exc.strerror or exc}"
        raise CaFileError(path, reason) from exc


def _build_tls_context(verify: bool, cafile: str | None) -> ssl.SSLContext:
    if verify:
        if cafile is None:
            return ssl.create_default_context()
        return load_ca_file(Path(cafile))
    # RFC 7435 opportunistic security: encrypt when offered, but do not
    # insist on a certificate the next hop cannot prove.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _route_hops(resolver: MxResolver, host: str, port: int) -> list[NextHop]:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return await resolver.resolve_host(host, port)
    return [NextHop(host=host, address=host, port=port, preference=0)]


class RemoteSession:
    """One SMTP client session with a next hop, carrying messages in turn."""

    def __init__(self, stream: trio.abc.Stream, hop: NextHop, client: ClientConnection):
        self.stream = stream
        self.hop = hop
        self.client = client
        self.usable = True
        # The deadline of the reply being waited for, and the count of
        # complete replies when it was set.
        self._reply_deadline: float | None = None
        self._replies_seen = 0

    @property
    def remote(self) -> str:
        return self.hop.host

    async def start(self, route: Route | None, context: ssl.SSLContext, connect_timeout: float) -> None:
        """Read the greeting, send EHLO, and start TLS and AUTH as the route requires.

        Raises:
            _HopFailed: The next hop refused the session or a step failed.
        """
        greeting = await self._reply()
        if greeting.code != 220:
            raise _HopFailed(f"greeting {_reply_text(greeting)}")
        await self._hello()
        tls = route.tls if route is not None else "opportunistic"
        if tls in ("opportunistic", "required") and not self._tls_active():
            await self._starttls(tls, context, connect_timeout)
        if route is not None and route.auth_user:
            await self._authenticate(route)

    def _tls_active(self) -> bool:
        return isinstance(self.stream, trio.SSLStream)

    async def _hello(self) -> None:
        self.client.send_ehlo()
        reply = await self._reply()
        if reply.code // 100 == 2:
            return
        if reply.code == 421:
            raise _HopFailed(f"EHLO {_reply_text(reply)}")
        self.client.send_helo()
        reply = await self._reply()
        if reply.code // 100 != 2:
            raise _HopFailed(f"HELO {_reply_text(reply)}")

    async def _starttls(self, mode: str, context: ssl.SSLContext, timeout: float) -> None:
        if not self.client.supports("STARTTLS"):
            if mode == "required":
                raise _HopFailed("TLS is required by the route, but STARTTLS is not offered")
            return
        self.client.send_starttls()
        reply = await self._reply()
        if reply.code != 220:
            if mode == "required":
                raise _HopFailed(f"STARTTLS {_reply_text(reply)}")
            logger.info("STARTTLS rejected host=%s reply=%s, continuing without TLS", self.hop.host, _reply_text(reply))
            return
        tls_stream = trio.SSLStream(self.stream, context, server_hostname=self.hop.host)
        try:
            with trio.fail_after(timeout):
                await tls_stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise _HopFailed(f"TLS handshake failed: {_describe(exc)}") from exc
        self.stream = tls_stream
        self.client.reset_after_tls()
        await self._hello()

    async def _authenticate(self, route: Route) -> None:
        if not self._tls_active() and not _is_loopback(self.hop.address):
            raise _HopFailed("refusing to send AUTH credentials without TLS")
        password = _read_password(route.auth_password_file)
        mechanisms = self.client.auth_mechanisms
        if "PLAIN" in mechanisms:
            self.client.send_auth_plain(route.auth_user, password)
        elif "LOGIN" in mechanisms:
            self.client.send_auth_login(route.auth_user, password)
        else:
            raise _HopFailed(f"AUTH PLAIN or LOGIN not offered (offered: {sorted(mechanisms)})")
        reply = await self._reply()
        while reply.code == 334:
            reply = await self._reply()
        if reply.code != 235:
            raise _HopFailed(f"AUTH as {route.auth_user} failed: {_reply_text(reply)}")

    async def deliver(self, envelope: Envelope, body_path: Path) -> list[RecipientOutcome]:
        """Send one part's pending recipients over this session."""
        pending = [r for r in envelope.recipients if r.state == "pending"]
        refusal = self._check_capabilities(envelope)
        if refusal is not None:
            return [self._outcome(r.address, refusal) for r in pending]
        transaction = Transaction(
            self.client,
            envelope.sender,
            [(r.address, _rcpt_params(r)) for r in pending],
            _mail_params(envelope),
        )
        try:
            result = await self._run(transaction, body_path)
        except _SessionBroken as broken:
            logger.warning(
                "session broken mid=%s domain=%s host=%s address=%s port=%d error=%s",
                envelope.id, envelope.domain, self.hop.host, self.hop.address,
                self.hop.port, broken,
            )
            self.usable = False
            # RFC 5321 3.8: a lost connection counts as a 451 reply.
            result = transaction.abort(Reply(451, "4.4.2", (str(broken),)))
        if self.client.state is ClientState.CLOSED:
            self.usable = False
        return [self._outcome(item.address, item.reply) for item in result.results]

    def _check_capabilities(self, envelope: Envelope) -> Reply | None:
        params = {key.upper(): value for key, value in envelope.params.items()}
        if "SMTPUTF8" in params and not self.client.supports("SMTPUTF8"):
            return Reply(553, "5.6.7", ("the next hop does not support SMTPUTF8",))
        body = (params.get("BODY") or "").upper()
        if body == "8BITMIME" and not self.client.supports("8BITMIME"):
            return Reply(554, "5.6.3", ("the next hop does not accept 8-bit data (no 8BITMIME)",))
        limit = self.client.max_size
        if limit is not None and envelope.size > limit:
            return Reply(552, "5.3.4", (f"message size {envelope.size} exceeds the next hop's limit {limit}",))
        return None

    async def _run(self, transaction: Transaction, body_path: Path) -> TransactionResult:
        while True:
            action = transaction.next_action()
            if isinstance(action, TransactionResult):
                return action
            if isinstance(action, SendBody):
                await self._send_body(body_path)
                continue
            await self._exchange()

    async def _send_body(self, body_path: Path) -> None:
        with open(body_path, "rb") as body:
            # A small body is read here at once: reading 64 KiB costs less
            # than a round trip to a worker thread.
            if os.fstat(body.fileno()).st_size <= INLINE_BODY:
                self.client.send_message_data(body.read())
                await self._flush()
            else:
                await self._send_blocks(body)
        self.client.end_message()

    async def _send_blocks(self, body: BinaryIO) -> None:
        while True:
            block = await trio.to_thread.run_sync(body.read, BODY_BLOCK)
            if not block:
                return
            self.client.send_message_data(block)
            await self._flush()

    async def _reply(self) -> Reply:
        """Send what is queued and wait for one reply."""
        while True:
            try:
                reply = self.client.next_reply()
            except (RemoteProtocolError, LocalProtocolError) as exc:
                raise _HopFailed(f"protocol error: {exc}") from exc
            if reply is not NEED_DATA:
                return reply
            try:
                await self._exchange()
            except _SessionBroken as broken:
                raise _HopFailed(str(broken)) from broken

    async def _exchange(self) -> None:
        """Send queued commands, then read once, within the reply's timeout.

        The timeout runs from when the reply became due (the command went
        out, or the previous reply was complete), not from the last read,
        so a next hop sending a byte now and then cannot hold the worker.
        """
        sent = await self._flush()
        timeout = self.client.timeout
        replies = self.client.replies_received
        if sent or self._reply_deadline is None or replies != self._replies_seen:
            self._replies_seen = replies
            self._reply_deadline = trio.current_time() + timeout
        try:
            with trio.fail_at(self._reply_deadline):
                data = await self.stream.receive_some(RECEIVE_SIZE)
        except trio.TooSlowError:
            raise _SessionBroken(f"no reply from {self.hop.host} within {timeout:g}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
            raise _SessionBroken(f"connection to {self.hop.host} lost: {exc}") from exc
        if not data:
            raise _SessionBroken(f"{self.hop.host} closed the connection")
        try:
            self.client.receive_data(data)
        except (RemoteProtocolError, LocalProtocolError) as exc:
            raise _SessionBroken(f"protocol error from {self.hop.host}: {exc}") from exc

    async def _flush(self) -> bool:
        """Send queued commands or message data; return whether there were any."""
        data = self.client.data_to_send()
        if not data:
            return False
        timeout = self.client.timeout
        try:
            with trio.fail_after(timeout):
                await self.stream.send_all(data)
        except trio.TooSlowError:
            raise _SessionBroken(f"sending to {self.hop.host} timed out after {timeout:g}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
            raise _SessionBroken(f"connection to {self.hop.host} lost: {exc}") from exc
        return True

    def _outcome(self, address: str, reply: Reply) -> RecipientOutcome:
        kind = reply.code // 100
        if kind == 2:
            verdict = Verdict.DELIVERED
        elif kind == 5:
            verdict = Verdict.FAILED
        else:
            verdict = Verdict.DEFERRED
        status = reply.status or f"{min(max(kind, 2), 5)}.0.0"
        return RecipientOutcome(address, verdict, status, _reply_text(reply), self.hop.host)

    async def close(self, *, quit: bool = True) -> None:
        """Say QUIT when the session is still usable, then close the stream."""
        with trio.CancelScope(shield=True), trio.move_on_after(QUIT_TIMEOUT):
            if quit and self.usable:
                with contextlib.suppress(Exception):
                    self.client.send_quit()
                    await self._exchange()
            with contextlib.suppress(Exception):
                await self.stream.aclose()


class _SessionBroken(Exception):
    """The connection failed in the middle of a session."""


def _mail_params(envelope: Envelope) -> dict[str, str | None]:
    params: dict[str, str | None] = {"SIZE": str(envelope.size)}
    for key, value in envelope.params.items():
        if key.upper() in ("BODY", "SMTPUTF8", "RET", "ENVID"):
            params[key.upper()] = value
    return params


def _rcpt_params(recipient) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    if recipient.notify:
        params["NOTIFY"] = ",".join(recipient.notify)
    if recipient.orcpt:
        params["ORCPT"] = recipient.orcpt
    return params


def _reply_text(reply: Reply) -> str:
    status = f" {reply.status}" if reply.status else ""
    return f"{reply.code}{status} {' '.join(reply.lines)}"


def _describe(exc: BaseException) -> str:
    """Return an error's text, or its cause's when it has none.

    trio.SSLStream raises BrokenResourceError with an empty message and
    the ssl.SSLError (e.g. "certificate verify failed") as its cause.
    """
    text = str(exc)
    if not text and exc.__cause__ is not None:
        return _describe(exc.__cause__)
    return text or type(exc).__name__


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _read_password(path: Path | None) -> str:
    """Read the first line of a password file that only its owner can read."""
    if path is None:
        raise _HopFailed("the route sets auth_user but no auth_password_file")
    try:
        info = os.stat(path)
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise _HopFailed(
                f"auth_password_file {path} is readable by other users; "
                f"run chmod 600 {path}"
            )
        with open(path, encoding="utf-8") as handle:
            return handle.readline().rstrip("\r\n")
    except OSError as exc:
        raise _HopFailed(f"cannot read auth_password_file {path}: {exc.strerror}") from exc
