"""Replay the receiver's SMTP conformance dialogues against a live daemon.

Each dialogue in ../shared/cases/ (beside the repository) is replayed with
its own runner, run_case.py, against a fresh daemon set up as the cases
expect. The runner checks the wire; the assertions here check what each
case says must and must not reach the spool and the Maildirs.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import Daemon, daemon_environment, free_port, toml_config

CASES = Path(__file__).resolve().parents[3] / "shared" / "cases"
LOCAL = ("example.test", "bücher.example.test")
IDN = "xn--bcher-kva.example.test"
RECEIVER_CASES = {
    "02": "02-smuggling-bare-lf-and-cr-variants.md",
    "04": "04-pipelining-all-rcpt-rejected.md",
    "05": "05-line-length-limits.md",
    "07": "07-dot-transparency.md",
    "08": "08-null-reverse-path.md",
    "09": "09-source-routes-and-postmaster.md",
    "11": "11-address-literals.md",
    "12": "12-smtputf8-idn.md",
    "13": "13-auth-errors-and-cancel.md",
    "14": "14-ehlo-rset-state-reset.md",
    "16": "16-many-recipients.md",
    "17": "17-bdat-without-chunking.md",
    "19": "19-etrn-validation.md",
}


def require_cases() -> None:
    if CASES.is_dir():
        return
    if os.environ.get("TRIMTA_REQUIRE_SHARED"):
        pytest.fail(f"{CASES} is missing, and TRIMTA_REQUIRE_SHARED is set")
    pytest.skip(f"{CASES} is absent")


def replay(daemon, case_file: str) -> str:
    result = subprocess.run(
        [sys.executable, str(CASES / "run_case.py"), "--strict", "127.0.0.1",
         str(daemon.port), str(CASES / case_file)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr + daemon.log()
    assert re.search(r"\b0 failed", result.stdout), result.stdout
    return result.stdout


def delivered(daemon, timeout: float = 20.0) -> list[tuple[str, str, bytes]]:
    """Wait until every local part left the spool; return (domain, mailbox, message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = [p for d in (LOCAL[0], IDN) for p in daemon.spool_parts(d)]
        if not waiting:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"local parts still queued after {timeout}s\n{daemon.log()}")
    found = []
    for path in sorted(daemon.mail.glob("*/*/new/*")):
        mailbox = path.parent.parent
        found.append((mailbox.parent.name, mailbox.name, path.read_bytes()))
    return found


def message_ids(messages) -> set[str]:
    """Return the queue ids named in the Received headers trimta added."""
    ids = set()
    for _, _, raw in messages:
        match = re.search(rb"\(trimta\) with \S+ id (\S+)", raw)
        assert match, raw[:400]
        ids.add(match[1].decode())
    return ids


def parsed(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.SMTPUTF8)


@pytest.fixture
def case_daemon(daemon_factory):
    require_cases()
    return daemon_factory(
        local=LOCAL,
        hold=("odmr.example.net",),
        extra="[limits]\nmax_message_size = 1048576\nmax_errors = 100\n",
    )


@pytest.fixture
def auth_case_daemon(tmp_path):
    """Start the case daemon with AUTH: alice@example.test / correct-horse.

    PLAIN and LOGIN are allowed without TLS (the peer is on loopback), and
    alice has a CRAM-MD5 secret, so all three mechanisms are offered.
    """
    require_cases()
    folder = tmp_path / "auth-case"
    folder.mkdir()
    credentials = folder / "users.json"
    subprocess.run(
        [sys.executable, "-m", "trimta", "passwd", "--file", str(credentials),
         "alice@example.test", "--domains", "example.test", "--cram-md5"],
        input="correct-horse\n", text=True, check=True, capture_output=True,
        env=daemon_environment(),
    )
    port = free_port()
    text = toml_config(
        folder, port, local=LOCAL,
        extra=f"[auth]\ncredentials = {str(credentials)!r}\n"
        "[limits]\nmax_errors = 100\n",
    )
    listener = f'address = "127.0.0.1:{port}"\n'
    text = text.replace(listener, listener + "allow_plaintext_auth = true\n")
    (folder / "trimta.toml").write_text(text)
    daemon = Daemon(folder, port)
    daemon.start()
    yield daemon
    if daemon.process.poll() is None:
        daemon.stop(signal.SIGKILL)


def test_case_02_smuggling_variants(case_daemon):
    replay(case_daemon, RECEIVER_CASES["02"])
    messages = delivered(case_daemon)
    assert len(message_ids(messages)) <= 4
    for _, _, raw in messages:
        message = parsed(raw)
        assert message["Subject"].startswith("variant ")
        assert "ceo-" not in message["Return-Path"]
        assert b"smuggled" not in raw.split(b"\r\n\r\n", 1)[0]


def test_case_04_pipelining_rejected_rcpts(case_daemon):
    replay(case_daemon, RECEIVER_CASES["04"])
    messages = delivered(case_daemon)
    assert len(messages) == 1
    domain, mailbox, raw = messages[0]
    assert (domain, mailbox) == ("example.test", "bob")
    assert parsed(raw)["Subject"] == "pipelined"


def test_case_05_line_limits(case_daemon):
    replay(case_daemon, RECEIVER_CASES["05"])
    messages = delivered(case_daemon)
    # trimta rejects the 5000-octet text line after the final dot.
    assert messages == []


def test_case_07_dot_transparency(case_daemon):
    replay(case_daemon, RECEIVER_CASES["07"])
    [(_, mailbox, raw)] = delivered(case_daemon)
    assert mailbox == "bob"
    body = raw.split(b"Subject: dots\r\n\r\n", 1)[1]
    assert body == b"line1\r\n.\r\n.leading dot\r\n .\r\n \r\n..\r\n\tx\r\nlast\r\n"


def test_case_08_null_reverse_path(case_daemon):
    replay(case_daemon, RECEIVER_CASES["08"])
    messages = delivered(case_daemon)
    assert len(messages) == 2
    assert sorted(mailbox for _, mailbox, _ in messages) == ["bob", "postmaster"]
    for _, _, raw in messages:
        assert raw.startswith(b"Return-Path: <>\r\n")


def test_case_09_source_routes_postmaster(case_daemon):
    replay(case_daemon, RECEIVER_CASES["09"])
    messages = delivered(case_daemon)
    assert sorted(mailbox for _, mailbox, _ in messages) == ["bob", "postmaster"]
    assert len(message_ids(messages)) == 1
    for _, _, raw in messages:
        assert parsed(raw)["Return-Path"] == "<alice@example.net>"
    assert not (case_daemon.spool / "domains" / "relay1.example.net").exists()


def test_case_11_address_literals(case_daemon):
    replay(case_daemon, RECEIVER_CASES["11"])
    messages = delivered(case_daemon)
    assert [(d, m) for d, m, _ in messages] == [("example.test", "postmaster")]
    spool_dirs = sorted(p.name for p in (case_daemon.spool / "domains").iterdir())
    assert spool_dirs == ["example.test"]


def test_case_12_smtputf8_idn(case_daemon):
    replay(case_daemon, RECEIVER_CASES["12"])
    messages = delivered(case_daemon)
    assert len(message_ids(messages)) == 2
    places = sorted((d, m) for d, m, _ in messages)
    greek = "χρήστης".encode().hex().upper()
    greek_mailbox = "".join(f"%{greek[i:i + 2]}" for i in range(0, len(greek), 2))
    assert places == sorted(
        [("example.test", greek_mailbox), (IDN, "bob"), (IDN, "bob")]
    )
    utf8 = [raw for _, _, raw in messages if "δοκιμή".encode() in raw.split(b"\r\n\r\n")[0]]
    assert utf8
    for raw in utf8:
        assert b"with UTF8SMTP id" in raw


def test_case_13_auth_errors_and_cancel(auth_case_daemon):
    output = replay(auth_case_daemon, RECEIVER_CASES["13"])
    assert "SKIP" not in output
    assert "remaining steps not run" not in output
    assert " 0 skipped" in output
    assert delivered(auth_case_daemon) == []
    assert not (auth_case_daemon.spool / "domains").exists() or not any(
        (auth_case_daemon.spool / "domains").rglob("*.env")
    )
    assert "correct-horse" not in auth_case_daemon.log()


def test_case_14_state_resets(case_daemon):
    replay(case_daemon, RECEIVER_CASES["14"])
    messages = delivered(case_daemon)
    assert [(d, m) for d, m, _ in messages] == [("example.test", "bob")]
    message = parsed(messages[0][2])
    assert message["Subject"] == "after resets"
    assert message["Return-Path"] == "<alice@example.net>"


def test_case_16_many_recipients(case_daemon):
    replay(case_daemon, RECEIVER_CASES["16"])
    messages = delivered(case_daemon, timeout=60)
    mailboxes = sorted(mailbox for _, mailbox, _ in messages)
    assert mailboxes == sorted(f"user{i}" for i in range(1, 101)) or mailboxes == sorted(
        f"user{i}" for i in range(100)
    )
    assert len(message_ids(messages)) == 1
    assert "rcpts=100 " in case_daemon.log()


def test_case_17_bdat_refused(case_daemon):
    replay(case_daemon, RECEIVER_CASES["17"])
    messages = delivered(case_daemon)
    assert len(messages) == 1
    raw = messages[0][2]
    assert parsed(raw)["Subject"] == "after bdat"
    assert raw.endswith(b"\r\n\r\nbody\r\n")


def test_case_19_etrn_validation(case_daemon):
    output = replay(case_daemon, RECEIVER_CASES["19"])
    assert "SKIP" not in output
    log = case_daemon.log()
    # The 50 repeated requests never start more than one release.
    assert log.count("release started domain=odmr.example.net") <= 1
    domains = case_daemon.spool / "domains"
    names = sorted(p.name for p in domains.iterdir()) if domains.exists() else []
    assert all(name.endswith(".example.net") or name == "example.test" for name in names)
