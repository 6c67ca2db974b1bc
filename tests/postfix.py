"""Run a private Postfix instance on loopback as a next hop for tests.

Each instance lives in a temporary folder of its own: its main.cf and
master.cf, queue, data folder and mail log (`maillog_file`, written by
postlogd). It listens only on 127.0.0.1, at free ports, serves no domain
of its own (mydestination is empty) and relays everything it accepts to
one next hop, normally an smtp-sink. It never reads or changes
/etc/postfix/main.cf or a system Postfix, and it is stopped with
`postfix -c FOLDER stop`, after which no process of it may be left.

The folder is made with `tempfile.mkdtemp`, not pytest's tmp_path: the
Postfix daemons run as the user "postfix", who cannot enter pytest's
private folders.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest

POSTFIX = "/usr/sbin/postfix"
DAEMON_DIRECTORY = "/usr/lib/postfix/sbin"
SASLPASSWD2 = "/usr/sbin/saslpasswd2"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
HOSTNAME = "postfix.test"

# Every service the relay path needs, without a chroot, so the daemons
# find the temporary folder at its real path. Columns: service, type,
# private, unprivileged, chroot, wakeup, process limit, command.
_MASTER_SERVICES = """\
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
proxywrite unix - - n -  1 proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def require_postfix() -> None:
    """Skip the test when Postfix is missing, or fail if peers are required."""
    if os.access(POSTFIX, os.X_OK) and os.path.isdir(DAEMON_DIRECTORY):
        if os.geteuid() == 0:
            return
        reason = "a private Postfix instance must be started as root"
    else:
        reason = f"{POSTFIX} is missing; install the Debian package postfix"
    if os.environ.get("TRIMTA_REQUIRE_PEERS"):
        pytest.fail(f"{reason} and TRIMTA_REQUIRE_PEERS is set")
    pytest.skip(reason)


def require_saslpasswd2() -> None:
    """Skip the test when Cyrus SASL's saslpasswd2 is missing."""
    if os.access(SASLPASSWD2, os.X_OK):
        return
    reason = f"{SASLPASSWD2} is missing; install the Debian package sasl2-bin"
    if os.environ.get("TRIMTA_REQUIRE_PEERS"):
        pytest.fail(f"{reason} and TRIMTA_REQUIRE_PEERS is set")
    pytest.skip(reason)


@attrs.define
class Postfix:
    """A running private Postfix instance.

    Attributes:
        folder: Holds main.cf, master.cf, queue/, data/ and maillog.
        port: The plain SMTP port on 127.0.0.1 (STARTTLS when TLS is set).
        wrapper_port: The implicit-TLS port ("port 465" style), or None.
    """

    folder: Path
    port: int
    wrapper_port: int | None = None

    @property
    def maillog(self) -> Path:
        return self.folder / "maillog"

    def log(self) -> str:
        """Return Postfix's mail log so far."""
        if not self.maillog.exists():
            return ""
        return self.maillog.read_text(errors="replace")

    def queue_ids(self) -> list[str]:
        """Return the ids of the messages smtpd accepted a MAIL FROM for."""
        return re.findall(r"postfix/smtpd\[\d+\]: ([0-9A-F]{6,}): client=", self.log())

    def wait_for_log(self, pattern: str, timeout: float = 20.0) -> re.Match:
        """Wait until the mail log matches a regular expression."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(
            f"Postfix log has no {pattern!r} after {timeout}s:\n{self.log()}"
        )


@attrs.frozen
class TlsFiles:
    """A PEM certificate chain and its key for smtpd."""

    cert_file: Path
    key_file: Path


@attrs.frozen
class SaslUser:
    """A Cyrus sasldb account that smtpd accepts with AUTH PLAIN or LOGIN."""

    name: str
    password: str


@contextmanager
def run_postfix(
    relay_to: tuple[str, int],
    *,
    tls: TlsFiles | None = None,
    wrapper_port: bool = False,
    sasl_user: SaslUser | None = None,
    settings: Mapping[str, str] | None = None,
) -> Iterator[Postfix]:
    """Start a private Postfix that relays all mail to `relay_to`, and yield it.

    Args:
        relay_to: (IPv4 address, port) of the next hop, e.g. an smtp-sink.
        tls: Certificate for STARTTLS (offered, not required) and for the
            implicit-TLS port.
        wrapper_port: Also listen on a second port with TLS from the first
            byte (smtpd_tls_wrappermode); needs `tls`.
        sasl_user: Enable AUTH against a sasldb that contains this one
            user, and relay only for authenticated clients. It needs
            `tls`, because smtpd offers AUTH only after STARTTLS here.
        settings: Extra main.cf parameters, which win over the defaults.
    """
    require_postfix()
    folder = Path(tempfile.mkdtemp(prefix="trimta-postfix-"))
    folder.chmod(0o755)
    instance = Postfix(folder, _free_port(), _free_port() if wrapper_port else None)
    try:
        main = _main_settings(folder, relay_to)
        if tls is not None:
            main.update(_tls_settings(folder, tls))
        if sasl_user is not None:
            main.update(_sasl_settings(folder, sasl_user))
        main.update(settings or {})
        _write_config(instance, main)
        _postfix(folder, "start")
        _wait_until_listening(instance)
        yield instance
    finally:
        _stop(instance)
        shutil.rmtree(folder, ignore_errors=True)


def _main_settings(folder: Path, relay_to: tuple[str, int]) -> dict[str, str]:
    host, port = relay_to
    return {
        "compatibility_level": "3.6",
        "config_directory": str(folder),
        "queue_directory": str(folder / "queue"),
        "data_directory": str(folder / "data"),
        "daemon_directory": DAEMON_DIRECTORY,
        "maillog_file": str(folder / "maillog"),
        "maillog_file_prefixes": str(folder),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": HOSTNAME,
        "mydomain": "test",
        "myorigin": HOSTNAME,
        "mydestination": "",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "relayhost": f"[{host}]:{port}",
        "smtp_dns_support_level": "disabled",
        "smtpd_peername_lookup": "no",
        "smtp_tls_security_level": "none",
        "alias_maps": "",
        "local_recipient_maps": "",
        "local_transport": "error:no local delivery",
        # Short retry times, so that a test gets the outcome within seconds.
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
    }


def _tls_settings(folder: Path, tls: TlsFiles) -> dict[str, str]:
    # The daemons run as "postfix", so they get copies they may read.
    cert = folder / "smtpd-cert.pem"
    key = folder / "smtpd-key.pem"
    shutil.copyfile(tls.cert_file, cert)
    shutil.copyfile(tls.key_file, key)
    key.chmod(0o600)
    return {
        "smtpd_tls_cert_file": str(cert),
        "smtpd_tls_key_file": str(key),
        "smtpd_tls_security_level": "may",
        "smtpd_tls_received_header": "yes",
        "smtpd_tls_loglevel": "1",
    }


def _sasl_settings(folder: Path, user: SaslUser) -> dict[str, str]:
    require_saslpasswd2()
    database = folder / "sasldb2"
    subprocess.run(
        [SASLPASSWD2, "-f", str(database), "-p", "-c", "-u", HOSTNAME, user.name],
        input=user.password.encode(),
        check=True,
        timeout=10,
    )
    shutil.chown(database, group="postfix")
    database.chmod(0o640)
    # Debian's Postfix reads smtpd.conf from $config_directory/sasl;
    # upstream Postfix reads it from cyrus_sasl_config_path.
    (folder / "sasl").mkdir()
    (folder / "sasl" / "smtpd.conf").write_text(
        "pwcheck_method: auxprop\n"
        "auxprop_plugin: sasldb\n"
        "mech_list: PLAIN LOGIN\n"
        f"sasldb_path: {database}\n"
    )
    return {
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "cyrus",
        "smtpd_sasl_path": "smtpd",
        "cyrus_sasl_config_path": str(folder / "sasl"),
        "smtpd_sasl_local_domain": HOSTNAME,
        "smtpd_tls_auth_only": "yes",
        # Relay only for clients that authenticated, loopback included.
        "mynetworks": "",
        "smtpd_relay_restrictions": (
            "permit_sasl_authenticated, reject_unauth_destination"
        ),
    }


def _write_config(instance: Postfix, main: Mapping[str, str]) -> None:
    folder = instance.folder
    for name in ("queue", "data"):
        (folder / name).mkdir()
    shutil.chown(folder / "data", user="postfix")
    (folder / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
    services = [f"127.0.0.1:{instance.port} inet n - n - - smtpd", _MASTER_SERVICES]
    if instance.wrapper_port is not None:
        services.insert(
            1,
            f"127.0.0.1:{instance.wrapper_port} inet n - n - - smtpd\n"
            "  -o smtpd_tls_wrappermode=yes\n"
            "  -o smtpd_tls_security_level=encrypt",
        )
    (folder / "master.cf").write_text("\n".join(services))


def _postfix(folder: Path, command: str) -> None:
    # MAIL_CONFIG names the private configuration folder to postfix(1)
    # and to the postfix-script it runs.
    result = subprocess.run(
        [POSTFIX, "-c", str(folder), command],
        capture_output=True,
        check=False,
        timeout=STOP_TIMEOUT,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")
        raise RuntimeError(f"postfix -c {folder} {command} failed:\n{output}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_listening(instance: Postfix) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", instance.port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(
        f"Postfix did not listen on 127.0.0.1:{instance.port}:\n{instance.log()}"
    )


def _master_pid(folder: Path) -> int | None:
    try:
        text = (folder / "queue" / "pid" / "master.pid").read_text()
    except OSError:
        return None
    return int(text.strip()) if text.strip() else None


def _stop(instance: Postfix) -> None:
    """Stop the instance with `postfix stop` and check that its master is gone."""
    pid = _master_pid(instance.folder)
    if pid is None:
        return
    try:
        _postfix(instance.folder, "stop")
    except (RuntimeError, subprocess.TimeoutExpired):
        pass
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and _process_exists(pid):
        time.sleep(0.1)
    if _process_exists(pid):
        raise RuntimeError(f"Postfix master (PID {pid}) is still running after stop")
    leftover = _processes_using(instance.folder)
    if leftover:
        raise RuntimeError(f"Postfix processes still running after stop: {leftover}")


def _process_exists(pid: int) -> bool:
    # A zombie has exited and only waits to be reaped by its parent.
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rpartition(")")[2].split()[0] != "Z"


def _processes_using(folder: Path) -> list[int]:
    """Return live PIDs whose environment has MAIL_CONFIG=`folder`.

    master(8) passes MAIL_CONFIG on to every daemon it starts.
    """
    marker = f"MAIL_CONFIG={folder}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environment and _process_exists(int(entry.name)):
            found.append(int(entry.name))
    return found
