"""Exceptions raised by the sans-IO SMTP engines.

``LocalProtocolError`` means the code driving an engine misused its API.
``RemoteProtocolError`` means the peer sent something the engine cannot
accept. ``AddressError`` means a mailbox, path or domain is invalid.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from trimta.smtp.replies import Reply


@attrs.define(auto_exc=True, eq=False)
class LocalProtocolError(Exception):
    """Error for an engine call that the current state does not allow."""

    message: str

    def __str__(self) -> str:
        return self.message


@attrs.define(auto_exc=True, eq=False)
class RemoteProtocolError(Exception):
    """Error for bytes from the peer that break the protocol.

    ``reply`` is the reply a server sends back, or None where no reply is
    due (a client reading a malformed server reply).
    """

    message: str
    reply: Reply | None = None

    def __str__(self) -> str:
        return self.message


@attrs.define(auto_exc=True, eq=False)
class AddressError(ValueError):
    """Error for an invalid mailbox, path or domain.

    ``reason`` is a human-readable sentence that names the broken rule,
    ``value`` the offending text, and ``needs_smtputf8`` is true when the
    text is only invalid because it contains non-ASCII characters and the
    client did not declare SMTPUTF8 (RFC 6531), so the server answers
    553 5.6.7 instead of a syntax error.
    """

    reason: str
    value: str = ""
    needs_smtputf8: bool = False

    def __str__(self) -> str:
        return self.reason
