"""SMTP replies: the value class, its wire form and every standard reply.

Each reply the engines send is built by one function here, so its code,
RFC 3463 enhanced status code and wording live in one place. Error texts
name the rule that was broken and show the offending value, quoted,
sanitised and truncated by ``show``.

RFC 2034 section 4 puts the enhanced status code on every 2xx, 4xx and
5xx reply except the 220 greeting and the replies to HELO and EHLO (the
EHLO reply lines are extension keywords, RFC 5321 4.1.1.1). 3xx replies
such as 354 carry none either.
"""

from __future__ import annotations

import functools
import re

import attrs

from trimta.smtp.errors import RemoteProtocolError

# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets including CRLF.
# The prefix "ddd-x.yyy.zzz " takes at most 14 octets and CRLF 2 more.
MAX_REPLY_LINE = 512
MAX_TEXT = MAX_REPLY_LINE - 14 - 2

_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_REPLY_LINE = re.compile(rb"([2-5][0-9]{2})([ -]|$)(.*)", re.DOTALL)


def sanitize_text(text: str) -> str:
    """Replace every octet outside printable ASCII by "?" and cap the length."""
    return _NOT_PRINTABLE.sub("?", text)[:MAX_TEXT]


def _sanitize_lines(lines: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    if isinstance(lines, str):
        lines = (lines,)
    return tuple(sanitize_text(line) for line in lines) or ("",)


def _check_status(
    instance: Reply, attribute: attrs.Attribute, value: str | None
) -> None:
    if value is None:
        return
    if not _STATUS.fullmatch(value) or value[0] != str(instance.code)[0]:
        raise ValueError(f"invalid enhanced status {value!r} for reply {instance.code}")


def _check_code(instance: Reply, attribute: attrs.Attribute, value: int) -> None:
    if not 200 <= value <= 559:
        raise ValueError(f"reply code must be 200-559, got {value}")


@attrs.frozen
class Reply:
    """One SMTP reply, possibly spanning several lines.

    ``code`` is the three-digit reply code, ``status`` the RFC 3463 enhanced
    status code ("5.5.2") or None where RFC 2034 omits it, and ``lines`` the
    text of each line without code or status. Text is sanitised to
    printable ASCII and capped so that each wire line fits in 512 octets.
    """

    code: int = attrs.field(validator=_check_code)
    status: str | None = attrs.field(validator=_check_status)
    lines: tuple[str, ...] = attrs.field(converter=_sanitize_lines)

    @property
    def text(self) -> str:
        """All text lines joined by a space, for logs."""
        return " ".join(self.lines)

    def to_bytes(self) -> bytes:
        """Serialise the reply with CRLF after each line."""
        return _wire_form(self)


# Most replies are constants sent again and again; serialise each once.
@functools.lru_cache(maxsize=1024)
def _wire_form(reply: Reply) -> bytes:
    prefix = f"{reply.status} " if reply.status else ""
    out = []
    last = len(reply.lines) - 1
    for index, line in enumerate(reply.lines):
        separator = " " if index == last else "-"
        text = f"{reply.code}{separator}{prefix}{line}"
        # RFC 4954 4: a 334 keeps its space even before an empty challenge.
        if reply.code != 334:
            text = text.rstrip(" ")
        out.append(text + "\r\n")
    return "".join(out).encode("ascii")


def parse_reply_line(line: bytes) -> tuple[int, bool, str | None, str]:
    """Parse one reply line received by an SMTP client.

    Args:
        line: the line, with or without its CRLF.

    Returns:
        ``(code, is_last, status, text)``: ``is_last`` is false for a
        "ddd-" continuation line, ``status`` is the enhanced status code
        when the text starts with one whose class matches the reply code.

    Raises:
        RemoteProtocolError: the line does not start with a reply code.
    """
    if line.endswith(b"\r\n"):
        line = line[:-2]
    match = _REPLY_LINE.fullmatch(line)
    if match is None:
        raise RemoteProtocolError(
            f"invalid reply line {show(line)}: needs a code 200-599"
        )
    code = int(match[1])
    is_last = match[2] != b"-"
    text = match[3].decode("utf-8", "replace")
    status, _, rest = text.partition(" ")
    if _STATUS.fullmatch(status) and status[0] == match[1][:1].decode():
        return code, is_last, status, rest
    return code, is_last, None, text


def show(value: str | bytes, limit: int = 60) -> str:
    """Quote a client-supplied value for a reply text, truncated and sanitised."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    clipped = value[:limit] + ("..." if len(value) > limit else "")
    return '"' + _NOT_PRINTABLE.sub("?", clipped) + '"'


# Session replies.


# Replies are immutable, so the ones sent in every session are built once.
@functools.lru_cache(maxsize=64)
def greeting(hostname: str, text: str) -> Reply:
    """Build the 220 greeting (RFC 5321 4.2: no enhanced status)."""
    return Reply(220, None, (f"{hostname} {text}",))


def ehlo_ok(hostname: str, client: str, keywords: list[str]) -> Reply:
    """Build the 250 EHLO reply: greeting line, then one extension per line."""
    return Reply(250, None, (f"{hostname} greets {client}", *keywords))


def helo_ok(hostname: str, client: str) -> Reply:
    """Build the 250 HELO reply."""
    return Reply(250, None, (f"{hostname} greets {client}",))


@functools.lru_cache(maxsize=64)
def service_closing(hostname: str) -> Reply:
    """Build the 221 reply to QUIT."""
    return Reply(221, "2.0.0", (f"{hostname} closing connection",))


def shutting_down(hostname: str) -> Reply:
    """Build the 421 sent when the server shuts down."""
    return Reply(421, "4.3.2", (f"{hostname} shutting down, try again later",))


def timeout(hostname: str) -> Reply:
    """Build the 421 sent when the client was idle too long."""
    return Reply(421, "4.4.2", (f"{hostname} timeout waiting for the client, closing",))


def too_many_errors() -> Reply:
    """Build the 421 sent after the client made too many errors."""
    return Reply(421, "4.7.0", ("too many errors, closing connection",))


def too_many_sessions(text: str) -> Reply:
    """Build the 421 greeting sent when the session limit is reached."""
    return Reply(421, "4.3.2", (text,))


def session_rejected(text: str = "no SMTP service here") -> Reply:
    """Build a 554 greeting refusing the session (RFC 5321 3.1)."""
    return Reply(554, "5.7.0", (text,))


# Command replies.


def ok(text: str = "OK") -> Reply:
    """Build a plain 250 2.0.0 reply (RSET, NOOP)."""
    return Reply(250, "2.0.0", (text,))


_SENDER_OK = Reply(250, "2.1.0", ("sender OK",))
_RECIPIENT_OK = Reply(250, "2.1.5", ("recipient OK",))


def sender_ok(address: str | None = None) -> Reply:
    """Build the 250 2.1.0 reply accepting MAIL FROM."""
    if address is None:
        return _SENDER_OK
    return Reply(250, "2.1.0", (f"sender <{address}> OK",))


def recipient_ok(address: str | None = None) -> Reply:
    """Build the 250 2.1.5 reply accepting RCPT TO."""
    if address is None:
        return _RECIPIENT_OK
    return Reply(250, "2.1.5", (f"recipient <{address}> OK",))


def queued(queue_id: str) -> Reply:
    """Build the 250 2.0.0 reply accepting a message."""
    return Reply(250, "2.0.0", (f"queued as {queue_id}",))


def etrn_started(argument: str) -> Reply:
    """Build the 250 2.0.0 reply to ETRN (RFC 1985 section 5)."""
    return Reply(250, "2.0.0", (f"queuing for node {argument} started",))


def etrn_no_messages(argument: str) -> Reply:
    """Build RFC 1985's 251 reply: no messages are waiting for the node."""
    return Reply(251, "2.0.0", (f"OK, no messages waiting for node {argument}",))


def etrn_pending(argument: str, count: int) -> Reply:
    """Build RFC 1985's 253 reply: a release of `count` messages started."""
    return Reply(
        253, "2.0.0", (f"OK, {count} pending messages for node {argument} started",)
    )


def etrn_unavailable(argument: str, reason: str) -> Reply:
    """Build RFC 1985's 458 reply: the node cannot be queued now."""
    return Reply(458, "4.7.0", (f"unable to queue messages for node {argument}: {reason}",))


def etrn_not_allowed(argument: str, reason: str) -> Reply:
    """Build RFC 1985's 459 reply: the node may not be released."""
    return Reply(459, "4.7.1", (f"node {argument} not allowed: {reason}",))


def etrn_syntax(argument: str, reason: str) -> Reply:
    """Build the 501 reply to a malformed ETRN argument."""
    return Reply(501, "5.5.4", (f"invalid ETRN argument {show(argument)}: {reason}",))


def cannot_verify() -> Reply:
    """Build the 252 reply to VRFY (RFC 5321 3.5.3)."""
    return Reply(
        252,
        "2.1.5",
        ("cannot VRFY user, but will accept message and attempt delivery",),
    )


def help_text() -> Reply:
    """Build the 214 reply to HELP."""
    return Reply(
        214, "2.0.0", ("see RFC 5321, https://www.rfc-editor.org/rfc/rfc5321",)
    )


@functools.lru_cache(maxsize=64)
def start_mail_input() -> Reply:
    """Build the 354 reply to DATA (3xx replies carry no enhanced status)."""
    return Reply(354, None, ("start mail input, end with <CRLF>.<CRLF>",))


# STARTTLS (RFC 3207) and AUTH (RFC 4954) replies.


def tls_ready() -> Reply:
    """Build the 220 2.0.0 reply after which the TLS handshake starts."""
    return Reply(220, "2.0.0", ("ready to start TLS",))


def tls_already_active() -> Reply:
    """Build the 503 reply to a second STARTTLS (RFC 3207 4.2)."""
    return Reply(503, "5.5.1", ("TLS is already active",))


def auth_challenge(text: str) -> Reply:
    """Build a 334 reply carrying a base64 challenge (no enhanced status)."""
    return Reply(334, None, (text,))


def auth_succeeded() -> Reply:
    """Build the 235 2.7.0 reply to a successful AUTH (RFC 4954 6)."""
    return Reply(235, "2.7.0", ("authentication succeeded",))


def auth_failed() -> Reply:
    """Build the 535 5.7.8 reply for credentials that do not match."""
    return Reply(535, "5.7.8", ("authentication credentials invalid",))


def auth_unavailable() -> Reply:
    """Build the 454 4.7.0 reply when credentials cannot be checked now."""
    return Reply(454, "4.7.0", ("temporary authentication failure, try again later",))


def auth_cancelled() -> Reply:
    """Build the 501 5.7.0 reply to a "*" response (RFC 4954 4)."""
    return Reply(501, "5.7.0", ("authentication cancelled by the client",))


def auth_malformed(reason: str) -> Reply:
    """Build the 501 5.5.2 reply to an undecodable or malformed response."""
    return Reply(501, "5.5.2", (f"invalid AUTH response: {reason}",))


def auth_mechanism_unknown(name: str, offered: list[str]) -> Reply:
    """Build the 504 5.5.4 reply for a mechanism this server does not offer."""
    choices = " ".join(offered) or "none"
    return Reply(
        504, "5.5.4", (f"mechanism {show(name, 20)} not offered; use one of: {choices}",)
    )


def auth_encryption_required(name: str) -> Reply:
    """Build the 538 5.7.11 reply: a plaintext mechanism needs TLS first."""
    return Reply(
        538, "5.7.11", (f"encryption required for {name}: send STARTTLS first",)
    )


def auth_required(verb: str = "MAIL") -> Reply:
    """Build the 530 5.7.0 reply to a command that needs AUTH first."""
    return Reply(530, "5.7.0", (f"authentication required: send AUTH before {verb}",))


# Policy and spool replies, sent by the driver.


def relay_denied(address: str) -> Reply:
    """Build the 550 5.7.1 reply for a recipient this server does not relay to."""
    return Reply(550, "5.7.1", (f"relaying to <{address}> denied",))


def user_unknown(address: str) -> Reply:
    """Build the 550 5.1.1 reply for a local recipient that does not exist."""
    return Reply(550, "5.1.1", (f"no such user <{address}>",))


def mailbox_unavailable(address: str) -> Reply:
    """Build the 550 5.2.1 reply for a mailbox that cannot take mail."""
    return Reply(550, "5.2.1", (f"mailbox {address} unavailable",))


@functools.lru_cache(maxsize=64)
def spool_unavailable() -> Reply:
    """Build the 451 4.3.0 reply when the message could not be stored."""
    return Reply(451, "4.3.0", ("cannot store the message now, try again later",))


def storage_full() -> Reply:
    """Build the 452 4.3.1 reply when the spool's file system is full."""
    return Reply(452, "4.3.1", ("insufficient system storage, try again later",))


# Syntax and sequence errors: the engine counts these against max_errors.


def unknown_command(verb: str | bytes) -> Reply:
    """Build the 500 5.5.1 reply for an unrecognised command."""
    return Reply(500, "5.5.1", (f"command not recognized: {show(verb, 20)}",))


def not_implemented(verb: str) -> Reply:
    """Build the 502 5.5.1 reply for a known command this server does not offer."""
    return Reply(502, "5.5.1", (f"{verb} is not implemented",))


def turn_refused() -> Reply:
    """Build the 502 5.7.0 reply to TURN (RFC 2821 removed it as unsafe)."""
    return Reply(
        502,
        "5.7.0",
        ("TURN is not implemented: it would hand mail to an unverified host",),
    )


def bad_sequence(text: str) -> Reply:
    """Build a 503 5.5.1 reply for a command out of order."""
    return Reply(503, "5.5.1", (text,))


def syntax_error(text: str) -> Reply:
    """Build a 501 5.5.2 reply for an invalid command argument."""
    return Reply(501, "5.5.2", (text,))


def parameter_error(text: str) -> Reply:
    """Build a 501 5.5.4 reply for an invalid ESMTP parameter value."""
    return Reply(501, "5.5.4", (text,))


def unknown_parameter(text: str) -> Reply:
    """Build the 555 5.5.4 reply for an unknown MAIL/RCPT parameter (RFC 5321 4.2.3)."""
    return Reply(555, "5.5.4", (text,))


def bad_sender(text: str) -> Reply:
    """Build a 501 5.1.7 reply for an invalid sender address."""
    return Reply(501, "5.1.7", (text,))


def bad_recipient(text: str) -> Reply:
    """Build a 501 5.1.3 reply for an invalid recipient address."""
    return Reply(501, "5.1.3", (text,))


def needs_smtputf8(text: str) -> Reply:
    """Build the 553 5.6.7 reply for a non-ASCII address without SMTPUTF8."""
    return Reply(553, "5.6.7", (text,))


def line_too_long(limit: int) -> Reply:
    """Build the 500 5.5.6 reply for an over-long command line."""
    return Reply(
        500, "5.5.6", (f"line too long: command lines are limited to {limit} octets",)
    )


def bare_line_ending_in_command() -> Reply:
    """Build the 500 5.5.2 reply for a command line with a bare CR or LF."""
    return Reply(
        500,
        "5.5.2",
        ("command line contains a bare CR or LF, but lines must end with CRLF",),
    )


# Transaction limits: not counted as client errors.


def too_many_recipients(limit: int) -> Reply:
    """Build the 452 4.5.3 reply past the recipient limit (RFC 5321 4.5.3.1.10)."""
    return Reply(452, "4.5.3", (f"too many recipients, at most {limit} per message",))


def too_big(limit: int) -> Reply:
    """Build the 552 5.3.4 reply for a message over the size limit."""
    return Reply(552, "5.3.4", (f"message too big, the limit is {limit} octets",))


def no_valid_recipients() -> Reply:
    """Build the 554 5.5.1 reply to DATA when every RCPT failed (RFC 2920 3.1)."""
    return Reply(554, "5.5.1", ("no valid recipients",))


# Message content rejections, sent after the final dot.


def bad_line_ending() -> Reply:
    """Build the 550 5.6.0 reply for message data with a bare CR or LF."""
    return Reply(
        550,
        "5.6.0",
        (
            "message contains a bare CR or LF, but lines must end with CRLF"
            " (RFC 5321 2.3.8)",
        ),
    )


def text_line_too_long() -> Reply:
    """Build the 500 5.5.6 reply for a text line over 1000 octets."""
    return Reply(
        500,
        "5.5.6",
        ("message has a line over 1000 octets including CRLF (RFC 5321 4.5.3.1.6)",),
    )


def mail_loop(count: int) -> Reply:
    """Build the 554 5.4.6 reply for a message with too many Received fields."""
    return Reply(
        554, "5.4.6", (f"mail loop: message has {count} Received header fields",)
    )


def connection_lost() -> Reply:
    """Build the 451 reply recorded, never sent, when the peer leaves in DATA."""
    return Reply(451, "4.4.2", ("connection lost during DATA",))


# ODMR (RFC 2645) replies.


def odmr_no_mail(verb: str) -> Reply:
    """Build the 502 reply to MAIL, RCPT or DATA on an ODMR listener (RFC 2645 5.4)."""
    return Reply(502, "5.5.1", (f"{verb} is not available on the ODMR service; send ATRN",))


def atrn_started(domains: list[str]) -> Reply:
    """Build the 250 reply that turns the connection around (RFC 2645 4.3)."""
    return Reply(250, "2.0.0", (f"OK, now sending mail for {', '.join(domains)}",))


def atrn_denied(domain: str) -> Reply:
    """Build the 450 reply to a domain the user may not release."""
    return Reply(450, "4.7.1", (f"access to domain {domain} denied",))


def atrn_busy(domain: str) -> Reply:
    """Build the 451 reply when a release of the domain is already running."""
    return Reply(451, "4.3.0", (f"a release of {domain} is already running, try again later",))


def atrn_no_mail() -> Reply:
    """Build the 453 reply: no mail is waiting (RFC 2645 4.3)."""
    return Reply(453, "4.3.0", ("you have no mail",))
