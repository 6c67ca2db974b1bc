"""Tests for trimta.smtp.parse and trimta.smtp.replies."""

import re

import pytest

from trimta.smtp import replies
from trimta.smtp.errors import RemoteProtocolError
from trimta.smtp.parse import (
    MAX_COMMAND_LINE,
    max_line_length,
    parse_command,
    parse_mail_argument,
    parse_parameters,
    parse_rcpt_argument,
)
from trimta.smtp.replies import Reply, parse_reply_line


def reply_of(call, *args, **kwargs) -> Reply:
    with pytest.raises(RemoteProtocolError) as info:
        call(*args, **kwargs)
    assert info.value.reply is not None
    return info.value.reply


# Command lines.


def test_command_verb_upper_cased():
    command = parse_command(b"mail FROM:<a@example.test>")
    assert command.verb == "MAIL"
    assert command.argument == "FROM:<a@example.test>"


def test_command_without_argument():
    assert parse_command(b"DATA").argument == ""


@pytest.mark.parametrize("line", [b"", b".", b"MA1L FROM:<>", b"\xffNOOP", b" NOOP"])
def test_invalid_verb_is_unknown_command(line):
    reply = reply_of(parse_command, line)
    assert (reply.code, reply.status) == (500, "5.5.1")


def test_argument_invalid_utf8_rejected():
    reply = reply_of(parse_command, b"VRFY \xff\xfe")
    assert (reply.code, reply.status) == (501, "5.5.2")


def test_line_limits_per_verb():
    assert max_line_length("NOOP") == MAX_COMMAND_LINE == 512
    assert max_line_length("MAIL") > 512 + 26 + 10
    assert max_line_length("RCPT") > 512 + 500


# MAIL and RCPT arguments.


@pytest.mark.parametrize(
    "argument, sender, params",
    [
        ("FROM:<alice@example.net>", "alice@example.net", {}),
        ("from:<alice@example.net>", "alice@example.net", {}),
        ("FROM: <alice@example.net>", "alice@example.net", {}),
        ("FROM:<>", None, {}),
        ("FROM:<> SIZE=120", None, {"SIZE": "120"}),
        ("FROM:<a@b.example>  BODY=8bitmime", "a@b.example", {"BODY": "8BITMIME"}),
        ("FROM:<a@b.example> BODY=7BIT", "a@b.example", {"BODY": "7BIT"}),
        ("FROM:<δ@b.example> SMTPUTF8", "δ@b.example", {"SMTPUTF8": None}),
        ("FROM:<a@b.example> RET=hdrs", "a@b.example", {"RET": "HDRS"}),
        ("FROM:<a@b.example> ENVID=QQ+2B1", "a@b.example", {"ENVID": "QQ+2B1"}),
        ('FROM:<"a> b"@b.example> SIZE=1', '"a> b"@b.example', {"SIZE": "1"}),
    ],
)
def test_mail_argument_valid(argument, sender, params):
    address, parsed = parse_mail_argument(argument)
    assert (None if address is None else str(address)) == sender
    assert parsed == params


@pytest.mark.parametrize(
    "argument, code, status, text",
    [
        ("foo", 501, "5.5.2", 'MAIL FROM needs <address>, got "foo"'),
        ("FROM:alice@example.net", 501, "5.5.2", "needs <address>"),
        ("FROM", 501, "5.5.2", "needs <address>"),
        ("TO:<a@b.example>", 501, "5.5.2", "needs <address>"),
        ("FROM:<a@b.example", 501, "5.5.2", "no closing '>'"),
        ("FROM:<a@@b.example>", 501, "5.1.7", "more than one '@'"),
        ("FROM:<δ@b.example>", 553, "5.6.7", "SMTPUTF8"),
        ("FROM:<a@b.example>SIZE=1", 501, "5.5.4", "after a space"),
        ("FROM:<a@b.example> SIZE=x", 501, "5.5.4", "SIZE"),
        ("FROM:<a@b.example> SIZE", 501, "5.5.4", "SIZE"),
        ("FROM:<a@b.example> SIZE=" + "9" * 21, 501, "5.5.4", "SIZE"),
        ("FROM:<a@b.example> SIZE=1 size=2", 501, "5.5.4", "repeated"),
        ("FROM:<a@b.example> BODY=BINARYMIME", 501, "5.5.4", "BODY"),
        ("FROM:<a@b.example> SMTPUTF8=yes", 501, "5.5.4", "no value"),
        ("FROM:<a@b.example> RET=ALL", 501, "5.5.4", "RET"),
        ("FROM:<a@b.example> ENVID=a+b", 501, "5.5.4", "ENVID"),
        ("FROM:<a@b.example> ENVID=" + "x" * 101, 501, "5.5.4", "ENVID"),
        ("FROM:<a@b.example> FOO=1", 555, "5.5.4", '"FOO" is not supported'),
        ("FROM:<a@b.example> AUTH=<>", 555, "5.5.4", "AUTH"),
        ("FROM:<a@b.example> -X", 501, "5.5.4", "keyword"),
        ("FROM:<a@b.example> X=", 501, "5.5.4", "invalid value"),
        ("FROM:<a@b.example> NOTIFY=NEVER", 555, "5.5.4", "NOTIFY"),
    ],
)
def test_mail_argument_invalid(argument, code, status, text):
    reply = reply_of(parse_mail_argument, argument)
    assert (reply.code, reply.status) == (code, status)
    assert text in reply.text


def test_rcpt_postmaster_and_dsn_params():
    recipient, params = parse_rcpt_argument(
        "TO:<Postmaster> NOTIFY=success,delay ORCPT=rfc822;bob@example.test", utf8=False
    )
    assert recipient.domain == ""
    assert params == {"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;bob@example.test"}


def test_rcpt_utf8_allowed_when_declared():
    recipient, _ = parse_rcpt_argument("TO:<χρήστης@example.test>", utf8=True)
    assert recipient.local == "χρήστης"


@pytest.mark.parametrize(
    "argument, code, status",
    [
        ("TO:<>", 501, "5.1.3"),
        ("TO:<bob@@example.test>", 501, "5.1.3"),
        ("TO:<χρήστης@example.test>", 553, "5.6.7"),
        ("FROM:<bob@example.test>", 501, "5.5.2"),
        ("TO:<bob@example.test> NOTIFY=NEVER,SUCCESS", 501, "5.5.4"),
        ("TO:<bob@example.test> NOTIFY=SUCCESS,SUCCESS", 501, "5.5.4"),
        ("TO:<bob@example.test> NOTIFY=SOMETIMES", 501, "5.5.4"),
        ("TO:<bob@example.test> ORCPT=bob@example.test", 501, "5.5.4"),
        ("TO:<bob@example.test> ORCPT=rfc822;a+zz", 501, "5.5.4"),
        ("TO:<bob@example.test> SIZE=10", 555, "5.5.4"),
    ],
)
def test_rcpt_argument_invalid(argument, code, status):
    reply = reply_of(parse_rcpt_argument, argument, utf8=False)
    assert (reply.code, reply.status) == (code, status)


def test_parameters_keep_order_and_case_of_values():
    assert parse_parameters(" A=x B C=YyY") == {"A": "x", "B": None, "C": "YyY"}


# Replies.


def test_reply_multiline_wire_form():
    reply = Reply(250, "2.0.0", ("first", "second"))
    assert reply.to_bytes() == b"250-2.0.0 first\r\n250 2.0.0 second\r\n"


def test_reply_without_status():
    assert replies.start_mail_input().to_bytes().startswith(b"354 start")


def test_reply_text_sanitised():
    reply = replies.syntax_error("bad\r\nRCPT TO:<x>\x00\x7f é")
    assert reply.to_bytes() == b"501 5.5.2 bad??RCPT TO:<x>?? ?\r\n"


def test_reply_line_capped_at_512_octets():
    wire = replies.syntax_error("x" * 2000).to_bytes()
    assert len(wire) <= 512
    assert wire.endswith(b"\r\n")


@pytest.mark.parametrize(
    "code, status",
    [(250, "5.0.0"), (250, "2.0"), (199, None), (600, None), (550, "5.x.0")],
)
def test_reply_invalid_code_or_status_raises(code, status):
    with pytest.raises(ValueError):
        Reply(code, status, ("text",))


def test_show_quotes_and_truncates():
    assert replies.show("a" * 100, 10) == '"aaaaaaaaaa..."'
    assert replies.show(b"\xffx") == '"?x"'


def test_every_reply_builder_is_well_formed():
    built = [
        replies.greeting("mx.example", "ESMTP trimta"),
        replies.ehlo_ok("mx.example", "client", ["PIPELINING"]),
        replies.helo_ok("mx.example", "client"),
        replies.service_closing("mx.example"),
        replies.shutting_down("mx.example"),
        replies.timeout("mx.example"),
        replies.too_many_errors(),
        replies.session_rejected(),
        replies.ok(),
        replies.sender_ok(),
        replies.recipient_ok(),
        replies.queued("ABC"),
        replies.etrn_started("example.org"),
        replies.cannot_verify(),
        replies.help_text(),
        replies.start_mail_input(),
        replies.unknown_command("FOO"),
        replies.not_implemented("EXPN"),
        replies.turn_refused(),
        replies.bad_sequence("x"),
        replies.syntax_error("x"),
        replies.parameter_error("x"),
        replies.unknown_parameter("x"),
        replies.bad_sender("x"),
        replies.bad_recipient("x"),
        replies.needs_smtputf8("x"),
        replies.line_too_long(512),
        replies.bare_line_ending_in_command(),
        replies.too_many_recipients(100),
        replies.too_big(1000),
        replies.no_valid_recipients(),
        replies.bad_line_ending(),
        replies.text_line_too_long(),
        replies.mail_loop(101),
        replies.connection_lost(),
    ]
    line = re.compile(rb"[2-5][0-9]{2}[ -][\x20-\x7e]*\r\n")
    for reply in built:
        wire = reply.to_bytes()
        assert line.fullmatch(wire.split(b"\r\n")[0] + b"\r\n"), wire
        if reply.code not in (220, 250, 354) or reply.status:
            assert reply.status is not None, wire


@pytest.mark.parametrize(
    "code, status",
    [
        (replies.unknown_command("X"), ("500", "5.5.1")),
        (replies.not_implemented("EXPN"), ("502", "5.5.1")),
        (replies.turn_refused(), ("502", "5.7.0")),
        (replies.bad_sequence("x"), ("503", "5.5.1")),
        (replies.line_too_long(512), ("500", "5.5.6")),
        (replies.too_many_recipients(100), ("452", "4.5.3")),
        (replies.too_big(1), ("552", "5.3.4")),
        (replies.service_closing("h"), ("221", "2.0.0")),
        (replies.shutting_down("h"), ("421", "4.3.2")),
        (replies.timeout("h"), ("421", "4.4.2")),
        (replies.too_many_errors(), ("421", "4.7.0")),
        (replies.needs_smtputf8("x"), ("553", "5.6.7")),
        (replies.mail_loop(101), ("554", "5.4.6")),
        (replies.bad_line_ending(), ("550", "5.6.0")),
        (replies.no_valid_recipients(), ("554", "5.5.1")),
        (replies.cannot_verify(), ("252", "2.1.5")),
        (replies.help_text(), ("214", "2.0.0")),
    ],
)
def test_standard_reply_codes(code, status):
    assert (str(code.code), code.status) == status


@pytest.mark.parametrize(
    "line, parsed",
    [
        (b"250-2.1.0 sender OK\r\n", (250, False, "2.1.0", "sender OK")),
        (b"250 PIPELINING\r\n", (250, True, None, "PIPELINING")),
        (b"354 go ahead", (354, True, None, "go ahead")),
        (b"250", (250, True, None, "")),
        (b"550 4.1.1 mismatched class", (550, True, None, "4.1.1 mismatched class")),
        (b"421-4.3.2 bye\r\n", (421, False, "4.3.2", "bye")),
    ],
)
def test_parse_reply_line(line, parsed):
    assert parse_reply_line(line) == parsed


@pytest.mark.parametrize(
    "line", [b"", b"25 short", b"abc text", b"650 bad", b"250_x", b"2500 x"]
)
def test_parse_reply_line_invalid(line):
    with pytest.raises(RemoteProtocolError):
        parse_reply_line(line)


def test_parse_reply_line_round_trips_reply():
    wire = replies.too_big(1000).to_bytes()
    code, last, status, text = parse_reply_line(wire)
    assert (code, last, status) == (552, True, "5.3.4")
    assert text == replies.too_big(1000).lines[0]
