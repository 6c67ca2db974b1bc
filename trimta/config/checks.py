"""Rules of the configuration that one value's type cannot express."""

from __future__ import annotations

from collections.abc import Iterator

from trimta.config.model import (
    LISTENER_KINDS,
    LISTENER_TLS_MODES,
    ROUTE_TLS_MODES,
    Config,
    Listener,
)
from trimta.config.values import HOSTNAME_PATTERN
from trimta.smtp.address import AddressError, normalize_domain
from trimta.spool.syncfs import SYNC_MODES, syncfs

# (key path, minimum) for every whole-number setting.
_MINIMUMS = (
    ("etrn.max_requests_per_minute", 1),
    ("delivery.max_concurrency", 1),
    ("delivery.per_domain_concurrency", 1),
    ("limits.max_message_size", 0),
    ("limits.max_recipients", 1),
    ("limits.max_errors", 1),
    ("limits.min_data_rate", 0),
    ("limits.max_sessions", 1),
    ("limits.max_sessions_per_client", 1),
)

Finding = tuple[str, object, str]


def run(config: Config) -> Iterator[Finding]:
    """Yield (key path, value, expectation) for each broken rule."""
    yield from _check_minimums(config)
    yield from _check_hostname(config)
    yield from _check_spool_sync(config)
    yield from _check_listeners(config)
    yield from _check_domains(config)
    yield from _check_local(config)
    yield from _check_delivery(config)
    yield from _check_routes(config)
    yield from _check_durations(config)
    yield from _check_folders(config)
    yield from _check_etrn(config)


def _get(config: Config, path: str) -> object:
    value: object = config
    for name in path.split("."):
        value = getattr(value, name)
    return value


def _check_minimums(config: Config) -> Iterator[Finding]:
    for path, minimum in _MINIMUMS:
        value = _get(config, path)
        if value < minimum:  # type: ignore[operator]
            yield path, value, f"must be {minimum} or more"


def _check_hostname(config: Config) -> Iterator[Finding]:
    if not HOSTNAME_PATTERN.fullmatch(config.hostname):
        yield (
            "hostname",
            config.hostname,
            'expected a fully qualified host name such as "mail.example.org"',
        )


def _check_spool_sync(config: Config) -> Iterator[Finding]:
    if config.spool_sync not in SYNC_MODES:
        yield "spool_sync", config.spool_sync, "expected one of: " + ", ".join(SYNC_MODES)
    elif config.spool_sync == "filesystem" and syncfs is None:
        yield (
            "spool_sync",
            config.spool_sync,
            'this system has no syncfs(2); use "file"',
        )


def _check_listeners(config: Config) -> Iterator[Finding]:
    if not config.listener:
        yield "listener", [], "at least one [[listener]] table is needed"
    seen = set()
    for index, listener in enumerate(config.listener):
        if listener.kind not in LISTENER_KINDS:
            yield (
                f"listener[{index}].kind",
                listener.kind,
                "expected one of: " + ", ".join(LISTENER_KINDS),
            )
        yield from _check_listener_tls(index, listener)
        if listener.kind in ("submission", "odmr") and config.auth.credentials is None:
            yield (
                f"listener[{index}].kind",
                listener.kind,
                f"a {listener.kind} listener requires AUTH; set [auth] credentials",
            )
        if listener.address in seen:
            yield (
                f"listener[{index}].address",
                str(listener.address),
                "this address is already used by another listener",
            )
        seen.add(listener.address)


def _check_listener_tls(index: int, listener: Listener) -> Iterator[Finding]:
    path = f"listener[{index}]"
    if listener.tls not in LISTENER_TLS_MODES:
        yield (
            f"{path}.tls",
            listener.tls,
            "expected one of: " + ", ".join(LISTENER_TLS_MODES),
        )
        return
    if listener.tls == "none":
        return
    for key in ("tls_cert", "tls_key"):
        if getattr(listener, key) is None:
            yield (
                f"{path}.tls",
                listener.tls,
                f"{path}.{key} is missing; TLS needs tls_cert and tls_key "
                '(PEM file paths), or write tls = "none"',
            )


def _check_domains(config: Config) -> Iterator[Finding]:
    owner: dict[str, str] = {}
    for role in ("local", "relay", "hold"):
        for index, domain in enumerate(getattr(config.domains, role)):
            if domain in owner:
                yield (
                    f"domains.{role}[{index}]",
                    domain,
                    f"already listed in domains.{owner[domain]}; "
                    "a domain takes one role",
                )
            owner.setdefault(domain, role)


def _check_local(config: Config) -> Iterator[Finding]:
    local = set(config.domains.local)
    for domain in config.local.users:
        if domain not in local:
            yield (
                f'local.users."{domain}"',
                list(config.local.users[domain]),
                f'"{domain}" is not in domains.local; add it there or remove '
                "this entry",
            )
    postmaster = config.local.postmaster
    if postmaster:
        _, at, domain = postmaster.rpartition("@")
        if not at or _normalize(domain) not in local:
            yield (
                "local.postmaster",
                postmaster,
                "expected an address in one of domains.local, or \"\" for "
                "each local domain's own postmaster mailbox",
            )


def _normalize(domain: str) -> str | None:
    try:
        return normalize_domain(domain)
    except AddressError:
        return None


def _check_delivery(config: Config) -> Iterator[Finding]:
    delivery = config.delivery
    if delivery.min_backoff.seconds <= 0:
        yield "delivery.min_backoff", str(delivery.min_backoff), "must be above 0"
    if delivery.max_backoff < delivery.min_backoff:
        yield (
            "delivery.max_backoff",
            str(delivery.max_backoff),
            f"must not be below delivery.min_backoff ({delivery.min_backoff})",
        )


def _check_routes(config: Config) -> Iterator[Finding]:
    for key, route in config.routes.items():
        path = f'routes."{key}"'
        if not route.hosts:
            yield f"{path}.hosts", [], 'at least one "host:port" is needed'
        if route.tls not in ROUTE_TLS_MODES:
            yield (
                f"{path}.tls",
                route.tls,
                "expected one of: " + ", ".join(ROUTE_TLS_MODES),
            )
        if bool(route.auth_user) != (route.auth_password_file is not None):
            yield (
                f"{path}.auth_user",
                route.auth_user,
                "auth_user and auth_password_file go together; set both or neither",
            )


# Durations that must be above 0 (a zero wait would fail every time).
_POSITIVE_DURATIONS = (
    "limits.command_timeout",
    "limits.data_timeout",
    "delivery.connect_timeout",
    "delivery.greeting_timeout",
    "delivery.mail_timeout",
    "delivery.rcpt_timeout",
    "delivery.data_init_timeout",
    "delivery.data_block_timeout",
    "delivery.data_end_timeout",
    "delivery.command_timeout",
)


def _check_durations(config: Config) -> Iterator[Finding]:
    for path in _POSITIVE_DURATIONS:
        value = _get(config, path)
        if value.seconds <= 0:
            yield path, str(value), "must be above 0, e.g. \"5m\""


def _check_folders(config: Config) -> Iterator[Finding]:
    spool = config.spool.resolve()
    maildir_root = config.local.maildir_root.resolve()
    if spool == maildir_root or spool in maildir_root.parents or maildir_root in spool.parents:
        yield (
            "local.maildir_root",
            str(config.local.maildir_root),
            f"must be a folder apart from spool ({config.spool}); neither may "
            "contain the other",
        )


def _check_etrn(config: Config) -> Iterator[Finding]:
    held = set(config.domains.hold)
    for name, domains in config.etrn.queues.items():
        for index, domain in enumerate(domains):
            if domain not in held:
                yield (
                    f'etrn.queues."{name}"[{index}]',
                    domain,
                    "ETRN releases only held domains; add it to domains.hold",
                )
    for index, domain in enumerate(config.etrn.dns_check):
        if domain not in held:
            yield (
                f"etrn.dns_check[{index}]",
                domain,
                "ETRN releases only held domains; add it to domains.hold",
            )
