"""The credentials file, scrypt hashes and the AUTH failure throttle."""

from __future__ import annotations

import json
import os

import pytest

from trimta.auth.credentials import (
    CredentialsError,
    load_credentials,
    read_users,
    set_user,
)
from trimta.auth.hashing import check_hash_format, hash_password, verify_password
from trimta.auth.throttle import AuthThrottle
from trimta.smtp import sasl

FAST = {"n": 2**4, "r": 1, "p": 1}


def test_hash_verifies_only_right_password():
    encoded = hash_password("correct-horse", **FAST)
    assert encoded.startswith("scrypt$16$1$1$")
    assert verify_password("correct-horse", encoded)
    assert not verify_password("correct-horsf", encoded)


def test_hash_salted_differently_each_time():
    assert hash_password("x", **FAST) != hash_password("x", **FAST)


@pytest.mark.parametrize(
    "encoded",
    [
        "bcrypt$16$1$1$AAAA$AAAA",
        "scrypt$15$1$1$AAAA$" + "A" * 44,
        "scrypt$16$1$1$!!!$" + "A" * 44,
        "scrypt$16$1$1$AAAA$AAAA",
        "scrypt$16$1$1$AAAA",
    ],
)
def test_malformed_hash_rejected(encoded):
    with pytest.raises(ValueError):
        check_hash_format(encoded)


def test_set_user_writes_mode_0600(tmp_path):
    path = tmp_path / "users.json"
    set_user(path, "alice@example.test", "pw", ("example.test",), cram_md5=False)
    assert path.stat().st_mode & 0o777 == 0o600
    entry = json.loads(path.read_text())["users"]["alice@example.test"]
    assert entry["domains"] == ["example.test"]
    assert "cram_md5" not in entry
    assert "pw" not in path.read_text().replace("password", "")


def test_set_user_replaces_and_keeps_others(tmp_path):
    path = tmp_path / "users.json"
    set_user(path, "alice", "one", (), cram_md5=True)
    set_user(path, "bob", "two", ("b.example",), cram_md5=False)
    set_user(path, "alice", "three", ("a.example",), cram_md5=False)
    users = read_users(path)
    assert sorted(users) == ["alice", "bob"]
    assert users["alice"].cram_md5_secret is None
    assert users["alice"].domains == ("a.example",)
    assert verify_password("three", users["alice"].password_hash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.json"]


def test_group_readable_file_refused(tmp_path):
    path = tmp_path / "users.json"
    set_user(path, "alice", "pw", (), cram_md5=False)
    os.chmod(path, 0o640)
    with pytest.raises(CredentialsError) as caught:
        load_credentials(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"chmod 600 {path}" in message


def test_missing_file_refused(tmp_path):
    with pytest.raises(CredentialsError, match="cannot read it"):
        load_credentials(tmp_path / "absent.json")


def test_malformed_file_refused(tmp_path):
    path = tmp_path / "users.json"
    path.write_text('{"users": {"alice": {"password": "plain"}}}')
    os.chmod(path, 0o600)
    with pytest.raises(CredentialsError, match="invalid format"):
        load_credentials(path)


def test_store_checks_each_mechanism(tmp_path):
    path = tmp_path / "users.json"
    set_user(path, "alice", "pw", (), cram_md5=True)
    set_user(path, "bob", "pw2", (), cram_md5=False)
    store = load_credentials(path)
    assert store.has_cram_md5
    assert store.check(sasl.Credentials("PLAIN", "alice", "pw")).name == "alice"
    assert store.check(sasl.Credentials("LOGIN", "alice", "nope")) is None
    assert store.check(sasl.Credentials("PLAIN", "carol", "pw")) is None
    challenge = b"<1.2@mx.example.test>"
    good = sasl.cram_md5_digest("pw", challenge)
    assert store.check(sasl.Credentials("CRAM-MD5", "alice", good, challenge)) is not None
    bob = sasl.cram_md5_digest("pw2", challenge)
    assert store.check(sasl.Credentials("CRAM-MD5", "bob", bob, challenge)) is None


def test_user_repr_hides_secrets(tmp_path):
    path = tmp_path / "users.json"
    set_user(path, "alice", "secret-pw", (), cram_md5=True)
    user = read_users(path)["alice"]
    assert "secret-pw" not in repr(user)
    assert "scrypt" not in repr(user)


def test_throttle_doubles_up_to_limit():
    throttle = AuthThrottle()
    delays = [throttle.record_failure("192.0.2.1", now=float(i)) for i in range(7)]
    assert delays == [1, 2, 4, 8, 16, 16, 16]
    assert throttle.record_failure("192.0.2.2", now=7.0) == 1


def test_throttle_forgets_after_success_or_time():
    throttle = AuthThrottle(forget_after=60)
    throttle.record_failure("192.0.2.1", now=0)
    throttle.record_failure("192.0.2.1", now=1)
    throttle.record_success("192.0.2.1")
    assert throttle.record_failure("192.0.2.1", now=2) == 1
    assert throttle.record_failure("192.0.2.1", now=100) == 1


def test_throttle_table_bounded():
    throttle = AuthThrottle(max_clients=3)
    for index in range(10):
        throttle.record_failure(f"192.0.2.{index}", now=0)
    assert len(throttle._failures) == 3
