"""Domain directory names and message ids."""

import pytest

from trimta.spool import names

VALID = [
    "example.org",
    "a.b-c.example",
    "xn--bcher-kva.example",
    "localhost",
    "[192.0.2.1]",
    "[IPv6:2001:db8::1]",
]
HOSTILE = [
    "",
    ".",
    "..",
    "../etc",
    "a/b",
    "example.org/..",
    "Example.org",
    "example.org.",
    "a..b",
    "-a.example",
    "a-.example",
    "a_b.example",
    "bücher.example",
    "a\x00b",
    "[192.0.2.1",
    "[IPv6:2001:DB8::1]",
    "[IPv6:fe80::1%eth0]",
    "[IPv6:fe80::1%2f..]",
    "[tag:content]",
    "[1.2.3]",
    "[192.0.2.001]",
    "x" * 64 + ".example",
    ("a." * 127) + "ab",
]


@pytest.mark.parametrize("domain", VALID)
def test_valid_domain_used_as_dirname(domain):
    assert names.dirname_for_domain(domain) == domain
    assert names.is_domain_dirname(domain)


@pytest.mark.parametrize("domain", HOSTILE)
def test_hostile_domain_rejected(domain):
    with pytest.raises(ValueError):
        names.dirname_for_domain(domain)
    assert not names.is_domain_dirname(domain)


def test_noncanonical_literal_error_shows_fix():
    with pytest.raises(ValueError, match=r"write it as '\[IPv6:2001:db8::1\]'"):
        names.dirname_for_domain("[IPv6:2001:DB8:0::1]")


def test_mids_unique_sorted_and_safe():
    mids = [names.new_mid() for _ in range(2000)]
    assert len(set(mids)) == len(mids)
    assert mids == sorted(mids)
    for mid in mids[:50]:
        assert names.check_mid(mid) == mid
        assert len(mid) == names.MID_LENGTH


@pytest.mark.parametrize(
    "bad", ["", "../x", "0" * 19, "0" * 21, "W" * 20, "0" * 19 + "/"]
)
def test_invalid_mid_rejected(bad):
    with pytest.raises(ValueError):
        names.check_mid(bad)
    assert not names.is_mid(bad)
