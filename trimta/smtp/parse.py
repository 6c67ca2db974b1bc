"""Command lines, MAIL/RCPT arguments and ESMTP parameters.

Every parse error raises RemoteProtocolError carrying the reply that the
server sends, built in replies.py.
"""

from __future__ import annotations

import re

import attrs

from trimta.smtp import replies
from trimta.smtp.address import Address, AddressError, find_path_end, parse_path
from trimta.smtp.errors import RemoteProtocolError

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
# Extensions raise the limit for the commands that carry their
# parameters: SIZE +26 (RFC 1870), SMTPUTF8 +10 (RFC 6531), BODY=8BITMIME
# 14 (RFC 6152 gives no number), RET 10 and ENVID 107 (RFC 3461: the
# ENVID value is at most 100 characters), AUTH +500 (RFC 4954), and on
# RCPT NOTIFY 30 and ORCPT 507 (the ORCPT value is at most 500).
MAX_COMMAND_LINE = 512
_EXTRA_OCTETS = {"MAIL": 26 + 10 + 14 + 10 + 107 + 500, "RCPT": 30 + 507}
MAX_ANY_COMMAND_LINE = MAX_COMMAND_LINE + max(_EXTRA_OCTETS.values())

MAX_ENVID = 100  # characters, RFC 3461 4.4
MAX_ORCPT = 500  # characters, RFC 3461 4.2

_VERB = re.compile(rb"[A-Za-z]+")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# RFC 5321 4.1.2 esmtp-value, plus non-ASCII as RFC 6531 3.3 allows.
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+")
# RFC 3461 4: xtext, with "+" only as the start of an upper-case hex pair.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
_NOTIFY_WORDS = {"SUCCESS", "FAILURE", "DELAY"}


@attrs.frozen
class Command:
    """One command line: upper-case ``verb`` and the text after one space."""

    verb: str
    argument: str


def max_line_length(verb: str) -> int:
    """Return the longest command line allowed for verb, CRLF included."""
    return MAX_COMMAND_LINE + _EXTRA_OCTETS.get(verb, 0)


def parse_command(line: bytes) -> Command:
    """Split a command line (without CRLF) into verb and argument.

    Raises:
        RemoteProtocolError: the verb is not letters (500 5.5.1) or the
            argument is not UTF-8 (501 5.5.2).
    """
    verb, _, argument = line.partition(b" ")
    if not _VERB.fullmatch(verb):
        raise RemoteProtocolError("invalid command verb", replies.unknown_command(verb))
    try:
        text = argument.decode("utf-8")
    except UnicodeDecodeError as error:
        reply = replies.syntax_error("command argument is not valid UTF-8")
        raise RemoteProtocolError("argument is not UTF-8", reply) from error
    return Command(verb.decode("ascii").upper(), text)


def split_path_argument(argument: str, keyword: str) -> tuple[str, str]:
    """Split ``FROM:<path> params`` into the path and the parameter text.

    RFC 5321 4.1.1.2 allows no space after the colon; one or more spaces
    are accepted because many clients send one.

    Raises:
        RemoteProtocolError: 501 5.5.2 when the keyword or path is missing.
    """
    command = "MAIL FROM" if keyword == "FROM" else "RCPT TO"
    prefix = argument[: len(keyword) + 1]
    rest = argument[len(keyword) + 1 :].lstrip(" ")
    if prefix.upper() != keyword + ":" or not rest.startswith("<"):
        reply = replies.syntax_error(
            f"{command} needs <address>, got {replies.show(argument)}"
        )
        raise RemoteProtocolError("missing path", reply)
    try:
        end = find_path_end(rest)
    except AddressError as error:
        reply = replies.syntax_error(f"{command} path is invalid: {error.reason}")
        raise RemoteProtocolError("unterminated path", reply) from error
    return rest[:end], rest[end:]


def parse_parameters(text: str) -> dict[str, str | None]:
    """Parse ESMTP parameters (`` KEY=value KEY2``) into a dict with upper-case keys.

    Raises:
        RemoteProtocolError: 501 5.5.4 for malformed or repeated parameters.
    """
    if text and not text.startswith(" "):
        raise _parameter_error(
            f"parameters must follow the path after a space, got {replies.show(text)}"
        )
    params: dict[str, str | None] = {}
    for word in text.split():
        keyword, equals, value = word.partition("=")
        if not _KEYWORD.fullmatch(keyword):
            raise _parameter_error(f"invalid parameter keyword {replies.show(keyword)}")
        if equals and not _VALUE.fullmatch(value):
            raise _parameter_error(
                f"parameter {keyword.upper()} has an invalid value"
                f" {replies.show(value)}"
            )
        if keyword.upper() in params:
            raise _parameter_error(f"parameter {keyword.upper()} is repeated")
        params[keyword.upper()] = value if equals else None
    return params


def _parameter_error(text: str) -> RemoteProtocolError:
    return RemoteProtocolError(text, replies.parameter_error(text))


def parse_mail_argument(argument: str) -> tuple[Address | None, dict[str, str | None]]:
    """Parse the argument of MAIL: reverse-path and parameters.

    Returns:
        The sender (None for ``<>``) and the validated parameters.

    Raises:
        RemoteProtocolError: carries the 501, 553 or 555 reply.
    """
    path, rest = split_path_argument(argument, "FROM")
    params = parse_parameters(rest)
    check_mail_parameters(params)
    utf8 = "SMTPUTF8" in params
    try:
        sender = parse_path(path, allow_null=True, allow_postmaster=False, utf8=utf8)
    except AddressError as error:
        raise _address_error(error, "sender", replies.bad_sender) from error
    return sender, params


def parse_rcpt_argument(
    argument: str, *, utf8: bool
) -> tuple[Address, dict[str, str | None]]:
    """Parse the argument of RCPT: forward-path and parameters.

    Args:
        argument: the text after "RCPT ".
        utf8: the transaction's MAIL command carried SMTPUTF8.

    Raises:
        RemoteProtocolError: carries the 501, 553 or 555 reply.
    """
    path, rest = split_path_argument(argument, "TO")
    params = parse_parameters(rest)
    check_rcpt_parameters(params)
    try:
        recipient = parse_path(path, allow_null=False, allow_postmaster=True, utf8=utf8)
    except AddressError as error:
        raise _address_error(error, "recipient", replies.bad_recipient) from error
    assert recipient is not None  # allow_null=False
    return recipient, params


def _address_error(error: AddressError, role: str, build) -> RemoteProtocolError:
    if error.needs_smtputf8:
        reply = replies.needs_smtputf8(
            f"{role} {replies.show(error.value)} is non-ASCII:"
            " declare SMTPUTF8 in MAIL FROM"
        )
    else:
        reply = build(
            f"{role} address {replies.show(error.value)} is invalid: {error.reason}"
        )
    return RemoteProtocolError(error.reason, reply)


def check_mail_parameters(params: dict[str, str | None]) -> None:
    """Check the MAIL parameters this server offers and normalise BODY and RET.

    Raises:
        RemoteProtocolError: 555 5.5.4 for an unknown keyword, 501 5.5.4
            for an invalid value.
    """
    for keyword, value in params.items():
        checker = _MAIL_PARAMETERS.get(keyword)
        if checker is None:
            raise _unknown_parameter("MAIL", keyword)
        normalised = checker(keyword, value)
        params[keyword] = normalised


def check_rcpt_parameters(params: dict[str, str | None]) -> None:
    """Check the RCPT parameters this server offers (RFC 3461 NOTIFY, ORCPT).

    Raises:
        RemoteProtocolError: 555 5.5.4 or 501 5.5.4.
    """
    for keyword, value in params.items():
        checker = _RCPT_PARAMETERS.get(keyword)
        if checker is None:
            raise _unknown_parameter("RCPT", keyword)
        params[keyword] = checker(keyword, value)


def _unknown_parameter(verb: str, keyword: str) -> RemoteProtocolError:
    text = f"{verb} parameter {replies.show(keyword, 20)} is not supported"
    return RemoteProtocolError(text, replies.unknown_parameter(text))


def _check_size(keyword: str, value: str | None) -> str:
    # RFC 1870 3: size-value = 1*20DIGIT
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 20:
        raise _parameter_error(
            f"SIZE needs a number of octets, got {replies.show(value or '')}"
        )
    return value


def _check_choice(choices: tuple[str, ...]):
    def check(keyword: str, value: str | None) -> str:
        if value is None or value.upper() not in choices:
            allowed = " or ".join(choices)
            raise _parameter_error(
                f"{keyword} must be {allowed}, got {replies.show(value or '')}"
            )
        return value.upper()

    return check


def _check_flag(keyword: str, value: str | None) -> None:
    if value is not None:
        raise _parameter_error(f"{keyword} takes no value, got {replies.show(value)}")
    return None


def _check_envid(keyword: str, value: str | None) -> str:
    if value is None or len(value) > MAX_ENVID or not _XTEXT.fullmatch(value):
        raise _parameter_error(
            f"ENVID needs xtext of at most {MAX_ENVID} characters (RFC 3461 4.4)"
        )
    return value


def _check_notify(keyword: str, value: str | None) -> str:
    # RFC 3461 4.1: "NEVER" alone, or a list of SUCCESS, FAILURE, DELAY.
    words = (value or "").upper().split(",")
    valid = words == ["NEVER"] or (
        set(words) <= _NOTIFY_WORDS and len(set(words)) == len(words)
    )
    if not value or not valid:
        raise _parameter_error(
            "NOTIFY must be NEVER or a list of SUCCESS,FAILURE,DELAY,"
            f" got {replies.show(value or '')}"
        )
    return ",".join(words)


def _check_orcpt(keyword: str, value: str | None) -> str:
    # RFC 3461 4.2: ORCPT=addr-type;xtext. The RFC 6533 "utf-8" type may
    # carry non-ASCII text.
    addr_type, semicolon, address = (value or "").partition(";")
    valid_type = bool(_ADDR_TYPE.fullmatch(addr_type))
    if addr_type.lower() == "rfc822":
        valid_address = bool(address) and bool(_XTEXT.fullmatch(address))
    else:
        valid_address = bool(address)
    if not (semicolon and valid_type and valid_address) or len(value or "") > MAX_ORCPT:
        raise _parameter_error(
            "ORCPT must be addr-type;xtext (RFC 3461 4.2),"
            f" got {replies.show(value or '')}"
        )
    return value or ""


_MAIL_PARAMETERS = {
    "SIZE": _check_size,
    "BODY": _check_choice(("7BIT", "8BITMIME")),
    "SMTPUTF8": _check_flag,
    "RET": _check_choice(("FULL", "HDRS")),
    "ENVID": _check_envid,
}
_RCPT_PARAMETERS = {"NOTIFY": _check_notify, "ORCPT": _check_orcpt}
