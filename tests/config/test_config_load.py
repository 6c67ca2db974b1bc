"""Loading configuration files: values, defaults and each error message."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from trimta.config.load import ConfigError, load_default, load_file, parse_text
from trimta.config.model import Config
from trimta.config.values import Duration, HostPort

REPO = Path(__file__).resolve().parents[2]


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_text(text, "test.toml")
    return caught.value.lines()


def test_example_file_loads_with_defaults():
    config = load_file(REPO / "conf" / "trimta.toml")
    defaults = Config()
    assert config.hostname == "mail.example.org"
    for table in ("domains", "relay", "local", "dns", "delivery", "limits"):
        assert getattr(config, table) == getattr(defaults, table), table
    assert config.listener == defaults.listener
    assert config.spool == defaults.spool
    assert config.routes == {}


def test_container_file_loads():
    config = load_file(REPO / "conf" / "container.toml")
    assert config.listener[0].address == HostPort("*", 2525)
    assert config.spool == Path("/var/spool/trimta")


def test_embedded_default_matches_model_defaults():
    config = load_default()
    defaults = Config()
    assert config.listener[0].address == HostPort("127.0.0.1", 2525)
    assert config.domains.local == ("localhost",)
    assert config.relay.trusted_networks == ()
    assert config.spool == Path("spool")
    assert config.local.maildir_root == Path("mail")
    assert config.limits == defaults.limits


def test_values_parsed_and_normalised():
    config = parse_text(
        """
        hostname = "mx.example.org"
        [[listener]]
        address = "[::1]:25"
        [domains]
        local = ["Example.ORG", "bücher.example"]
        relay = ["example.net"]
        [relay]
        trusted_networks = ["127.0.0.1", "10.0.0.0/8"]
        [routes]
        "example.net" = ["smtp.example.net", "192.0.2.1:587"]
        [dns]
        nameservers = ["127.0.0.1:5353"]
        [delivery]
        min_backoff = 60
        max_backoff = "2h"
        max_queue_lifetime = "3d"
        """,
        "test.toml",
    )
    assert config.listener[0].address == HostPort("::1", 25)
    assert config.domains.local == ("example.org", "xn--bcher-kva.example")
    assert config.relay.trusted_networks == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
    )
    assert config.routes["example.net"].hosts == (
        HostPort("smtp.example.net", 25),
        HostPort("192.0.2.1", 587),
    )
    assert config.dns.nameservers == (HostPort("127.0.0.1", 5353),)
    assert config.delivery.min_backoff == Duration(60)
    assert config.delivery.max_backoff == Duration(7200)
    assert config.delivery.max_queue_lifetime == Duration(3 * 86400)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '[[listener]]\naddress = "0.0.0.0:25x"',
            'listener[0].address = "0.0.0.0:25x": port must be 1-65535',
        ),
        (
            '[[listener]]\naddress = "127.0.0.1"',
            'listener[0].address = "127.0.0.1": the port is missing',
        ),
        (
            'spool_sync = "never"',
            'spool_sync = "never": expected one of: filesystem, file',
        ),
        (
            '[[listener]]\naddress = "mail.example.org:25"',
            'listener[0].address = "mail.example.org:25": host must be an IP address',
        ),
        (
            '[[listener]]\naddress = "::1:25"',
            "write an IPv6 address in brackets",
        ),
        (
            '[[listener]]\naddress = "127.0.0.1:25"\nport = 3',
            "listener[0].port: unknown key; the keys here are: address, kind, etrn,"
            " tls_cert, tls_key, tls, allow_plaintext_auth",
        ),
        ("[[listener]]\nkind = \"smtp\"", "listener[0].address: missing"),
        (
            '[[listener]]\naddress = "127.0.0.1:25"\nkind = "pop3"',
            'listener[0].kind = "pop3": expected one of: smtp, submission',
        ),
        (
            '[[listener]]\naddress = "127.0.0.1:25"\ntls = "ssl"',
            'listener[0].tls = "ssl": expected one of: starttls, implicit, none',
        ),
        (
            '[[listener]]\naddress = "127.0.0.1:25"\ntls = "starttls"',
            'listener[0].tls = "starttls": listener[0].tls_cert is missing',
        ),
        (
            '[[listener]]\naddress = "127.0.0.1:25"\ntls = "implicit"\n'
            'tls_cert = "cert.pem"',
            'listener[0].tls = "implicit": listener[0].tls_key is missing',
        ),
        (
            '[[listener]]\naddress = "127.0.0.1:25"\ntls_cert = "cert.pem"',
            'listener[0].tls = "starttls": listener[0].tls_key is missing',
        ),
        (
            '[[listener]]\naddress = "127.0.0.1:25"\ntls_cert = 5',
            "listener[0].tls_cert = 5: expected a file path string",
        ),
        (
            '[[listener]]\naddress = "127.0.0.1:25"\nallow_plaintext_auth = "yes"',
            'listener[0].allow_plaintext_auth = "yes": expected true or false',
        ),
        (
            '[[listener]]\naddress = "127.0.0.1:25"\nkind = "submission"',
            'listener[0].kind = "submission": a submission listener requires AUTH;'
            " set [auth] credentials",
        ),
        ("[auth]\ncredentials = 3", "auth.credentials = 3: expected a file path"),
        ('[auth]\nfile = "x"', "auth.file: unknown key"),
        ("colour = 1", "colour: unknown key"),
        ("spool = 3", "spool = 3: expected a folder path"),
        (
            '[domains]\nlocal = ["bad_domain!"]',
            'domains.local[0] = "bad_domain!": expected a domain name',
        ),
        (
            '[domains]\nlocal = ["a.example"]\nrelay = ["A.example"]',
            'domains.relay[0] = "a.example": already listed in domains.local',
        ),
        (
            '[relay]\ntrusted_networks = ["10.0.0.0/33"]',
            'relay.trusted_networks[0] = "10.0.0.0/33": expected a network',
        ),
        (
            '[delivery]\nmin_backoff = "5 minutes"',
            'delivery.min_backoff = "5 minutes": expected a duration',
        ),
        (
            '[delivery]\nmin_backoff = "1h"\nmax_backoff = "10m"',
            'delivery.max_backoff = "10m": must not be below delivery.min_backoff (1h)',
        ),
        (
            "[delivery]\nmax_concurrency = 0",
            "delivery.max_concurrency = 0: must be 1 or more",
        ),
        (
            '[delivery]\nmax_concurrency = "20"',
            'delivery.max_concurrency = "20": expected a whole number',
        ),
        (
            '[local.users]\n"example.org" = ["alice"]',
            'local.users."example.org" = [\'alice\']: "example.org" is not in '
            "domains.local",
        ),
        (
            '[local]\npostmaster = "root@example.net"',
            'local.postmaster = "root@example.net": expected an address in one '
            "of domains.local",
        ),
        (
            '[routes]\n"example.net" = ["smtp.example.net:0"]',
            'routes."example.net"[0] = "smtp.example.net:0": port must be 1-65535',
        ),
        ('hostname = "not a name"', 'hostname = "not a name": expected a fully'),
        (
            '[routes]\n"*" = { hosts = ["a.example:25"], tls = "maybe" }',
            'routes."*".tls = "maybe": expected one of: none, opportunistic',
        ),
        (
            '[routes]\n"x.example" = { hosts = ["a.example"], auth_user = "me" }',
            'routes."x.example".auth_user = "me": auth_user and auth_password_file',
        ),
        (
            '[routes]\n"x.example" = 5',
            'routes."x.example" = 5: expected a list of "host:port" next hops',
        ),
        ("[limits]\nmax_recipients = true", "expected a whole number"),
        ("spool = [", "invalid TOML"),
        (
            '[local.users]\nlocalhost = "alice"',
            'local.users.localhost = "alice": expected a list in brackets',
        ),
        ('[domains]\nlocal = "ab"', 'domains.local = "ab": expected a list in brackets'),
        (
            'listener = "127.0.0.1:25"',
            'listener = "127.0.0.1:25": expected one or more [[listener]] tables',
        ),
        ("domains = []", "domains = []: expected a table with the keys: local, relay"),
        ("routes = 5", "routes = 5: expected a table of key = value pairs"),
        ("listener = [1]", "listener[0] = 1: expected a table with the keys: address"),
        ('hostname = "a\\r\\nb"', 'hostname = "a\\r\\nb": expected a fully'),
        (
            '[relay]\ntrusted_networks = ["10.0.0.1/8"]',
            'write "10.0.0.0/8" for the whole network',
        ),
        ('[limits]\ncommand_timeout = "0s"', 'limits.command_timeout = "0s": must be above 0'),
        ("[delivery]\nmax_backoff = 12.5", "delivery.max_backoff = 12.5: expected a duration"),
        (
            'spool = "x"\n[local]\nmaildir_root = "x/mail"',
            'local.maildir_root = "x/mail": must be a folder apart from spool',
        ),
    ],
)
def test_config_error_names_key_and_value(text, expected):
    lines = problems_of(text)
    assert any(expected in line for line in lines), lines
    assert all(line.startswith("config test.toml: ") for line in lines)


def test_route_table_and_smarthost_key():
    config = parse_text(
        """
        [routes]
        "*" = { hosts = ["smarthost.example:465"], tls = "implicit", auth_user = "me", auth_password_file = "/etc/trimta/pw" }
        """,
        "test.toml",
    )
    route = config.routes["*"]
    assert route.hosts == (HostPort("smarthost.example", 465),)
    assert route.tls == "implicit"
    assert route.auth_user == "me"
    assert route.auth_password_file == Path("/etc/trimta/pw")


def test_every_problem_reported_at_once():
    lines = problems_of(
        '[[listener]]\naddress = "x"\n[delivery]\nmax_concurrency = "a"\nbogus = 1'
    )
    assert len(lines) == 3, lines


def test_unreadable_file_names_path(tmp_path):
    missing = tmp_path / "none.toml"
    with pytest.raises(ConfigError) as caught:
        load_file(missing)
    assert str(missing) in str(caught.value)
    assert "cannot read the file" in str(caught.value)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trimta", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_check_config_defaults_prints_toml():
    result = run_cli("check-config", "--defaults")
    assert result.returncode == 0
    assert parse_text(result.stdout, "<stdout>") == load_default()


def test_check_config_bad_file_exits_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[listener]]\naddress = "0.0.0.0:25x"\n')
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert "listener[0].address" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_good_file_exits_0():
    result = run_cli("check-config", str(REPO / "conf" / "trimta.toml"))
    assert result.returncode == 0, result.stderr


def test_unknown_subcommand_exits_2():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1


def test_serve_refuses_invalid_config(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[limits]\nmax_errors = 0\n")
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert "limits.max_errors = 0: must be 1 or more" in result.stderr
