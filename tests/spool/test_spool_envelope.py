"""Envelope JSON form: round trip, versioning and validation."""

import json

import pytest

from trimta.spool.envelope import (
    ClientInfo,
    Envelope,
    EnvelopeError,
    Recipient,
    dump_envelope,
    parse_envelope,
)
from trimta.spool.names import new_mid


def sample_envelope():
    return Envelope(
        id=new_mid(),
        domain="example.org",
        sender="",
        recipients=[
            Recipient("a@example.org", notify=["FAILURE", "DELAY"]),
            Recipient("b@example.org", state="failed", last_error="5.1.1 no mailbox"),
        ],
        arrival=1700000000.25,
        size=1234,
        params={"BODY": "8BITMIME", "SMTPUTF8": None, "ENVID": "x+2By"},
        client=ClientInfo("client.example", "2001:db8::7"),
        attempts=3,
        next_attempt=1700000300.0,
        last_error="4.4.1 connection timed out",
    )


def test_envelope_round_trip():
    envelope = sample_envelope()
    content = dump_envelope(envelope)
    assert json.loads(content)["version"] == 1
    assert parse_envelope(content) == envelope


def test_unknown_version_rejected():
    data = json.loads(dump_envelope(sample_envelope()))
    data["version"] = 2
    with pytest.raises(EnvelopeError, match="unsupported envelope version 2"):
        parse_envelope(json.dumps(data).encode())


def test_missing_version_rejected():
    data = json.loads(dump_envelope(sample_envelope()))
    del data["version"]
    with pytest.raises(EnvelopeError, match="version None"):
        parse_envelope(json.dumps(data).encode())


def test_unknown_key_rejected():
    data = json.loads(dump_envelope(sample_envelope()))
    data["priority"] = 5
    with pytest.raises(EnvelopeError, match="priority"):
        parse_envelope(json.dumps(data).encode())


def test_invalid_recipient_state_rejected():
    data = json.loads(dump_envelope(sample_envelope()))
    data["recipients"][0]["state"] = "lost"
    with pytest.raises(EnvelopeError):
        parse_envelope(json.dumps(data).encode())


@pytest.mark.parametrize("field, value", [("domain", "../etc"), ("id", "../../x")])
def test_hostile_envelope_names_rejected(field, value):
    data = json.loads(dump_envelope(sample_envelope()))
    data[field] = value
    with pytest.raises(EnvelopeError):
        parse_envelope(json.dumps(data).encode())


@pytest.mark.parametrize("content", [b"", b"[]", b"{", b"\xff\xfe"])
def test_garbage_content_rejected(content):
    with pytest.raises(EnvelopeError):
        parse_envelope(content)
