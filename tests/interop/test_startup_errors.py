"""Start-up faults: `trimta serve` and `trimta check-config` print one line and exit 1.

Each test writes a configuration whose spool, listener certificate or key,
route CA file or credentials file is unusable, and runs the real CLI in a
child process. stderr must contain exactly one line and no traceback. The
line names the configuration key and the path, and gives the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import smtplib
import subprocess
import sys

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from harness import daemon_environment, free_port, toml_config

CLI_TIMEOUT = 30


@pytest.fixture(scope="module")
def authority():
    return trustme.CA()


@pytest.fixture
def pem(tmp_path, authority):
    """Write a good certificate and key, another key and a CA file; return paths."""
    cert = authority.issue_cert("mx.trimta.test")
    other = authority.issue_cert("other.trimta.test")
    paths = {
        "cert": tmp_path / "cert.pem",
        "key": tmp_path / "key.pem",
        "other_key": tmp_path / "other-key.pem",
        "ca": tmp_path / "ca.pem",
        "text": tmp_path / "notes.txt",
    }
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    other.private_key_pem.write_to_path(str(paths["other_key"]))
    authority.cert_pem.write_to_path(str(paths["ca"]))
    paths["text"].write_text("this is not a PEM file\n")
    return paths


def write_config(folder, extra: str = "", spool=None):
    """Write trimta.toml into `folder` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    text = toml_config(folder, free_port(), relay=("example.net",), extra=extra)
    if spool is not None:
        text = text.replace(json.dumps(str(folder / "spool")), json.dumps(str(spool)))
    path = folder / "trimta.toml"
    path.write_text(text)
    return path


def tls_listener(cert, key) -> str:
    return (
        f'[[listener]]\naddress = "127.0.0.1:{free_port()}"\n'
        f"tls_cert = {json.dumps(str(cert))}\ntls_key = {json.dumps(str(key))}\n"
    )


def ca_route(ca_file) -> str:
    return (
        f'[routes]\n"example.net" = {{ hosts = ["127.0.0.1:{free_port()}"], '
        f'tls = "required", ca_file = {json.dumps(str(ca_file))} }}\n'
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trimta", *args],
        capture_output=True, text=True, timeout=CLI_TIMEOUT,
        env=daemon_environment(), stdin=subprocess.DEVNULL,
    )


def assert_one_line_failure(result, *needles: str) -> str:
    """Check exit 1 and a single stderr line that contains every needle."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    [line] = lines
    assert line.startswith("trimta: ")
    for needle in needles:
        assert needle in line, line
    return line


def assert_serve_and_check_fail(config, *needles: str) -> str:
    """Run serve and check-config on `config`; both must fail the same way."""
    served = run_cli("serve", "--config", str(config))
    served_line = assert_one_line_failure(served, *needles)
    checked = run_cli("check-config", str(config))
    checked_line = assert_one_line_failure(checked, *needles)
    assert served_line == checked_line
    assert checked.stdout == ""
    return served_line


# The spool.


def test_spool_that_is_file_rejected(tmp_path):
    spool = tmp_path / "spool-file"
    spool.write_text("not a folder\n")
    config = write_config(tmp_path / "daemon", spool=spool)
    line = assert_serve_and_check_fail(
        config, f"spool = {json.dumps(str(spool))}", "is a file, not a folder"
    )
    assert "point spool at a folder" in line
    assert spool.read_text() == "not a folder\n"


def test_spool_below_file_rejected(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    config = write_config(tmp_path / "daemon", spool=blocker / "spool")
    assert_serve_and_check_fail(config, "spool = ", f"{blocker} is a file")


@contextlib.contextmanager
def read_only_tmpfs(mount_point):
    """Mount an empty read-only tmpfs at `mount_point`; skip where that is denied."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    mount_point.mkdir()
    options = "ro,size=1m,mode=0755"
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
        capture_output=True, text=True, timeout=CLI_TIMEOUT,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(
            ["umount", "-l", str(mount_point)], check=False, timeout=CLI_TIMEOUT
        )


@pytest.mark.parametrize("below", [False, True], ids=["mount-point", "new-folder"])
def test_spool_on_read_only_fs_rejected(tmp_path, below):
    # Root ignores file modes, so only a read-only file system stops it.
    with read_only_tmpfs(tmp_path / "ro") as mount_point:
        spool = mount_point / "spool" if below else mount_point
        config = write_config(tmp_path / "daemon", spool=spool)
        line = assert_serve_and_check_fail(
            config, f"spool = {json.dumps(str(spool))}", "read-only"
        )
        assert f"cannot write in {mount_point}" in line
        assert "remount it read-write" in line
        assert os.listdir(mount_point) == []


# Listener certificates and keys.


def test_second_daemon_on_same_spool_rejected(tmp_path, daemon_factory):
    first = daemon_factory(hold=("held.example",))
    with smtplib.SMTP("127.0.0.1", first.port, timeout=30) as client:
        client.sendmail("a@example.org", ["b@held.example"], b"Subject: kept\r\n\r\nx\r\n")
    config = write_config(tmp_path / "second", spool=first.spool)

    served = run_cli("serve", "--config", str(config))

    line = assert_one_line_failure(
        served, f"another trimta (pid {first.process.pid})", str(first.spool / "lock")
    )
    assert "stop it first" in line
    assert len(first.spool_parts("held.example")) == 1
    assert first.process.poll() is None


def test_missing_tls_cert_rejected(tmp_path, pem):
    missing = tmp_path / "missing-cert.pem"
    config = write_config(tmp_path / "daemon", tls_listener(missing, pem["key"]))
    line = assert_serve_and_check_fail(
        config,
        f"listener[1].tls_cert = {json.dumps(str(missing))}",
        "No such file or directory",
    )
    assert "point tls_cert at a readable PEM file" in line


def test_missing_tls_key_rejected(tmp_path, pem):
    missing = tmp_path / "missing-key.pem"
    config = write_config(tmp_path / "daemon", tls_listener(pem["cert"], missing))
    assert_serve_and_check_fail(
        config,
        f"listener[1].tls_key = {json.dumps(str(missing))}",
        "No such file or directory",
        "point tls_key at a readable PEM file",
    )


def test_folder_as_tls_cert_rejected(tmp_path, pem):
    folder = tmp_path / "certs"
    folder.mkdir()
    config = write_config(tmp_path / "daemon", tls_listener(folder, pem["key"]))
    assert_serve_and_check_fail(
        config,
        f"listener[1].tls_cert = {json.dumps(str(folder))}",
        "cannot read the file: Is a directory",
    )


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root reads a file whatever its mode; "
    "test_folder_as_tls_cert_rejected covers an unreadable path"
)
def test_unreadable_tls_key_rejected(tmp_path, pem):
    pem["key"].chmod(0)
    config = write_config(tmp_path / "daemon", tls_listener(pem["cert"], pem["key"]))
    assert_serve_and_check_fail(
        config, f"listener[1].tls_key = {json.dumps(str(pem['key']))}",
        "Permission denied",
    )


def test_tls_cert_not_pem_rejected(tmp_path, pem):
    config = write_config(tmp_path / "daemon", tls_listener(pem["text"], pem["key"]))
    assert_serve_and_check_fail(
        config,
        f"listener[1].tls_cert = {json.dumps(str(pem['text']))}",
        "no PEM certificate found",
    )


def test_tls_key_not_pem_rejected(tmp_path, pem):
    # A certificate in place of the key: PEM, but no private key in it.
    config = write_config(tmp_path / "daemon", tls_listener(pem["cert"], pem["cert"]))
    assert_serve_and_check_fail(
        config,
        f"listener[1].tls_key = {json.dumps(str(pem['cert']))}",
        "no PEM private key found",
    )


def test_mismatched_tls_key_rejected(tmp_path, pem):
    config = write_config(
        tmp_path / "daemon", tls_listener(pem["cert"], pem["other_key"])
    )
    line = assert_serve_and_check_fail(
        config,
        f"listener[1].tls_key = {json.dumps(str(pem['other_key']))}",
        f"does not belong to the certificate in {pem['cert']}",
    )
    assert "give the private key that the certificate was issued for" in line


def test_encrypted_tls_key_rejected(tmp_path, pem):
    key = serialization.load_pem_private_key(pem["key"].read_bytes(), password=None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    config = write_config(tmp_path / "daemon", tls_listener(pem["cert"], encrypted))
    assert_serve_and_check_fail(
        config,
        f"listener[1].tls_key = {json.dumps(str(encrypted))}",
        "the key is encrypted",
        "openssl pkey",
    )


# Route CA files and the credentials file.


def test_missing_ca_file_rejected(tmp_path):
    missing = tmp_path / "missing-ca.pem"
    config = write_config(tmp_path / "daemon", ca_route(missing))
    line = assert_serve_and_check_fail(
        config,
        f'routes."example.net".ca_file = {json.dumps(str(missing))}',
        "No such file or directory",
    )
    assert "point ca_file at a PEM file of trusted CA certificates" in line


def test_ca_file_not_pem_rejected(tmp_path, pem):
    config = write_config(tmp_path / "daemon", ca_route(pem["text"]))
    assert_serve_and_check_fail(
        config,
        f'routes."example.net".ca_file = {json.dumps(str(pem["text"]))}',
        "no PEM certificate found",
    )


def test_readable_credentials_rejected(tmp_path):
    credentials = tmp_path / "users.json"
    credentials.write_text('{"users": {}}\n')
    credentials.chmod(0o644)
    extra = f"[auth]\ncredentials = {json.dumps(str(credentials))}\n"
    config = write_config(tmp_path / "daemon", extra)
    assert_serve_and_check_fail(
        config, str(credentials), "chmod 600", "auth.credentials"
    )


# What check-config passes.


def test_good_files_pass_check_config(tmp_path, pem):
    extra = tls_listener(pem["cert"], pem["key"]) + ca_route(pem["ca"])
    config = write_config(tmp_path / "daemon", extra)
    result = run_cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"config {config}: valid\n"
    assert not (tmp_path / "daemon" / "spool").exists()  # checked, not created


def test_check_config_no_files_skips_files(tmp_path):
    missing = tmp_path / "missing-cert.pem"
    config = write_config(tmp_path / "daemon", tls_listener(missing, missing))
    result = run_cli("check-config", "--no-files", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_check_config_lists_every_file_problem(tmp_path, pem):
    spool = tmp_path / "spool-file"
    spool.write_text("")
    extra = tls_listener(tmp_path / "missing.pem", pem["key"]) + ca_route(pem["text"])
    config = write_config(tmp_path / "daemon", extra, spool=spool)
    result = run_cli("check-config", str(config))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("trimta: spool = ")
    assert lines[1].startswith("trimta: listener[1].tls_cert = ")
    assert lines[2].startswith('trimta: routes."example.net".ca_file = ')
