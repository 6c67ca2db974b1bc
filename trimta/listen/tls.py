"""Server-side TLS contexts for the listeners (STARTTLS and implicit TLS)."""

from __future__ import annotations

import ssl
from pathlib import Path

import attrs


@attrs.define(eq=False)
class TlsSetupError(Exception):
    """A certificate or key that cannot be loaded.

    Attributes:
        cert: The certificate file.
        key: The private key file.
        reason: The error from the ssl module or the file system.
    """

    cert: Path
    key: Path
    reason: str

    def __str__(self) -> str:
        return (
            f"cannot load TLS certificate {self.cert} with key {self.key}: "
            f"{self.reason}; check that both are readable PEM files and that "
            "the key belongs to the certificate (keys: tls_cert, tls_key)"
        )


def build_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Build a TLS 1.2+ server context from PEM certificate and key files.

    Raises:
        TlsSetupError: a file is missing, unreadable or does not match.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise TlsSetupError(cert, key, reason) from error
    return context
