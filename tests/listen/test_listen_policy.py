"""Recipient policy: local users, relay domains, trusted networks, literals."""

from __future__ import annotations

import ipaddress

import pytest

from trimta.config.load import parse_text
from trimta.listen.policy import RecipientPolicy
from trimta.smtp.address import parse_path

CONFIG = """
[domains]
local = ["example.org", "localhost"]
relay = ["example.net"]
hold = ["held.example"]
[relay]
trusted_networks = ["192.0.2.0/24", "2001:db8::/32"]
[local.users]
"example.org" = ["alice", "bob"]
"""

OUTSIDER = ipaddress.ip_address("198.51.100.7")
TRUSTED = ipaddress.ip_address("192.0.2.9")
SERVER = ipaddress.ip_address("127.0.0.1")


def policy(text: str = CONFIG) -> RecipientPolicy:
    return RecipientPolicy(parse_text(text, "test.toml"))


def check(path: str, client=OUTSIDER, text: str = CONFIG):
    recipient = parse_path(path, allow_null=False, allow_postmaster=True, utf8=True)
    return policy(text).check(recipient, client, SERVER)


@pytest.mark.parametrize(
    "path, domain, stored, local",
    [
        ("<alice@example.org>", "example.org", "alice@example.org", True),
        ("<ALICE@Example.ORG>", "example.org", "alice@example.org", True),
        ("<anyone@localhost>", "localhost", "anyone@localhost", True),
        ("<Anyone@localhost>", "localhost", "Anyone@localhost", True),
        ("<x@example.net>", "example.net", "x@example.net", False),
        ("<x@held.example>", "held.example", "x@held.example", False),
        ("<Postmaster>", "example.org", "postmaster@example.org", True),
        ("<postmaster@example.org>", "example.org", "postmaster@example.org", True),
        ("<alice@[127.0.0.1]>", "example.org", "alice@example.org", True),
    ],
)
def test_accepted_recipient_stored_as(path, domain, stored, local):
    decision = check(path)
    assert decision.reply.code == 250
    assert decision.reply.status == "2.1.5"
    assert decision.accepted is not None
    assert decision.accepted.domain == domain
    assert decision.accepted.address == stored
    assert decision.accepted.local is local


@pytest.mark.parametrize(
    "path, code, status",
    [
        ("<mallory@example.org>", 550, "5.1.1"),
        ("<x@example.com>", 550, "5.7.1"),
        ("<x@sub.example.net>", 550, "5.7.1"),
        ("<x@[192.0.2.55]>", 550, "5.7.1"),
        ("<user%example.com@localhost>", 250, "2.1.5"),
        ('<"x@example.com"@localhost>', 250, "2.1.5"),
    ],
)
def test_outsider_recipient_decision(path, code, status):
    decision = check(path)
    assert decision.reply.code == code
    assert decision.reply.status == status
    if code == 250:
        assert decision.accepted.domain == "localhost"


@pytest.mark.parametrize("client", ["192.0.2.9", "2001:db8::1", "::ffff:192.0.2.9"])
def test_trusted_client_may_relay(client):
    decision = check("<x@example.com>", ipaddress.ip_address(client))
    assert decision.reply.code == 250
    assert decision.accepted.domain == "example.com"
    assert decision.accepted.local is False


def test_trusted_client_cannot_relay_to_literal():
    decision = check("<x@[192.0.2.55]>", TRUSTED)
    assert decision.reply.code == 550


def test_postmaster_address_setting_wins():
    text = CONFIG + '[local]\npostmaster = "bob@example.org"\n'
    decision = check("<Postmaster>", text=text)
    assert decision.accepted.address == "bob@example.org"
    decision = check("<postmaster@localhost>", text=text)
    assert decision.accepted.address == "bob@example.org"


def test_no_relay_by_default():
    decision = check("<x@example.com>", SERVER, text="")
    assert decision.reply.code == 550
    assert decision.reply.status == "5.7.1"
