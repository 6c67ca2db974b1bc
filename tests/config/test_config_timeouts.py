"""The SMTP client reply timeouts of [delivery]: defaults, values and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from trimta.config.load import ConfigError, load_file, parse_text
from trimta.config.model import Config
from trimta.config.values import Duration
from trimta.daemon import client_timeouts
from trimta.smtp.client import RFC_TIMEOUTS, ClientConnection, Phase

REPO = Path(__file__).resolve().parents[2]

# (key, RFC 5321 4.5.3.2 default in seconds, client phase it sets)
KEYS = [
    ("greeting_timeout", 300, Phase.GREETING),
    ("mail_timeout", 300, Phase.MAIL),
    ("rcpt_timeout", 300, Phase.RCPT),
    ("data_init_timeout", 120, Phase.DATA),
    ("data_block_timeout", 180, Phase.DATA_BLOCK),
    ("data_end_timeout", 600, Phase.DATA_END),
    ("command_timeout", 300, Phase.EHLO),
]


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_text(text, "test.toml")
    return caught.value.lines()


@pytest.mark.parametrize(("key", "seconds", "phase"), KEYS)
def test_default_is_rfc_minimum(key, seconds, phase):
    delivery = Config().delivery
    assert getattr(delivery, key) == Duration(seconds)
    assert client_timeouts(delivery).for_phase(phase) == seconds
    assert RFC_TIMEOUTS.for_phase(phase) == seconds


@pytest.mark.parametrize(("key", "seconds", "phase"), KEYS)
def test_example_file_documents_default(key, seconds, phase):
    text = (REPO / "conf" / "trimta.toml").read_text()
    delivery = text.split("\n[delivery]\n", 1)[1].split("\n[", 1)[0]
    lines = [line for line in delivery.splitlines() if line.startswith(f"{key} = ")]
    assert lines == [f'{key} = "{Duration(seconds)}"']
    config = load_file(REPO / "conf" / "trimta.toml")
    assert getattr(config.delivery, key) == Duration(seconds)


@pytest.mark.parametrize(("key", "seconds", "phase"), KEYS)
def test_value_reaches_client_phase(key, seconds, phase):
    config = parse_text(f'[delivery]\n{key} = "1.5s"\n', "test.toml")
    assert getattr(config.delivery, key) == Duration(1.5)
    timeouts = client_timeouts(config.delivery)
    assert timeouts.for_phase(phase) == 1.5
    for other_key, default, other_phase in KEYS:
        if other_key != key:
            assert timeouts.for_phase(other_phase) == default, other_key


def test_command_timeout_covers_other_commands():
    config = parse_text('[delivery]\ncommand_timeout = "7s"\n', "test.toml")
    timeouts = client_timeouts(config.delivery)
    others = (Phase.EHLO, Phase.HELO, Phase.STARTTLS, Phase.AUTH, Phase.RSET)
    for phase in (*others, Phase.NOOP, Phase.QUIT):
        assert timeouts.for_phase(phase) == 7
    assert timeouts.for_phase(Phase.MAIL) == 300


def test_client_waits_with_configured_timeouts():
    config = parse_text('[delivery]\ngreeting_timeout = "2s"\n', "test.toml")
    client = ClientConnection(
        local_hostname="mx.example.org", timeouts=client_timeouts(config.delivery)
    )
    assert client.timeout == 2
    client.receive_data(b"220 hop.example ESMTP\r\n")
    client.next_reply()
    client.send_ehlo()
    assert client.timeout == 300  # command_timeout keeps its default


@pytest.mark.parametrize(("key", "seconds", "phase"), KEYS)
def test_zero_timeout_rejected(key, seconds, phase):
    lines = problems_of(f'[delivery]\n{key} = "0s"\n')
    expected = f'delivery.{key} = "0s": must be above 0, e.g. "5m"'
    assert lines == [f"config test.toml: {expected}"]


@pytest.mark.parametrize(("key", "seconds", "phase"), KEYS)
def test_unparsable_timeout_rejected(key, seconds, phase):
    lines = problems_of(f'[delivery]\n{key} = "soon"\n')
    assert len(lines) == 1
    assert lines[0].startswith(f'config test.toml: delivery.{key} = "soon": ')
    assert 'expected a duration such as "300s", "5m"' in lines[0]


@pytest.mark.parametrize(("key", "seconds", "phase"), KEYS)
def test_negative_timeout_rejected(key, seconds, phase):
    lines = problems_of(f"[delivery]\n{key} = -5\n")
    assert lines == [
        f"config test.toml: delivery.{key} = -5: a duration cannot be negative"
    ]
