"""The credentials file: users, password hashes, CRAM-MD5 secrets, domains.

The file is JSON written by `trimta passwd`::

    {"users": {"alice@example.org": {
        "password": "scrypt$32768$8$1$<salt>$<hash>",
        "domains": ["example.org"],
        "cram_md5": "the password itself, only for --cram-md5 users"}}}

trimta reads it once at start and refuses it when its mode gives group or
other users any access, because the CRAM-MD5 entries are passwords in
the clear and the hashes invite offline guessing. Writes replace the
file atomically (temporary file, fsync, rename) with mode 0600.
"""

from __future__ import annotations

import functools
import hmac
import json
import os
import stat
import tempfile
from pathlib import Path

import attrs

from trimta.auth.hashing import check_hash_format, hash_password, verify_password
from trimta.smtp import sasl


@functools.cache
def _dummy_hash() -> str:
    """Hash a fixed password, checked in place of an unknown user's hash.

    A miss then costs the same scrypt time as a wrong password, so timing
    does not reveal which user names exist.
    """
    return hash_password("unknown user")


@attrs.define(eq=False)
class CredentialsError(Exception):
    """A credentials file that cannot be used.

    Attributes:
        path: The file.
        reason: What is wrong and how to fix it.
    """

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"credentials file {self.path}: {self.reason}"


@attrs.frozen
class User:
    """One entry of the credentials file.

    Attributes:
        name: The SASL authentication identity, e.g. "alice@example.org".
        password_hash: scrypt hash string checked for PLAIN and LOGIN.
        domains: Domains this user may release with ATRN (ODMR).
        cram_md5_secret: The password in the clear for CRAM-MD5 (RFC 2195
            needs a password equivalent on the server), or None when the
            user may not use CRAM-MD5.
    """

    name: str
    password_hash: str = attrs.field(repr=False)
    domains: tuple[str, ...] = ()
    cram_md5_secret: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class CredentialStore:
    """The users read from one credentials file."""

    path: Path
    users: dict[str, User]

    @property
    def has_cram_md5(self) -> bool:
        """Whether any user may use CRAM-MD5 (so that it is worth offering)."""
        return any(user.cram_md5_secret for user in self.users.values())

    def check(self, credentials: sasl.Credentials) -> User | None:
        """Return the user when the credentials match, else None.

        Slow on purpose (scrypt), so the daemon calls it in a worker thread.
        """
        user = self.users.get(credentials.username)
        if credentials.mechanism == "CRAM-MD5":
            if user is not None and _cram_matches(user, credentials):
                return user
            return None
        encoded = user.password_hash if user is not None else _dummy_hash()
        matches = verify_password(credentials.secret, encoded)
        return user if matches and user is not None else None


def _cram_matches(user: User, credentials: sasl.Credentials) -> bool:
    if not user.cram_md5_secret:
        return False
    expected = sasl.cram_md5_digest(user.cram_md5_secret, credentials.challenge)
    return hmac.compare_digest(expected, credentials.secret)


def load_credentials(path: Path) -> CredentialStore:
    """Read and check the credentials file.

    Raises:
        CredentialsError: the file is missing, readable by other users or
            malformed.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise CredentialsError(path, f"cannot read it: {error.strerror}") from error
    if mode & 0o077:
        raise CredentialsError(
            path,
            f"other users have access (mode {stat.filemode(mode)}); it holds "
            f"password hashes, so run: chmod 600 {path}",
        )
    return CredentialStore(path, read_users(path))


def read_users(path: Path) -> dict[str, User]:
    """Parse the file without the permission check; a missing file is empty.

    Raises:
        CredentialsError: the file cannot be read or is malformed.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise CredentialsError(path, f"cannot read it: {error}") from error
    try:
        raw = json.loads(text)
        entries = raw["users"]
        return {name: _parse_user(name, entry) for name, entry in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CredentialsError(
            path, f"invalid format ({error}); rewrite entries with trimta passwd"
        ) from error


def _parse_user(name: str, entry: dict) -> User:
    check_hash_format(entry["password"])
    domains = entry.get("domains", [])
    secret = entry.get("cram_md5")
    if not all(isinstance(domain, str) for domain in domains):
        raise ValueError(f"user {name!r}: domains must be a list of strings")
    if secret is not None and not isinstance(secret, str):
        raise ValueError(f"user {name!r}: cram_md5 must be a string")
    return User(name, entry["password"], tuple(domains), secret)


def write_users(path: Path, users: dict[str, User]) -> None:
    """Replace the file atomically with these users, mode 0600.

    Raises:
        OSError: the file or its folder cannot be written.
    """
    document = {"users": {name: _entry(users[name]) for name in sorted(users)}}
    data = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()
    folder = path.parent
    # mkstemp creates the file with mode 0600, so no other user ever
    # sees its content, even before the rename.
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(folder)


def _entry(user: User) -> dict:
    entry: dict = {"password": user.password_hash, "domains": list(user.domains)}
    if user.cram_md5_secret is not None:
        entry["cram_md5"] = user.cram_md5_secret
    return entry


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def set_user(
    path: Path,
    name: str,
    password: str,
    domains: tuple[str, ...],
    *,
    cram_md5: bool,
) -> None:
    """Add or replace one user's entry in the credentials file.

    Raises:
        CredentialsError: the existing file is malformed.
        OSError: the file cannot be written.
    """
    users = read_users(path)
    users[name] = User(
        name, hash_password(password), domains, password if cram_md5 else None
    )
    write_users(path, users)
