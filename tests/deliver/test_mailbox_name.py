"""Mailbox name encoding: readable, injective and always one safe component."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trimta.deliver.mailbox import mailbox_local_part, mailbox_name


@pytest.mark.parametrize("local_part", ["alice", "bob.smith", "a_b-c+tag", "x.", "0"])
def test_plain_names_unchanged(local_part):
    assert mailbox_name(local_part) == local_part


@pytest.mark.parametrize(
    ("local_part", "expected"),
    [
        ("Alice", "%41lice"),
        ("a/b", "a%2Fb"),
        ("100%", "100%25"),
        (".hidden", "%2Ehidden"),
        ("..", "%2E."),
        (".", "%2E"),
        ("a b", "a%20b"),
        ("a\x00b", "a%00b"),
        ("é", "%C3%A9"),
        ("../../etc", "%2E.%2F..%2Fetc"),
        ("", "%"),
    ],
)
def test_special_names_encoded(local_part, expected):
    assert mailbox_name(local_part) == expected
    assert mailbox_local_part(expected) == local_part


@pytest.mark.parametrize(
    "name", ["", ".", "..", ".x", "a/b", "%61", "%2e", "%4", "%ZZ", "A", "%FF"]
)
def test_noncanonical_names_rejected(name):
    with pytest.raises(ValueError):
        mailbox_local_part(name)


def test_overlong_local_part_rejected():
    with pytest.raises(ValueError, match="too long"):
        mailbox_name("é" * 60)


def assert_safe_component(name):
    assert name not in (".", "..")
    assert not name.startswith(".")
    assert "/" not in name
    assert "\x00" not in name
    assert 0 < len(name.encode()) <= 255
    assert name.isascii()


local_parts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=64)


@given(local_parts)
def test_encoding_round_trips_safely(local_part):
    try:
        name = mailbox_name(local_part)
    except ValueError:
        assert len(local_part.encode()) > 85  # only far past 64 octets
        return
    assert_safe_component(name)
    assert mailbox_local_part(name) == local_part


@given(local_parts, local_parts)
def test_encoding_is_injective(first, second):
    try:
        same_name = mailbox_name(first) == mailbox_name(second)
    except ValueError:
        return
    assert same_name == (first == second)
