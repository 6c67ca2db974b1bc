"""Tests for trimta.smtp.address: paths, mailboxes and domains."""

import pytest

from trimta.smtp.address import (
    Address,
    AddressError,
    find_path_end,
    normalize_domain,
    parse_path,
)


def parse(text, *, null=True, postmaster=True, utf8=False):
    return parse_path(text, allow_null=null, allow_postmaster=postmaster, utf8=utf8)


@pytest.mark.parametrize(
    "text, local, domain",
    [
        ("<alice@example.net>", "alice", "example.net"),
        ("<Alice@EXAMPLE.Net>", "Alice", "example.net"),
        ("<user%example.net@localhost>", "user%example.net", "localhost"),
        ('<"user@example.net"@localhost>', "user@example.net", "localhost"),
        ("<example.net!user@localhost>", "example.net!user", "localhost"),
        ("<a.b+tag@example.test>", "a.b+tag", "example.test"),
        ('<"a b\\"c\\\\"@example.test>', 'a b"c\\', "example.test"),
        ('<"a..b"@example.test>', "a..b", "example.test"),
        ("<@relay1.example.net:alice@example.net>", "alice", "example.net"),
        ("<@r1.example,@r2.example:bob@example.test>", "bob", "example.test"),
        ("<bob@[192.0.2.1]>", "bob", "[192.0.2.1]"),
        ("<bob@[IPv6:2001:DB8:0:0::1]>", "bob", "[IPv6:2001:db8::1]"),
        ("<bob@[ipv6:::1]>", "bob", "[IPv6:::1]"),
        ("<bob@xn--bcher-kva.example.test>", "bob", "xn--bcher-kva.example.test"),
        ("<x@a-b.example>", "x", "a-b.example"),
    ],
)
def test_valid_path_parsed_literally(text, local, domain):
    address = parse(text)
    assert address.local == local
    assert address.domain == domain


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<user@example.net@localhost>", "more than one '@'"),
        ("<bob@@example.test>", "more than one '@'"),
        ("<a..b@example.test>", "local part"),
        ("<.a@example.test>", "local part"),
        ("<a.@example.test>", "local part"),
        ("<a b@example.test>", "local part"),
        ("<alice>", "'@'"),
        ("<alice@>", "domain is empty"),
        ("<@example.test>", "source route"),
        ("<alice@example.test.>", "ends with a dot"),
        ("<alice@-bad.example>", "label"),
        ("<alice@bad-.example>", "label"),
        ("<alice@bad_name.example>", "label"),
        ("<alice@a..example>", "empty label"),
        ("<@relay1.example.net bob@example.test>", "':'"),
        ("<@relay1.example.net:>", "not followed by a mailbox"),
        ("<@relay1.example.net,relay2:bob@example.test>", "must start with '@'"),
        ("<bob@[IPv6:2001:db8::zz]>", "IPv6"),
        ("<bob@[IPv6:fe80::1%eth0]>", "zone"),
        ("<bob@[300.1.1.1]>", "above 255"),
        ("<bob@[192.0.2.1>", "no closing ']'"),
        ("<bob@[192.0.2]>", "not a valid IPv4"),
        ("<bob@[x400:foo]>", "only IPv4 and IPv6"),
        ('<"unterminated@example.test>', "no closing"),
        ('<"bad\\\x01"@example.test>', "backslash"),
        ("<" + "a" * 65 + "@example.test>", "64 octets"),
        ("<a@" + "b" * 64 + ".example>", "63 octets"),
        ("<a@" + ".".join(["b" * 60] * 5) + ">", "255 octets"),
        ("alice@example.test", "enclosed"),
        ("<>", "null path"),
    ],
)
def test_invalid_path_rejected(text, reason):
    with pytest.raises(AddressError) as info:
        parse(text, null=False)
    assert reason in info.value.reason
    assert not info.value.needs_smtputf8


def test_null_path_returns_none():
    assert parse("<>") is None


def test_postmaster_without_domain_accepted():
    for text in ("<Postmaster>", "<postmaster>", "<POSTMASTER>"):
        assert parse(text) == Address(local="postmaster", domain="")


def test_postmaster_needs_permission():
    with pytest.raises(AddressError):
        parse("<Postmaster>", postmaster=False)


@pytest.mark.parametrize(
    "text",
    ["<δοκιμή@example.test>", "<bob@bücher.example.test>", '<"δ x"@example.test>'],
)
def test_non_ascii_without_smtputf8_flagged(text):
    with pytest.raises(AddressError) as info:
        parse(text)
    assert info.value.needs_smtputf8


def test_utf8_local_part_kept_exactly():
    address = parse("<Χρήστης@example.test>", utf8=True)
    assert address.local == "Χρήστης"
    assert address.needs_smtputf8


def test_u_label_domain_becomes_a_label():
    address = parse("<bob@Bücher.example.test>", utf8=True)
    assert address.domain == "xn--bcher-kva.example.test"
    assert address.utf8_domain
    assert address.needs_smtputf8


def test_ascii_address_needs_no_smtputf8():
    assert not parse("<bob@xn--bcher-kva.example.test>").needs_smtputf8


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Example.TEST", "example.test"),
        ("bücher.example.test", "xn--bcher-kva.example.test"),
        ("BÜCHER.example.test", "xn--bcher-kva.example.test"),
        ("xn--bcher-kva.example.test", "xn--bcher-kva.example.test"),
        ("localhost", "localhost"),
        ("a--b.example", "a--b.example"),
    ],
)
def test_normalize_domain_valid(text, expected):
    assert normalize_domain(text) == expected


@pytest.mark.parametrize(
    "text", ["", "example.test.", "xn--zz.example", "exa mple.test", "a@b", "bücher。"]
)
def test_normalize_domain_invalid(text):
    with pytest.raises(AddressError):
        normalize_domain(text)


@pytest.mark.parametrize(
    "address, text",
    [
        (Address("alice", "example.test"), "alice@example.test"),
        (Address("a b", "example.test"), '"a b"@example.test'),
        (Address('a"b\\', "example.test"), '"a\\"b\\\\"@example.test'),
        (Address("a..b", "example.test"), '"a..b"@example.test'),
        (Address("postmaster", ""), "postmaster"),
        (Address("x", "[192.0.2.1]", is_literal=True), "x@[192.0.2.1]"),
    ],
)
def test_str_requotes_local_part(address, text):
    assert str(address) == text


def test_str_round_trips_quoted_local_part():
    address = parse('<"a b\\"c"@example.test>')
    assert parse(f"<{address}>") == address


def test_find_path_end_skips_quoted_bracket():
    text = '<"a>b"@example.test> SIZE=10'
    assert text[: find_path_end(text)] == '<"a>b"@example.test>'


def test_find_path_end_unclosed_raises():
    with pytest.raises(AddressError):
        find_path_end("<alice@example.test")
