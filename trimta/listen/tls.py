"""Server-side TLS contexts for the listeners (STARTTLS and implicit TLS).

The certificate and key are checked one step at a time before OpenSSL
loads them. Each file must be readable and contain a PEM block of the
right kind. The key must not be encrypted, because a daemon cannot ask
for a passphrase. OpenSSL's own errors ("[SSL] PEM lib") name neither the
file nor the fix, so each step reports the configuration key, the path
and what to do.
"""

from __future__ import annotations

import json
import re
import ssl
from pathlib import Path

import attrs

_CERTIFICATE = re.compile(rb"-----BEGIN (?:TRUSTED |X509 )?CERTIFICATE-----")
# "PRIVATE KEY" (PKCS #8), "RSA PRIVATE KEY", "EC PRIVATE KEY" and
# "ENCRYPTED PRIVATE KEY".
_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
# PKCS #8 and the older OpenSSL "Proc-Type" header mark encrypted keys.
_ENCRYPTED = re.compile(
    rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: 4,ENCRYPTED"
)

_CERT_FIX = "point tls_cert at a readable PEM file with the server certificate chain"
_KEY_FIX = "point tls_key at a readable PEM file with the certificate's private key"


@attrs.define(eq=False)
class TlsSetupError(Exception):
    """A listener's certificate or key file that cannot be used.

    Attributes:
        key: The configuration key of the file at fault, "tls_cert" or
            "tls_key".
        path: The file.
        reason: What is wrong with it.
        fix: What to do about it.
    """

    key: str
    path: Path
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.key} = {json.dumps(str(self.path))}: {self.reason}; {self.fix}"


def build_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Build a TLS 1.2+ server context from PEM certificate and key files.

    Raises:
        TlsSetupError: a file is missing, unreadable, not PEM, an encrypted
            key, or the key does not belong to the certificate.
    """
    _check_certificate(cert)
    _check_key(key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        # The password callback stops OpenSSL from prompting on a terminal
        # for a key that the checks above did not recognise as encrypted.
        context.load_cert_chain(str(cert), str(key), password=_reject_passphrase_prompt)
    except ssl.SSLError as error:
        raise _load_error(cert, key, error) from error
    except _PassphraseNeeded as error:
        raise TlsSetupError("tls_key", key, str(error), _KEY_FIX) from error
    except OSError as error:  # the file changed after the checks
        reason = f"cannot read the file: {error.strerror or error}"
        raise TlsSetupError("tls_cert", cert, reason, _CERT_FIX) from error
    return context


def _check_certificate(cert: Path) -> None:
    text = _read(cert, "tls_cert", _CERT_FIX)
    if not _CERTIFICATE.search(text):
        reason = "no PEM certificate found (no BEGIN CERTIFICATE line)"
        raise TlsSetupError("tls_cert", cert, reason, _CERT_FIX)


def _check_key(key: Path) -> None:
    text = _read(key, "tls_key", _KEY_FIX)
    if not _PRIVATE_KEY.search(text):
        reason = "no PEM private key found (no BEGIN PRIVATE KEY line)"
        raise TlsSetupError("tls_key", key, reason, _KEY_FIX)
    if _ENCRYPTED.search(text):
        raise TlsSetupError(
            "tls_key",
            key,
            "the key is encrypted, and trimta cannot ask for its passphrase",
            f"write it without one: openssl pkey -in {key} -out KEYFILE",
        )


def _read(path: Path, key: str, fix: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        reason = f"cannot read the file: {error.strerror or error}"
        raise TlsSetupError(key, path, reason, fix) from error


def _load_error(cert: Path, key: Path, error: ssl.SSLError) -> TlsSetupError:
    if error.reason == "KEY_VALUES_MISMATCH":
        return TlsSetupError(
            "tls_key",
            key,
            f"this key does not belong to the certificate in {cert}",
            "give the private key that the certificate was issued for",
        )
    reason = f"OpenSSL cannot load it with tls_key {key}: {error.reason or error}"
    return TlsSetupError("tls_cert", cert, reason, _CERT_FIX)


class _PassphraseNeeded(Exception):
    """OpenSSL asked for the passphrase of an encrypted key."""


def _reject_passphrase_prompt() -> bytes:
    raise _PassphraseNeeded(
        "the key is encrypted, and trimta cannot ask for its passphrase"
    )
