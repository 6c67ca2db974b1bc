"""Which recipients a session accepts: local users, relay rules, postmaster.

The decision is a pure function of the configuration, the client's address
and the recipient, so it is tested without sockets. It returns the reply
to send and, for an accepted recipient, the spool domain and the address
to store. Recipients are matched on the normalised domain only: the
address parser never reinterprets `%`, `!` or quoted `@` as routing, so
`user%example.net@localhost` is a local part of `localhost`, never a relay.
"""

from __future__ import annotations

import ipaddress

import attrs

from trimta.config.model import Config
from trimta.smtp import replies
from trimta.smtp.address import Address
from trimta.smtp.replies import Reply

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@attrs.frozen
class Accepted:
    """A recipient accepted for the spool.

    Attributes:
        domain: Spool domain of the recipient (a normalised domain name).
        address: Address to store and deliver to.
        local: Whether the domain is delivered into Maildir folders.
    """

    domain: str
    address: str
    local: bool


@attrs.frozen
class Decision:
    """The reply to a RCPT command, and what to store when it is accepted."""

    reply: Reply
    accepted: Accepted | None = None


@attrs.frozen
class RecipientPolicy:
    """The recipient rules of one daemon.

    Attributes:
        config: The daemon's configuration.
        own_addresses: trimta's own IP addresses besides the one each
            session was accepted on; an address literal naming one of them
            counts as the first local domain.
    """

    config: Config
    own_addresses: frozenset[IPAddress] = frozenset()

    def check(
        self,
        recipient: Address,
        client: IPAddress | None,
        server: IPAddress | None = None,
        *,
        authenticated: bool = False,
    ) -> Decision:
        """Decide on one RCPT TO address.

        Args:
            recipient: The parsed RCPT TO address.
            client: The client's IP address.
            server: The local address the session was accepted on.
            authenticated: The session passed SMTP AUTH, so it may relay
                like a client in relay.trusted_networks.
        """
        if recipient.domain == "":
            return self._postmaster(recipient)
        domain = self._spool_domain(recipient, server)
        if domain is None:
            return self._relay_or_reject(recipient, client, authenticated)
        domains = self.config.domains
        if domain in domains.local:
            return self._local(recipient, domain)
        if domain in domains.relay or domain in domains.hold:
            return _accept(domain, str(recipient), local=False)
        return self._relay_or_reject(recipient, client, authenticated)

    def _spool_domain(self, recipient: Address, server: IPAddress | None) -> str | None:
        if not recipient.is_literal:
            return recipient.domain
        literal = ipaddress.ip_address(recipient.domain.strip("[]").removeprefix("IPv6:"))
        own = literal in self.own_addresses or literal == server
        if own and self.config.domains.local:
            return self.config.domains.local[0]
        return None

    def _postmaster(self, recipient: Address) -> Decision:
        target = self.config.local.postmaster
        if target:
            domain = target.rpartition("@")[2].lower()
            return _accept(domain, target, local=True)
        if not self.config.domains.local:
            return Decision(replies.mailbox_unavailable("<Postmaster>"))
        domain = self.config.domains.local[0]
        return _accept(domain, f"postmaster@{domain}", local=True)

    def _local(self, recipient: Address, domain: str) -> Decision:
        local_part = recipient.local
        if local_part.lower() == "postmaster":
            return self._postmaster(recipient)
        users = self.config.local.users.get(domain)
        if users is not None:
            if local_part.lower() not in users:
                return Decision(replies.user_unknown(str(recipient)))
            # A listed user gets one mailbox whatever case the client used.
            local_part = local_part.lower()
        stored = Address(local_part, domain)
        return _accept(domain, str(stored), local=True)

    def _relay_or_reject(
        self, recipient: Address, client: IPAddress | None, authenticated: bool
    ) -> Decision:
        allowed = authenticated or (client is not None and self._trusted(client))
        if recipient.is_literal or not allowed:
            return Decision(replies.relay_denied(str(recipient)))
        return _accept(recipient.domain, str(recipient), local=False)

    def _trusted(self, client: IPAddress) -> bool:
        if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
            client = client.ipv4_mapped
        return any(client in net for net in self.config.relay.trusted_networks)


def _accept(domain: str, address: str, *, local: bool) -> Decision:
    return Decision(replies.recipient_ok(address), Accepted(domain, address, local))
