"""Sans-IO SMTP protocol engines: no sockets, clock, logging or file I/O."""

from trimta.smtp.address import Address, AddressError, normalize_domain, parse_path
from trimta.smtp.errors import LocalProtocolError, RemoteProtocolError
from trimta.smtp.replies import Reply, parse_reply_line
from trimta.smtp.server import ServerConnection, ServerSettings, State

__all__ = [
    "Address",
    "AddressError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "Reply",
    "ServerConnection",
    "ServerSettings",
    "State",
    "normalize_domain",
    "parse_path",
    "parse_reply_line",
]
