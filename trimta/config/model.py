"""The configuration as typed values: one attrs class per TOML table.

Every field here is the validated, normalised form of one TOML key; the
TOML spelling of each key is the field name. Loading, checking and error
messages live in `load.py`, and the value types that need parsing
(durations, "host:port" strings, networks) in `values.py`.
"""

from __future__ import annotations

import socket
from pathlib import Path

import attrs

from trimta.config.values import (
    DomainName,
    Duration,
    HostPort,
    ListenAddress,
    LocalPart,
    NameserverAddress,
    Network,
    NextHop,
    RouteKey,
)
from trimta.spool.syncfs import default_sync_mode

# Later protocols (ODMR) add their kind here and in the daemon.
LISTENER_KINDS = ("smtp", "submission", "odmr")
LISTENER_TLS_MODES = ("starttls", "implicit", "none")


def _default_tls(listener: Listener) -> str:
    return "starttls" if listener.tls_cert is not None else "none"


@attrs.frozen
class Listener:
    """One socket that accepts SMTP sessions.

    Attributes:
        address: Where to listen; the host is an IP address, "*" for every
            address, or "localhost".
        kind: The protocol served: "smtp" (mail exchange and relay) or
            "submission" (RFC 6409: AUTH required before MAIL), or "odmr"
            (RFC 2645: authenticated customers send ATRN to receive their
            held domains' mail on the same connection; port 366 by
            convention).
        etrn: Whether ETRN (RFC 1985) is offered on this listener.
        tls_cert: PEM file with the server certificate chain.
        tls_key: PEM file with the certificate's private key.
        tls: "starttls" offers STARTTLS (RFC 3207), "implicit" starts TLS
            on accept (port 465), "none" never uses TLS. The default is
            "starttls" when tls_cert is set, else "none".
        allow_plaintext_auth: Offer AUTH PLAIN and LOGIN without TLS
            (passwords then cross the network in the clear).
    """

    address: ListenAddress
    kind: str = "smtp"
    etrn: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls: str = attrs.field(default=attrs.Factory(_default_tls, takes_self=True))
    allow_plaintext_auth: bool = False


@attrs.frozen
class Auth:
    """SMTP AUTH for the receiver's listeners.

    Attributes:
        credentials: JSON file of users, password hashes and domains,
            written by `trimta passwd`; None means AUTH is not offered.
    """

    credentials: Path | None = None


@attrs.frozen
class Domains:
    """The domains trimta accepts mail for, as lowercase A-labels.

    Attributes:
        local: Delivered into Maildir folders under `local.maildir_root`.
        relay: Queued and relayed to the domain's next hop.
        hold: Queued and kept until the domain's owner asks for it.
    """

    local: tuple[DomainName, ...] = (DomainName("localhost"),)
    relay: tuple[DomainName, ...] = ()
    hold: tuple[DomainName, ...] = ()


@attrs.frozen
class Relay:
    """Relay permission for clients outside the served domains.

    Attributes:
        trusted_networks: Client networks allowed to send to any domain.
    """

    trusted_networks: tuple[Network, ...] = ()


@attrs.frozen
class Local:
    """Local delivery into Maildir folders.

    Attributes:
        maildir_root: Folder under which each local domain has one folder
            holding one Maildir per mailbox.
        postmaster: Address (in a local domain) that receives mail for
            `postmaster` of every local domain; empty means each local
            domain's own `postmaster` mailbox.
        users: Per local domain, the only local parts that exist (compared
            without case); a domain not listed accepts every local part.
    """

    maildir_root: Path = Path("mail")
    postmaster: str = ""
    users: dict[DomainName, tuple[LocalPart, ...]] = attrs.Factory(dict)


ROUTE_TLS_MODES = ("none", "opportunistic", "required", "implicit")


@attrs.frozen
class Route:
    """How to reach the next hop of one destination domain (or of all).

    A route written as a plain list of "host:port" strings sets `hosts`
    only; a table sets any of the fields.

    Attributes:
        hosts: Next hops, tried in order; a host name is looked up with
            A/AAAA, never MX.
        tls: "opportunistic" uses STARTTLS when offered without checking
            the certificate; "required" fails (and defers) unless STARTTLS
            succeeds with a verified certificate; "implicit" starts TLS on
            connect (port 465) with a verified certificate; "none" never
            uses TLS.
        ca_file: PEM file of trusted CA certificates for "required" and
            "implicit"; empty means the system's CA store.
        auth_user: User name for SMTP AUTH (PLAIN or LOGIN); empty means
            no AUTH.
        auth_password_file: File whose first line is the AUTH password;
            it must not be readable by other users.
    """

    hosts: tuple[NextHop, ...]
    tls: str = "opportunistic"
    ca_file: Path | None = None
    auth_user: str = ""
    auth_password_file: Path | None = None


@attrs.frozen
class Etrn:
    """ETRN (RFC 1985): who may release which held domains, and how often.

    Attributes:
        queues: Named queues for `ETRN #name`, each a list of held domains.
        dns_check: Held domains whose ETRN must come from an address that
            the domain's MX hosts or A/AAAA records resolve to.
        max_requests_per_minute: ETRN commands accepted per client address
            per minute; more get 458.
    """

    queues: dict[str, tuple[DomainName, ...]] = attrs.Factory(dict)
    dns_check: tuple[DomainName, ...] = ()
    max_requests_per_minute: int = 10


@attrs.frozen
class Hold:
    """Mail for held domains.

    Attributes:
        lifetime: Age after which held mail not yet released bounces.
    """

    lifetime: Duration = Duration(7 * 86400)


@attrs.frozen
class Dns:
    """The DNS resolver used for MX lookups.

    Attributes:
        nameservers: Servers to ask; empty means the system's resolv.conf.
    """

    nameservers: tuple[NameserverAddress, ...] = ()


@attrs.frozen
class Delivery:
    """Limits and schedule of outbound delivery.

    Attributes:
        max_concurrency: Delivery tasks running at once, over all domains.
        per_domain_concurrency: Delivery tasks running at once per domain.
        min_backoff: First delay before retrying a deferred message.
        max_backoff: Maximum delay between two retries.
        max_queue_lifetime: Age after which a deferred message bounces.
        connect_timeout: Time allowed for each TCP connect (and TLS
            handshake) to a next hop.
        greeting_timeout: Wait for the next hop's 220 greeting.
        mail_timeout: Wait for the reply to MAIL.
        rcpt_timeout: Wait for the reply to each RCPT.
        data_init_timeout: Wait for the 354 reply to DATA.
        data_block_timeout: Time allowed for each send of message data.
        data_end_timeout: Wait for the reply after the final dot.
        command_timeout: Wait for the reply to every other command (EHLO,
            HELO, STARTTLS, AUTH, RSET, NOOP, QUIT).

    The seven reply timeouts default to the minimums of RFC 5321 4.5.3.2.
    That section sets none for the commands of `command_timeout`, so they
    get the 5 minutes of MAIL and RCPT. The ATRN turnaround uses these
    timeouts too.
    """

    max_concurrency: int = 20
    per_domain_concurrency: int = 4
    min_backoff: Duration = Duration(300)
    max_backoff: Duration = Duration(4000)
    max_queue_lifetime: Duration = Duration(5 * 86400)
    connect_timeout: Duration = Duration(30)
    greeting_timeout: Duration = Duration(5 * 60)
    mail_timeout: Duration = Duration(5 * 60)
    rcpt_timeout: Duration = Duration(5 * 60)
    data_init_timeout: Duration = Duration(2 * 60)
    data_block_timeout: Duration = Duration(3 * 60)
    data_end_timeout: Duration = Duration(10 * 60)
    command_timeout: Duration = Duration(5 * 60)


@attrs.frozen
class Limits:
    """Per-session and per-server limits of the SMTP receiver.

    Attributes:
        max_message_size: Largest message accepted, in octets (0: no limit).
        max_recipients: Recipients accepted per message; more get 452.
        max_errors: Protocol errors per session before it is closed.
        command_timeout: Time allowed for one whole command line, counted
            from the previous reply, so a client that sends a byte now and
            then is still closed (RFC 5321 4.5.3.2.7 sets 5 minutes).
        data_timeout: Time allowed for the message text beyond what
            `min_data_rate` earns.
        min_data_rate: Slowest average DATA rate accepted, in octets per
            second: DATA must end within `data_timeout` plus one second per
            `min_data_rate` octets received.
        max_sessions: Sessions open at once over all clients.
        max_sessions_per_client: Sessions open at once from one address.
        shutdown_grace: Time given to open sessions when stopping.
    """

    max_message_size: int = 10_240_000
    max_recipients: int = 100
    max_errors: int = 20
    command_timeout: Duration = Duration(300)
    data_timeout: Duration = Duration(300)
    min_data_rate: int = 500
    max_sessions: int = 1000
    max_sessions_per_client: int = 20
    shutdown_grace: Duration = Duration(10)


def default_hostname() -> str:
    """Return this machine's fully qualified name, for greetings."""
    return socket.getfqdn() or "localhost"


def default_listeners() -> tuple[Listener, ...]:
    return (Listener(address=ListenAddress(HostPort("127.0.0.1", 2525))),)


@attrs.frozen
class Config:
    """The whole configuration of one trimta daemon.

    Attributes:
        hostname: Name used in the greeting, EHLO reply and Received:.
        spool: Folder of the message spool.
        spool_sync: How a commit batch makes the spool durable: "filesystem"
            (one syncfs per step, the default where Linux offers it) or
            "file" (an fsync per file and folder).
        listener: The sockets to accept SMTP sessions on.
        domains: The domains served, by role.
        relay: Who may relay.
        local: Maildir delivery.
        routes: Next hops per destination domain; the key "*" is the
            smarthost for every domain without a route of its own.
        dns: The resolver for MX lookups.
        delivery: Outbound delivery limits and retry schedule.
        limits: SMTP receiver limits.
        etrn: ETRN rules for held domains.
        hold: Held mail's lifetime.
        auth: SMTP AUTH credentials.
    """

    hostname: str = attrs.Factory(default_hostname)
    spool: Path = Path("spool")
    spool_sync: str = attrs.Factory(default_sync_mode)
    listener: tuple[Listener, ...] = attrs.Factory(default_listeners)
    domains: Domains = Domains()
    relay: Relay = Relay()
    local: Local = Local()
    routes: dict[RouteKey, Route] = attrs.Factory(dict)
    dns: Dns = Dns()
    delivery: Delivery = Delivery()
    limits: Limits = Limits()
    etrn: Etrn = Etrn()
    hold: Hold = Hold()
    auth: Auth = Auth()
