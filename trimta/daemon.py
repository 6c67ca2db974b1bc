"""The daemon: one top-level nursery supervising spool, delivery and listeners.

Start order: open the spool (recovery), start the group committer and the
local delivery task, hand every part recovered from the spool to delivery,
open the listeners, then accept. The first SIGTERM or SIGINT stops the
listeners and lets sessions finish within `limits.shutdown_grace`, then
cancels delivery work (mail stays queued) and returns. A second signal
cancels everything at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import attrs
import dns.resolver
import trio

from trimta.admin.actions import QueueActions
from trimta.admin.control import serve_control
from trimta.auth.credentials import CredentialsError, CredentialStore, load_credentials
from trimta.config.model import Config, Delivery, Listener
from trimta.deliver.local import LocalDeliverySettings, run_local_delivery
from trimta.deliver.mx import MxResolver
from trimta.deliver.notify import Bouncer
from trimta.deliver.queue import QueueManager
from trimta.deliver.remote import (
    CaFileError,
    RemoteDeliverer,
    RemoteSettings,
    load_ca_file,
)
from trimta.deliver.schedule import RetryPolicy
from trimta.listen.conn import SessionContext
from trimta.listen.policy import RecipientPolicy
from trimta.ondemand.etrn import EtrnService
from trimta.ondemand.odmr import AtrnService
from trimta.listen.serve import ListenError, SessionLimits, SmtpServer, open_listeners
from trimta.listen.tls import TlsSetupError, build_server_context
from trimta.smtp import sasl
from trimta.smtp.address import AddressError, parse_mailbox
from trimta.smtp.client import ClientTimeouts
from trimta.smtp.server import ServerSettings
from trimta.spool.envelope import PartRef
from trimta.spool.store import Spool, SpoolError

logger = logging.getLogger("trimta")

# In the spool folder: held with flock(2) by the running daemon, with its pid.
LOCK_FILE = "lock"


@attrs.define(eq=False)
class StartupError(Exception):
    """A problem that keeps the daemon from starting, with the fix."""

    message: str

    def __str__(self) -> str:
        return self.message


def run(config: Config) -> bool:
    """Run the daemon until a stop signal.

    Returns:
        True after a graceful stop, False when a second signal cut it short.

    Raises:
        StartupError: The spool or a listener could not be opened.
    """
    return trio.run(serve_daemon, config)


def server_settings(
    config: Config,
    *,
    etrn: bool = False,
    listener: Listener | None = None,
    credentials: CredentialStore | None = None,
) -> ServerSettings:
    """Build the SMTP engine settings from the configuration.

    Args:
        config: The daemon's configuration.
        etrn: Offer ETRN.
        listener: The listener whose TLS, AUTH and kind settings apply;
            None gives a plain "smtp" listener without TLS.
        credentials: The AUTH users; None offers no AUTH.
    """
    limits = config.limits
    mechanisms: tuple[str, ...] = ()
    if credentials is not None:
        mechanisms = tuple(
            name
            for name in sasl.MECHANISMS
            if name != "CRAM-MD5" or credentials.has_cram_md5
        )
    return ServerSettings(
        hostname=config.hostname,
        max_message_size=limits.max_message_size,
        max_recipients=limits.max_recipients,
        max_errors=limits.max_errors,
        etrn=etrn,
        starttls=listener is not None and listener.tls == "starttls",
        auth_mechanisms=mechanisms,
        allow_plaintext_auth=listener is not None and listener.allow_plaintext_auth,
        require_auth=listener is not None and listener.kind == "submission",
        odmr=listener is not None and listener.kind == "odmr",
    )


@attrs.frozen
class ListenerSecurity:
    """TLS contexts and AUTH users, loaded once before the listeners start.

    Attributes:
        tls_contexts: Server TLS context per listener that uses TLS.
        credentials: The AUTH users, or None when [auth] credentials is unset.
    """

    tls_contexts: dict[Listener, ssl.SSLContext]
    credentials: CredentialStore | None


def load_listener_security(config: Config) -> ListenerSecurity:
    """Load every listener's certificate and the credentials file.

    Raises:
        StartupError: a certificate, key or the credentials file is unusable.
    """
    contexts = {}
    for index, listener in enumerate(config.listener):
        if listener.tls == "none":
            continue
        try:
            contexts[listener] = build_server_context(
                listener.tls_cert, listener.tls_key
            )
        except TlsSetupError as exc:
            raise StartupError(f"listener[{index}].{exc}") from exc
    credentials = None
    if config.auth.credentials is not None:
        try:
            credentials = load_credentials(config.auth.credentials)
        except CredentialsError as exc:
            raise StartupError(f"{exc} (key: auth.credentials)") from exc
    return ListenerSecurity(contexts, credentials)


def check_route_ca_files(config: Config) -> None:
    """Load every route's ca_file once, so a bad one stops the start.

    A route whose tls mode never verifies ignores its ca_file, but a bad
    path there is still a mistake in the configuration, so it is checked
    too.

    Raises:
        StartupError: a ca_file is missing, unreadable or not PEM.
    """
    for key, route in config.routes.items():
        if route.ca_file is None:
            continue
        try:
            load_ca_file(route.ca_file)
        except CaFileError as exc:
            raise StartupError(
                f"routes.{json.dumps(key)}.ca_file = {_quote(route.ca_file)}: "
                f"{exc.reason}; point ca_file at a PEM file of trusted CA "
                'certificates, or write "" for the system\'s CA store'
            ) from exc


def check_spool_folder(config: Config) -> None:
    """Check, without changing anything, that the spool is or can become a folder.

    Raises:
        StartupError: the path (or a parent) is a file, or the folder
            that would hold the spool cannot be written.
    """
    spool = Path(os.path.abspath(config.spool))
    existing = next(path for path in (spool, *spool.parents) if path.exists())
    if not existing.is_dir():
        raise StartupError(
            f"spool = {_quote(config.spool)}: {existing} is a file, not a "
            "folder; point spool at a folder (trimta creates it when missing)"
        )
    if os.access(existing, os.W_OK | os.X_OK):
        return
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        reason = "the file system is read-only"
        fix = "remount it read-write or point spool at a writable folder"
    else:
        reason = "permission denied for trimta's user"
        fix = "give that user write access or point spool at another folder"
    raise StartupError(
        f"spool = {_quote(config.spool)}: cannot write in {existing}: {reason}; {fix}"
    )


def check_files(config: Config) -> list[StartupError]:
    """Check, without changing anything, the files and folders needed at start.

    `trimta check-config` runs this. `trimta serve` runs the same checks
    as it starts, and also writes a probe file into the spool.

    Returns:
        One error per failed check: the spool, the listeners' certificates
        and the credentials file, and the routes' CA files.
    """
    problems = []
    for check in (check_spool_folder, load_listener_security, check_route_ca_files):
        try:
            check(config)
        except StartupError as exc:
            problems.append(exc)
    return problems


def _quote(path: Path) -> str:
    return json.dumps(str(path))


async def serve_daemon(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> bool:
    """Run every part of the daemon in one nursery until a stop signal.

    `task_status.started()` receives the (host, port) pairs listened on.

    Returns:
        True after a graceful stop, False after an immediate one.
    """
    with (
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals,
        _spool_lock(config),
    ):
        security = load_listener_security(config)
        check_route_ca_files(config)
        spool = await _open_spool(config)
        recovered = await _recover_spool(spool, config)
        resolver = build_resolver(config)
        listeners = await _open_all_listeners(config)
        stop = _StopState()
        async with trio.open_nursery() as root:
            # The committer outlives every task that writes to the spool:
            # delivery work is cancelled first, in its own nursery.
            await root.start(spool.run_committer)
            async with trio.open_nursery() as work:
                queue, router, bouncer = await _start_delivery(
                    work, config, spool, recovered, resolver
                )
                etrn = EtrnService(
                    config,
                    spool,
                    queue.release_domain,
                    build_resolver(config, loop_check=False),
                    work,
                )
                actions = QueueActions(
                    spool=spool,
                    queue=queue,
                    local_domains=frozenset(config.domains.local),
                    held_domains=frozenset(config.domains.hold),
                    start_release=etrn.start_release,
                    route=router.route,
                    bounce=bouncer,
                )
                await work.start(serve_control, config.spool, actions.handle)
                atrn = None
                if security.credentials is not None:
                    atrn = AtrnService(
                        hostname=config.hostname,
                        credentials=security.credentials,
                        held_domains=frozenset(config.domains.hold),
                        spool=spool,
                        queue=queue,
                        etrn=etrn,
                    )
                server, contexts = _build_server(
                    config, spool, etrn, atrn, listeners, security
                )
                stop_accepting = trio.Event()
                server_done = trio.Event()
                work.start_soon(
                    _serve_smtp, server, contexts, config, stop_accepting, server_done
                )
                addresses = [
                    listener.socket.getsockname()[:2] for listener, _ in listeners
                ]
                logger.info(
                    "started hostname=%s listening=%s spool=%s recovered=%d",
                    config.hostname,
                    ",".join(f"{host}:{port}" for host, port in addresses),
                    config.spool,
                    len(recovered),
                )
                task_status.started(addresses)
                await _stop_on_signals(signals, stop_accepting, server_done, work, stop)
            root.cancel_scope.cancel()
    logger.info("stopped graceful=%s", stop.graceful)
    return stop.graceful


@attrs.define
class _StopState:
    """Whether the stop ran its course or a second signal cut it short."""

    graceful: bool = True


def _build_server(
    config: Config,
    spool: Spool,
    etrn: EtrnService,
    atrn: AtrnService | None,
    listeners: list[tuple[trio.SocketListener, Listener]],
    security: ListenerSecurity,
) -> tuple[SmtpServer, list[tuple[trio.SocketListener, SessionContext]]]:
    """Build the SMTP server and one session context per listener."""
    base = SessionContext(
        settings=server_settings(config),
        policy=RecipientPolicy(config),
        spool=spool,
        command_timeout=config.limits.command_timeout.seconds,
        data_timeout=config.limits.data_timeout.seconds,
        min_data_rate=config.limits.min_data_rate,
    )
    contexts = []
    for socket_listener, listener in listeners:
        # attrs.evolve keeps the shared stop event and idle-scope set.
        # The auth throttle is shared too, so that switching listeners
        # does not reset a client's failure delay.
        odmr = listener.kind == "odmr"
        offer_etrn = listener.etrn and not odmr
        context = attrs.evolve(
            base,
            settings=server_settings(
                config,
                etrn=offer_etrn,
                listener=listener,
                credentials=security.credentials,
            ),
            etrn=etrn if offer_etrn else None,
            atrn=atrn if odmr else None,
            tls_context=security.tls_contexts.get(listener),
            implicit_tls=listener.tls == "implicit",
            credentials=security.credentials,
            submission=listener.kind == "submission",
        )
        contexts.append((socket_listener, context))
    limits = SessionLimits(
        config.limits.max_sessions, config.limits.max_sessions_per_client
    )
    return SmtpServer(base, limits), contexts


async def _serve_smtp(server, listeners, config, stop_accepting, done) -> None:
    try:
        await server.serve(listeners, config.limits.shutdown_grace.seconds, stop_accepting)
    finally:
        done.set()


async def _stop_on_signals(signals, stop_accepting, server_done, work, stop) -> None:
    async for signum in signals:
        logger.info("stopping on %s", signal.Signals(signum).name)
        stop_accepting.set()
        break
    async with trio.open_nursery() as waiting:
        waiting.start_soon(_cancel_on_second_signal, signals, work, stop)
        await server_done.wait()
        waiting.cancel_scope.cancel()
    logger.info("sessions closed; stopping delivery (queued mail stays queued)")
    work.cancel_scope.cancel()


async def _cancel_on_second_signal(signals, work: trio.Nursery, stop: _StopState) -> None:
    async for signum in signals:
        logger.warning("second %s: stopping at once", signal.Signals(signum).name)
        stop.graceful = False
        work.cancel_scope.cancel()
        return


@contextlib.contextmanager
def _spool_lock(config: Config) -> Iterator[None]:
    """Hold the spool's lock file for the daemon's life.

    Recovery deletes files that look half written, so a second daemon on
    the same spool would delete the first one's mail in flight. The lock
    is an flock(2), which the kernel releases when the process ends, even
    by SIGKILL.

    Raises:
        StartupError: another process holds the lock, or the lock file
            cannot be created.
    """
    check_spool_folder(config)
    path = os.path.join(config.spool, LOCK_FILE)
    try:
        os.makedirs(config.spool, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(
            f"spool = {_quote(config.spool)}: cannot create {path}: "
            f"{exc.strerror or exc}; check that trimta's user can write the folder"
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise StartupError(
                f"spool = {_quote(config.spool)}: another trimta (pid {holder}) "
                f"already uses this spool and holds {path}; stop it first, or "
                "give this daemon a spool of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


async def _open_spool(config: Config) -> Spool:
    # _spool_lock has already run check_spool_folder and made the folder.
    spool = Spool(config.spool, sync_mode=config.spool_sync)
    try:
        await trio.to_thread.run_sync(_probe_spool, spool)
    except OSError as exc:
        raise StartupError(
            f"spool = {_quote(config.spool)}: cannot create or write the "
            f"folder: {exc.strerror or exc}; check that trimta's user can "
            "create, read and write it"
        ) from exc
    return spool


async def _recover_spool(spool: Spool, config: Config) -> list[PartRef]:
    try:
        return await spool.open()
    except (OSError, SpoolError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise StartupError(
            f"spool = {_quote(config.spool)}: recovery failed: {reason or exc}; "
            "check that trimta's user can read and write every file in it"
        ) from exc


def _probe_spool(spool: Spool) -> None:
    spool.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    probe = spool.root / ".probe"
    probe.write_bytes(b"")
    probe.unlink()


async def _open_all_listeners(
    config: Config,
) -> list[tuple[trio.SocketListener, Listener]]:
    listeners: list[tuple[trio.SocketListener, Listener]] = []
    try:
        for index, listener in enumerate(config.listener):
            for opened in await open_listeners(listener.address):
                listeners.append((opened, listener))
    except ListenError as exc:
        for opened, _ in listeners:
            await opened.aclose()
        raise StartupError(f"listener[{index}]: {exc}") from exc
    return listeners


async def _start_delivery(
    work: trio.Nursery,
    config: Config,
    spool: Spool,
    recovered: list[PartRef],
    resolver: MxResolver,
) -> tuple[QueueManager, _PartRouter, Bouncer]:
    """Start Maildir delivery and the queue manager, and route parts to them."""
    local_send, local_receive = trio.open_memory_channel(256)
    bouncer = _build_bouncer(config, spool)
    settings = LocalDeliverySettings(
        maildir_root=config.local.maildir_root,
        resolve_mailbox=lambda local_part, domain: _resolve_mailbox(
            config, local_part, domain
        ),
        retry_delay=config.delivery.min_backoff.seconds,
        max_retry_delay=config.delivery.max_backoff.seconds,
        bounce=bouncer,
    )
    await work.start(run_local_delivery, spool, settings, local_receive)

    remote_send, remote_receive = trio.open_memory_channel(256)
    queue = _build_queue_manager(config, spool, resolver, bouncer)
    await work.start(queue.run, remote_receive)
    work.start_soon(queue.run_hold_expiry)
    router = _PartRouter(
        local_domains=frozenset(config.domains.local),
        held_domains=frozenset(config.domains.hold),
        local=local_send,
        remote=remote_send,
    )
    work.start_soon(router.run, spool.subscribe(), recovered)
    return queue, router, bouncer


def _build_bouncer(config: Config, spool: Spool) -> Bouncer:
    return Bouncer(
        spool=spool,
        hostname=config.hostname,
        postmaster=config.local.postmaster or f"postmaster@{config.hostname}",
    )


def _build_queue_manager(
    config: Config, spool: Spool, resolver: MxResolver, bouncer: Bouncer
) -> QueueManager:
    delivery = config.delivery
    deliverer = RemoteDeliverer(
        RemoteSettings(
            hostname=config.hostname,
            routes=dict(config.routes),
            resolver=resolver,
            connect_timeout=delivery.connect_timeout.seconds,
            timeouts=client_timeouts(delivery),
        )
    )
    retry = RetryPolicy(
        min_backoff=delivery.min_backoff.seconds,
        max_backoff=delivery.max_backoff.seconds,
        max_lifetime=delivery.max_queue_lifetime.seconds,
    )
    return QueueManager(
        spool,
        deliverer,
        bouncer,
        retry,
        max_concurrency=delivery.max_concurrency,
        per_domain_concurrency=delivery.per_domain_concurrency,
        held_domains=frozenset(config.domains.hold),
        hold_lifetime=config.hold.lifetime.seconds,
    )


def client_timeouts(delivery: Delivery) -> ClientTimeouts:
    """Build the SMTP client's reply timeouts from the [delivery] table."""
    return ClientTimeouts(
        greeting=delivery.greeting_timeout.seconds,
        mail=delivery.mail_timeout.seconds,
        rcpt=delivery.rcpt_timeout.seconds,
        data_init=delivery.data_init_timeout.seconds,
        data_block=delivery.data_block_timeout.seconds,
        data_end=delivery.data_end_timeout.seconds,
        command=delivery.command_timeout.seconds,
    )


def build_resolver(config: Config, *, loop_check: bool = True) -> MxResolver:
    """Build the MX resolver, with trimta's own names and addresses for loop checks.

    Args:
        config: The daemon configuration.
        loop_check: False builds a resolver that returns every MX host,
            trimta's own included, as ETRN's DNS check needs.

    Raises:
        StartupError: No name server is configured and none can be read
            from /etc/resolv.conf.
    """
    own_addresses = {"127.0.0.1", "::1"}
    for listener in config.listener:
        if listener.address.host not in ("*", "localhost"):
            own_addresses.add(listener.address.host)
    # NOTE: a "*" listener also receives on the machine's other addresses,
    # which are not listed here; list them in [[listener]] tables if MX
    # records name them.
    nameservers = [(server.host, server.port) for server in config.dns.nameservers]
    try:
        return MxResolver(
            nameservers=nameservers or None,
            own_hostnames={config.hostname} if loop_check else set(),
            own_addresses=own_addresses if loop_check else set(),
        )
    except dns.resolver.NoResolverConfiguration as exc:
        raise StartupError(
            "no DNS name server found in /etc/resolv.conf; set [dns] nameservers"
        ) from exc


@attrs.define
class _PartRouter:
    """Sends each committed part to the delivery that serves its domain.

    Held parts stay in the spool until ETRN releases them.
    """

    local_domains: frozenset[str]
    held_domains: frozenset[str]
    local: trio.MemorySendChannel
    remote: trio.MemorySendChannel

    async def run(self, new_parts: trio.MemoryReceiveChannel, recovered: list[PartRef]) -> None:
        async with self.local, self.remote:
            for part in recovered:
                await self.route(part)
            async for part in new_parts:
                await self.route(part)

    async def route(self, part: PartRef) -> None:
        if part.domain in self.local_domains:
            await self.local.send(part)
        elif part.domain not in self.held_domains:
            await self.remote.send(part)


def _resolve_mailbox(config: Config, local_part: str, domain: str) -> str | None:
    """Map a stored local recipient to its mailbox, or None if it is gone.

    The session already applied the users lists and the postmaster rule at
    RCPT time; this checks again in case the configuration changed since.
    """
    try:
        # The stored address writes a local part in quotes where it needs them.
        local_part = parse_mailbox(f"{local_part}@{domain}", utf8=True).local
    except AddressError:
        return None
    users = config.local.users.get(domain)
    if users is None or local_part.lower() == "postmaster":
        return local_part
    return local_part.lower() if local_part.lower() in users else None
