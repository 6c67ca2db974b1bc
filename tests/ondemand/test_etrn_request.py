"""ETRN argument parsing and the per-client rate limit."""

from __future__ import annotations

import pytest

from trimta.ondemand.etrn import EtrnRequest, EtrnSyntaxError, RateLimiter, parse_request


@pytest.mark.parametrize(
    "argument, expected",
    [
        ("example.org", EtrnRequest("domain", "example.org")),
        ("Example.ORG", EtrnRequest("domain", "example.org")),
        ("@example.org", EtrnRequest("subdomains", "example.org")),
        ("bücher.example", EtrnRequest("domain", "xn--bcher-kva.example")),
        ("#customer-1", EtrnRequest("queue", "customer-1")),
    ],
)
def test_valid_etrn_arguments(argument, expected):
    assert parse_request(argument) == expected


@pytest.mark.parametrize(
    "argument",
    ["", " ", "..", "../../../etc", "odmr.example.net/../../x", "@../x", "#", "#a/b",
     "a b", "example.org.", "-bad.example", "a..b", "/etc/passwd", "@", "#queue\x00"],
)
def test_invalid_etrn_arguments_rejected(argument):
    with pytest.raises(EtrnSyntaxError):
        parse_request(argument)


def test_rate_limit_per_client_and_window():
    now = [0.0]
    limiter = RateLimiter(3, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b") is True
    now[0] = 61.0
    assert limiter.allow("a") is True
