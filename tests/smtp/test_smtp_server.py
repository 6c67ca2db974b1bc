"""Tests for trimta.smtp.server.ServerConnection, driven without I/O."""

from __future__ import annotations

import re

import pytest

from trimta.smtp import replies
from trimta.smtp.address import Address
from trimta.smtp.errors import LocalProtocolError
from trimta.smtp.events import (
    NEED_DATA,
    ConnectionClosed,
    DataStarted,
    Ehlo,
    EndOfMessage,
    Etrn,
    MailFrom,
    MessageAborted,
    MessageData,
    Quit,
    RcptTo,
)
from trimta.smtp.parse import MAX_ANY_COMMAND_LINE
from trimta.smtp.server import ServerConnection, ServerSettings, State

LOCAL_DOMAINS = {"example.test", "xn--bcher-kva.example.test", "", "[127.0.0.1]"}
MAX_STEPS = 100_000


def local_policy(event):
    """Reply like the fixture MTA: local domains only, everything else OK."""
    if isinstance(event, RcptTo) and event.recipient.domain not in LOCAL_DOMAINS:
        return replies.Reply(550, "5.7.1", ("relaying denied",))
    if isinstance(event, EndOfMessage):
        return replies.queued("Q1")
    return replies.ok()


class Session:
    """A ServerConnection plus a fake driver that records events and wire bytes."""

    def __init__(self, policy=local_policy, **settings):
        self.conn = ServerConnection(ServerSettings("mx.example.test", **settings))
        self.policy = policy
        self.events: list = []
        self.conn.send_greeting()
        self.greeting = self.conn.data_to_send()

    def send(self, data: bytes) -> bytes:
        """Feed data, run events to NEED_DATA or close, return the reply bytes."""
        self.conn.receive_data(data)
        for _ in range(MAX_STEPS):
            event = self.conn.next_event()
            if event is NEED_DATA:
                break
            self.events.append(event)
            if self.conn.awaiting_reply:
                self.conn.send_reply(self.policy(event))
            if isinstance(event, ConnectionClosed):
                break
        return self.conn.data_to_send()

    def codes(self, data: bytes) -> list[str]:
        """Feed data and return "code status" of each reply's last line."""
        return final_lines(self.send(data))

    def events_of(self, kind) -> list:
        return [event for event in self.events if isinstance(event, kind)]


def final_lines(wire: bytes) -> list[str]:
    """Return "code" or "code status" for each complete reply in wire."""
    out = []
    for line in wire.decode("ascii").split("\r\n")[:-1]:
        if line[3:4] == " ":
            match = re.match(r"(\d{3}) (\d\.\d{1,3}\.\d{1,3})?", line)
            out.append(" ".join(part for part in match.groups() if part))
    return out


def ready(**settings) -> Session:
    session = Session(**settings)
    session.send(b"EHLO client.example.net\r\n")
    return session


def in_transaction(**settings) -> Session:
    session = ready(**settings)
    session.send(b"MAIL FROM:<alice@example.net>\r\nRCPT TO:<bob@example.test>\r\n")
    return session


# Greeting, EHLO, HELO.


def test_greeting_names_host():
    assert Session().greeting == b"220 mx.example.test ESMTP trimta\r\n"


def test_ehlo_lists_extensions():
    wire = Session().send(b"EHLO client.example.net\r\n")
    assert wire == (
        b"250-mx.example.test greets client.example.net\r\n250-PIPELINING\r\n"
        b"250-SIZE 10240000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250 DSN\r\n"
    )


def test_ehlo_advertises_etrn_when_enabled():
    assert b"250 ETRN\r\n" in Session(etrn=True).send(b"EHLO c.example\r\n")


def test_helo_single_line_and_event():
    session = Session()
    assert (
        session.send(b"HELO c.example\r\n")
        == b"250 mx.example.test greets c.example\r\n"
    )
    assert session.events == [Ehlo("c.example", extended=False)]
    assert not session.conn.extended


@pytest.mark.parametrize(
    "line, code",
    [
        (b"EHLO\r\n", "501 5.5.2"),
        (b"EHLO \r\n", "501 5.5.2"),
        (b"EHLO two words\r\n", "501 5.5.2"),
        (b"EHLO [300.1.1.1]\r\n", "501 5.5.2"),
        (b"HELO\r\n", "501 5.5.2"),
        (b"EHLO [192.0.2.10]\r\n", "250"),
        (b"EHLO [IPv6:2001:db8::10]\r\n", "250"),
        (b"ehlo client.example.net\r\n", "250"),
    ],
)
def test_ehlo_argument_checked(line, code):
    assert Session().codes(line) == [code]


# Sequence errors (RFC 5321 3.3, 4.1.4).


@pytest.mark.parametrize(
    "setup, line, code",
    [
        (b"", b"MAIL FROM:<a@example.net>\r\n", "503 5.5.1"),
        (b"EHLO c\r\n", b"RCPT TO:<b@example.test>\r\n", "503 5.5.1"),
        (b"EHLO c\r\n", b"DATA\r\n", "503 5.5.1"),
        (b"EHLO c\r\nMAIL FROM:<a@example.net>\r\n", b"DATA\r\n", "503 5.5.1"),
        (
            b"EHLO c\r\nMAIL FROM:<a@example.net>\r\n",
            b"MAIL FROM:<m@example.net>\r\n",
            "503 5.5.1",
        ),
    ],
)
def test_bad_sequence_rejected(setup, line, code):
    session = Session()
    if setup:
        session.send(setup)
    assert session.codes(line) == [code]


def test_data_after_only_rejected_rcpts_gets_554():
    session = ready()
    wire = session.send(
        b"MAIL FROM:<alice@example.net>\r\nRCPT TO:<bob@@example.test>\r\n"
        b"RCPT TO:<x@elsewhere.example>\r\nDATA\r\n"
    )
    assert final_lines(wire) == ["250 2.0.0", "501 5.1.3", "550 5.7.1", "554 5.5.1"]
    assert session.conn.state is State.COMMAND


def test_pipelined_group_with_one_good_recipient():
    session = ready()
    wire = session.send(
        b"MAIL FROM:<alice@example.net>\r\nRCPT TO:<bob@example.test>\r\n"
        b"RCPT TO:<bob@@example.test>\r\nDATA\r\n"
    )
    assert final_lines(wire) == ["250 2.0.0", "250 2.0.0", "501 5.1.3", "354"]
    assert session.codes(b"Subject: pipelined\r\n\r\nhello\r\n.\r\n") == ["250 2.0.0"]
    assert session.events_of(EndOfMessage) == [
        EndOfMessage(size=29, received_headers=0)
    ]


# MAIL and RCPT.


def test_mail_event_carries_sender_and_params():
    session = ready()
    session.send(b"MAIL FROM:<alice@example.net> SIZE=100 BODY=8BITMIME\r\n")
    assert session.events[-1] == MailFrom(
        Address("alice", "example.net"), {"SIZE": "100", "BODY": "8BITMIME"}
    )
    assert session.conn.in_transaction
    assert session.conn.sender == Address("alice", "example.net")
    assert session.conn.mail_params == {"SIZE": "100", "BODY": "8BITMIME"}


def test_null_sender_accepted():
    session = ready()
    assert session.codes(b"MAIL FROM:<>\r\n") == ["250 2.0.0"]
    assert session.conn.in_transaction
    assert session.conn.sender is None


def test_mail_syntax_error_names_value():
    wire = ready().send(b"MAIL FROM:foo\r\n")
    assert wire == b'501 5.5.2 MAIL FROM needs <address>, got "FROM:foo"\r\n'


def test_rcpt_null_path_rejected():
    assert in_transaction().codes(b"RCPT TO:<>\r\n") == ["501 5.1.3"]


def test_rcpt_postmaster_without_domain():
    session = in_transaction()
    assert session.codes(b"RCPT TO:<Postmaster>\r\n") == ["250 2.0.0"]
    assert session.conn.recipients[-1] == Address("postmaster", "")


def test_driver_rejected_recipient_not_kept():
    session = in_transaction()
    assert session.codes(b"RCPT TO:<x@elsewhere.example>\r\n") == ["550 5.7.1"]
    assert session.conn.recipients == (Address("bob", "example.test"),)


def test_driver_rejected_mail_opens_no_transaction():
    session = Session(policy=lambda event: replies.Reply(550, "5.7.1", ("no",)))
    session.send(b"EHLO c\r\n")
    assert session.codes(
        b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.test>\r\n"
    ) == [
        "550 5.7.1",
        "503 5.5.1",
    ]
    assert not session.conn.in_transaction


def test_size_over_limit_rejected_at_mail():
    session = ready(max_message_size=1000)
    assert session.codes(b"MAIL FROM:<a@example.net> SIZE=1001\r\n") == ["552 5.3.4"]
    assert session.codes(b"MAIL FROM:<a@example.net> SIZE=1000\r\n") == ["250 2.0.0"]


def test_size_unlimited_when_zero():
    session = ready(max_message_size=0)
    assert session.codes(b"MAIL FROM:<a@example.net> SIZE=99999999999\r\n") == [
        "250 2.0.0"
    ]


def test_recipient_limit_gives_452():
    session = ready(max_recipients=3, max_errors=2)
    session.send(b"MAIL FROM:<a@example.net>\r\n")
    rcpts = b"".join(b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(6))
    assert session.codes(rcpts) == ["250 2.0.0"] * 3 + ["452 4.5.3"] * 3
    assert len(session.conn.recipients) == 3
    assert session.conn.state is State.COMMAND  # 452s are not errors


def test_hundred_recipients_accepted_by_default():
    session = ready()
    session.send(b"MAIL FROM:<a@example.net>\r\n")
    rcpts = b"".join(b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(1100))
    codes = session.codes(rcpts)
    assert codes == ["250 2.0.0"] * 100 + ["452 4.5.3"] * 1000
    assert session.codes(b"DATA\r\n") == ["354"]


def test_non_ascii_sender_without_smtputf8_gets_553():
    session = ready()
    assert session.codes("MAIL FROM:<δοκιμή@example.net>\r\n".encode()) == ["553 5.6.7"]


def test_non_ascii_recipient_needs_smtputf8_mail():
    session = in_transaction()
    assert session.codes("RCPT TO:<χρήστης@example.test>\r\n".encode()) == ["553 5.6.7"]


def test_smtputf8_transaction_accepts_utf8():
    session = ready()
    wire = session.send(
        "MAIL FROM:<δοκιμή@παράδειγμα.example.net> SMTPUTF8\r\n"
        "RCPT TO:<χρήστης@example.test>\r\nRCPT TO:<bob@bücher.example.test>\r\n".encode()
    )
    assert final_lines(wire) == ["250 2.0.0"] * 3
    assert [str(r) for r in session.conn.recipients] == [
        "χρήστης@example.test",
        "bob@xn--bcher-kva.example.test",
    ]


def test_long_mail_line_within_allowance_accepted():
    envid = b"E" * 100
    line = (
        b"MAIL FROM:<" + b"a" * 64 + b"@" + b"b" * 60 + b".example> SIZE=10 RET=HDRS "
    )
    line += b"ENVID=" + envid + b" BODY=8BITMIME SMTPUTF8 " + b" " * 300 + b"\r\n"
    assert len(line) > 512
    assert ready().codes(line) == ["250 2.0.0"]


# Session commands.


@pytest.mark.parametrize(
    "line, code",
    [
        (b"NOOP\r\n", "250 2.0.0"),
        (b"NOOP anything\r\n", "250 2.0.0"),
        (b"VRFY bob\r\n", "252 2.1.5"),
        (b"VRFY\r\n", "501 5.5.2"),
        (b"HELP\r\n", "214 2.0.0"),
        (b"HELP MAIL\r\n", "214 2.0.0"),
        (b"RSET\r\n", "250 2.0.0"),
        (b"RSET now\r\n", "501 5.5.4"),
        (b"DATA now\r\n", "501 5.5.4"),
        (b"FOO\r\n", "500 5.5.1"),
        (b"\r\n", "500 5.5.1"),
        (b".\r\n", "500 5.5.1"),
        (b"TURN\r\n", "502 5.7.0"),
        (b"EXPN list\r\n", "502 5.5.1"),
        (b"BDAT 16 LAST\r\n", "502 5.5.1"),
        (b"STARTTLS\r\n", "502 5.5.1"),
        (b"AUTH PLAIN\r\n", "502 5.5.1"),
        (b"ATRN example.org\r\n", "502 5.5.1"),
        (b"ETRN example.org\r\n", "502 5.5.1"),
    ],
)
def test_engine_answers_command(line, code):
    assert ready().codes(line) == [code]


def test_quit_closes_session():
    session = ready()
    assert (
        session.send(b"QUIT\r\nNOOP\r\n")
        == b"221 2.0.0 mx.example.test closing connection\r\n"
    )
    assert session.events[-2:] == [Quit(), ConnectionClosed()]
    assert session.conn.state is State.CLOSED
    assert session.conn.next_event() == ConnectionClosed()


def test_etrn_emits_event_when_enabled():
    session = ready(etrn=True)
    assert session.codes(b"ETRN example.org\r\n") == ["250 2.0.0"]
    assert session.events[-1] == Etrn("example.org")


@pytest.mark.parametrize(
    "setup, line, code",
    [
        (b"EHLO c\r\n", b"ETRN\r\n", "501 5.5.4"),
        (b"", b"ETRN example.org\r\n", "503 5.5.1"),
        (
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n",
            b"ETRN example.org\r\n",
            "503 5.5.1",
        ),
    ],
)
def test_etrn_checks(setup, line, code):
    session = Session(etrn=True)
    if setup:
        session.send(setup)
    assert session.codes(line) == [code]


# Resets (RFC 5321 4.1.1.5, 4.1.4).


def test_rset_keeps_greeting_clears_transaction():
    session = in_transaction()
    assert session.codes(b"RSET\r\n") == ["250 2.0.0"]
    assert not session.conn.in_transaction
    assert session.conn.recipients == ()
    assert session.conn.helo_name == "client.example.net"
    assert session.codes(b"MAIL FROM:<a@example.net>\r\n") == ["250 2.0.0"]


def test_second_ehlo_resets_transaction():
    session = in_transaction()
    session.send(b"EHLO other.example\r\n")
    assert not session.conn.in_transaction
    assert session.conn.helo_name == "other.example"
    assert session.codes(b"RCPT TO:<bob@example.test>\r\n") == ["503 5.5.1"]


def test_noop_and_vrfy_keep_transaction():
    session = in_transaction()
    session.send(b"NOOP\r\nVRFY bob\r\n")
    assert session.conn.in_transaction
    assert session.codes(b"DATA\r\n") == ["354"]


# Command line framing.


def test_bare_lf_in_command_not_executed():
    session = ready()
    assert session.codes(b"NOOP\nMAIL FROM:<a@example.net>\r\n") == ["500 5.5.2"]
    assert not session.events_of(MailFrom)


def test_bare_cr_in_command_not_executed():
    session = ready()
    assert session.codes(b"MAIL FROM:<a@example.net>\rRSET\r\n") == ["500 5.5.2"]
    assert not session.events_of(MailFrom)


def test_bare_lf_alone_waits_for_crlf():
    session = ready()
    assert session.send(b"NOOP\n") == b""
    assert session.codes(b"\r\n") == ["500 5.5.2"]


def test_long_command_line_one_reply():
    session = ready()
    assert session.codes(b"NOOP " + b"x" * 2000 + b"\r\n") == ["500 5.5.6"]
    assert session.codes(b"NOOP\r\n") == ["250 2.0.0"]


def test_line_of_513_octets_too_long():
    line = b"NOOP " + b"x" * 506 + b"\r\n"
    assert len(line) == 513
    assert ready().codes(line) == ["500 5.5.6"]
    assert ready().codes(line[:-3] + b"\r\n") == ["250 2.0.0"]


def test_endless_line_memory_bounded():
    session = ready()
    session.send(b"NOOP ")
    for _ in range(256):
        assert session.send(b"y" * 4096) == b""
        assert len(session.conn._input) <= MAX_ANY_COMMAND_LINE + 4096
    assert session.codes(b"\r\n") == ["500 5.5.6"]
    assert session.codes(b"NOOP\r\n") == ["250 2.0.0"]


def test_long_line_crlf_split_across_feeds():
    session = ready()
    session.send(b"NOOP " + b"z" * 3000 + b"\r")
    assert session.codes(b"\nNOOP\r\n") == ["500 5.5.6", "250 2.0.0"]


def test_tail_of_long_line_never_executed():
    session = ready()
    data = b"NOOP " + b"x" * 1500 + b"MAIL FROM:<a@example.net>\r\n"
    assert session.codes(data) == ["500 5.5.6"]
    assert not session.events_of(MailFrom)


# Pipelining and the reply contract.


def test_pipelined_input_waits_for_driver_reply():
    session = ready()
    conn = session.conn
    conn.receive_data(b"MAIL FROM:<a@example.net>\r\nNOOP\r\n")
    assert isinstance(conn.next_event(), MailFrom)
    assert conn.awaiting_reply
    assert conn.data_to_send() == b""
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    conn.send_reply(replies.sender_ok())
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"250 2.1.0 sender OK\r\n250 2.0.0 OK\r\n"


def test_send_reply_without_pending_event_raises():
    with pytest.raises(LocalProtocolError):
        ready().conn.send_reply(replies.ok())


def test_send_reply_3xx_raises():
    session = ready()
    session.conn.receive_data(b"MAIL FROM:<a@example.net>\r\n")
    session.conn.next_event()
    with pytest.raises(LocalProtocolError):
        session.conn.send_reply(replies.start_mail_input())


def test_next_event_before_greeting_raises():
    with pytest.raises(LocalProtocolError):
        ServerConnection(ServerSettings("mx.example.test")).next_event()


def test_driver_421_reply_closes():
    session = Session(policy=lambda event: replies.shutting_down("mx.example.test"))
    session.send(b"EHLO c\r\n")
    assert session.codes(b"MAIL FROM:<a@example.net>\r\nNOOP\r\n") == ["421 4.3.2"]
    assert session.conn.state is State.CLOSED
    assert session.events[-1] == ConnectionClosed()


def test_close_queues_reply_and_closes():
    session = in_transaction()
    session.conn.close(replies.timeout("mx.example.test"))
    assert final_lines(session.conn.data_to_send()) == ["421 4.4.2"]
    assert session.conn.next_event() == ConnectionClosed()
    with pytest.raises(LocalProtocolError):
        session.conn.close(replies.timeout("mx.example.test"))


def test_refuse_session_instead_of_greeting():
    conn = ServerConnection(ServerSettings("mx.example.test"))
    conn.refuse_session(replies.session_rejected())
    assert final_lines(conn.data_to_send()) == ["554 5.7.0"]
    assert conn.state is State.CLOSED
    assert conn.next_event() == ConnectionClosed()
    with pytest.raises(LocalProtocolError):
        conn.send_greeting()


def test_too_many_errors_closes_with_421():
    session = ready(max_errors=3)
    wire = session.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert final_lines(wire) == ["500 5.5.1", "500 5.5.1", "500 5.5.1", "421 4.7.0"]
    assert session.events[-1] == ConnectionClosed()


def test_driver_rejections_not_counted_as_errors():
    session = ready(max_errors=2)
    session.send(b"MAIL FROM:<a@example.net>\r\n")
    rcpts = b"".join(b"RCPT TO:<u%d@remote.example>\r\n" % i for i in range(5))
    assert session.codes(rcpts) == ["550 5.7.1"] * 5
    assert session.conn.state is State.COMMAND


def test_eof_in_command_state_closes():
    session = ready()
    session.conn.receive_data(b"NOOP\r\nNOO")
    session.send(b"")
    assert session.events[-1] == ConnectionClosed()
    with pytest.raises(LocalProtocolError):
        session.conn.receive_data(b"x")


# DATA.


def test_message_delivered_in_events():
    session = in_transaction()
    assert session.codes(b"DATA\r\n") == ["354"]
    assert session.conn.state is State.DATA
    assert session.codes(b"Subject: hi\r\n\r\nbody\r\n.\r\n") == ["250 2.0.0"]
    data = b"".join(event.data for event in session.events_of(MessageData))
    assert data == b"Subject: hi\r\n\r\nbody\r\n"
    assert session.events_of(DataStarted) == [DataStarted()]
    assert session.conn.state is State.COMMAND
    assert not session.conn.in_transaction


def test_recipients_visible_until_end_of_message_reply():
    session = in_transaction()
    conn = session.conn
    session.send(b"DATA\r\n")
    conn.receive_data(b"x\r\n.\r\n")
    assert isinstance(conn.next_event(), MessageData)
    assert isinstance(conn.next_event(), EndOfMessage)
    assert conn.recipients == (Address("bob", "example.test"),)
    conn.send_reply(replies.queued("Q7"))
    assert conn.recipients == ()


def test_new_transaction_after_message():
    session = in_transaction()
    session.send(b"DATA\r\n")
    codes = session.codes(
        b"x\r\n.\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<d@example.test>\r\n"
    )
    assert codes == ["250 2.0.0", "250 2.0.0", "250 2.0.0"]


def test_empty_message_right_after_354():
    session = in_transaction()
    assert session.codes(b"DATA\r\n.\r\n") == ["354", "250 2.0.0"]
    assert session.events_of(EndOfMessage) == [EndOfMessage(0, 0)]
    assert session.events_of(MessageData) == []


@pytest.mark.parametrize(
    "body",
    [
        b"body a\n.\nMAIL FROM:<ceo-a@example.test>\r\n",
        b"body b\r\n.\nMAIL FROM:<ceo-b@example.test>\r\n",
        b"body c\r.\rMAIL FROM:<ceo-c@example.test>\r\n",
        b"body d\r\n.\r\r\nMAIL FROM:<ceo-d@example.test>\r\n",
    ],
)
def test_smuggling_variants_rejected_once(body):
    session = in_transaction()
    session.send(b"DATA\r\n")
    data = (
        b"Subject: variant\r\n\r\n" + body + b"RCPT TO:<bob@example.test>\r\nDATA\r\n"
    )
    data += b"Subject: smuggled\r\n\r\nx\r\n.\r\n"
    assert session.codes(data) == ["550 5.6.0"]
    assert session.events_of(MessageAborted) == [
        MessageAborted(replies.bad_line_ending())
    ]
    assert len(session.events_of(MailFrom)) == 1
    assert session.events_of(EndOfMessage) == []
    assert session.codes(b"QUIT\r\n") == ["221 2.0.0"]


@pytest.mark.parametrize(
    "content, code",
    [
        (b"Subject: l\r\n\r\n" + b"a" * 5000 + b"\r\nnext line\r\n", "500 5.5.6"),
        (b"Received: x\r\n" * 101 + b"\r\nbody\r\n", "554 5.4.6"),
        (b"x" * 500 + b"\r\n" + b"y" * 20000 + b"\r\n", "552 5.3.4"),
    ],
    ids=["long-line", "mail-loop", "too-big"],
)
def test_data_rejected_after_final_dot(content, code):
    session = in_transaction(max_message_size=10_000)
    session.send(b"DATA\r\n")
    assert session.send(content) == b""
    assert session.codes(b".\r\n") == [code]
    assert len(session.events_of(MessageAborted)) == 1
    assert not session.conn.in_transaction
    assert session.conn.state is State.COMMAND


def test_oversized_message_stops_message_data():
    session = in_transaction(max_message_size=100)
    session.send(b"DATA\r\n")
    session.send(b"x" * 90 + b"\r\n")
    session.send(b"y" * 5000 + b"\r\n.\r\n")
    emitted = sum(len(event.data) for event in session.events_of(MessageData))
    assert emitted <= 100


def test_eof_in_data_aborts_then_closes():
    session = in_transaction()
    session.send(b"DATA\r\npartial")
    assert session.send(b"") == b""
    assert session.events[-2:] == [
        MessageAborted(replies.connection_lost()),
        ConnectionClosed(),
    ]


def test_dot_transparency_case():
    session = in_transaction()
    session.send(b"DATA\r\n")
    session.send(
        b"Subject: dots\r\n\r\nline1\r\n..\r\n..leading dot\r\n .\r\n.\x20\r\n...\r\n"
        b".\tx\r\nlast\r\n.\r\n"
    )
    data = b"".join(event.data for event in session.events_of(MessageData))
    assert data == (
        b"Subject: dots\r\n\r\nline1\r\n.\r\n.leading dot\r\n .\r\n \r\n..\r\n\tx\r\nlast\r\n"
    )


# Whole dialogues from the project's conformance cases.


def converse(session: Session, steps: list[tuple[bytes, list[str]]]) -> None:
    for data, expected in steps:
        assert session.codes(data) == expected, data


def test_dialogue_state_resets():
    converse(
        Session(),
        [
            (b"EHLO client.example.net\r\n", ["250"]),
            (b"MAIL FROM:<alice@example.net>\r\n", ["250 2.0.0"]),
            (b"MAIL FROM:<mallory@example.net>\r\n", ["503 5.5.1"]),
            (b"RCPT TO:<bob@example.test>\r\n", ["250 2.0.0"]),
            (b"EHLO client.example.net\r\n", ["250"]),
            (b"RCPT TO:<bob@example.test>\r\n", ["503 5.5.1"]),
            (b"DATA\r\n", ["503 5.5.1"]),
            (b"MAIL FROM:<alice@example.net>\r\n", ["250 2.0.0"]),
            (b"RCPT TO:<carol@example.test>\r\n", ["250 2.0.0"]),
            (b"RSET\r\n", ["250 2.0.0"]),
            (b"DATA\r\n", ["503 5.5.1"]),
            (b"MAIL FROM:<alice@example.net>\r\n", ["250 2.0.0"]),
            (b"RSET\r\n", ["250 2.0.0"]),
            (b"HELO client.example.net\r\n", ["250"]),
            (b"MAIL FROM:<alice@example.net>\r\n", ["250 2.0.0"]),
            (b"NOOP\r\n", ["250 2.0.0"]),
            (b"VRFY bob@example.test\r\n", ["252 2.1.5"]),
            (b"RCPT TO:<bob@example.test>\r\n", ["250 2.0.0"]),
            (b"DATA\r\n", ["354"]),
            (b"Subject: after resets\r\n\r\nbody\r\n.\r\n", ["250 2.0.0"]),
            (b"MAIL FROM:<alice@example.net>\r\n", ["250 2.0.0"]),
            (b"RCPT TO:<dave@example.test>\r\n", ["250 2.0.0"]),
            (b"QUIT\r\n", ["221 2.0.0"]),
        ],
    )


def test_dialogue_source_routes_and_postmaster():
    session = Session()
    converse(
        session,
        [
            (b"EHLO client.example.net\r\n", ["250"]),
            (b"MAIL FROM:<@relay1.example.net:alice@example.net>\r\n", ["250 2.0.0"]),
            (
                b"RCPT TO:<@relay1.example.net,@relay2.example.net:bob@example.test>\r\n",
                ["250 2.0.0"],
            ),
            (b"RCPT TO:<@relay1.example.net bob@example.test>\r\n", ["501 5.1.3"]),
            (b"RCPT TO:<@relay1.example.net:>\r\n", ["501 5.1.3"]),
            (b"RCPT TO:<Postmaster>\r\n", ["250 2.0.0"]),
            (b"RCPT TO:<postmaster@example.test>\r\n", ["250 2.0.0"]),
        ],
    )
    assert session.conn.sender == Address("alice", "example.net")
    assert [str(r) for r in session.conn.recipients] == [
        "bob@example.test",
        "postmaster",
        "postmaster@example.test",
    ]


def test_dialogue_address_literals():
    converse(
        Session(),
        [
            (b"EHLO [192.0.2.10]\r\n", ["250"]),
            (b"EHLO [IPv6:2001:db8::10]\r\n", ["250"]),
            (b"MAIL FROM:<alice@[IPv6:2001:db8::10]>\r\n", ["250 2.0.0"]),
            (b"RCPT TO:<postmaster@[127.0.0.1]>\r\n", ["250 2.0.0"]),
            (b"RCPT TO:<bob@[IPv6:2001:db8::zz]>\r\n", ["501 5.1.3"]),
            (b"RCPT TO:<bob@[300.1.1.1]>\r\n", ["501 5.1.3"]),
            (b"RCPT TO:<bob@[192.0.2.1>\r\n", ["501 5.1.3"]),
            (b"RCPT TO:<bob@[192.0.2.55]>\r\n", ["550 5.7.1"]),
            (b"DATA\r\n", ["354"]),
            (b"Subject: address literal\r\n\r\nbody\r\n.\r\n", ["250 2.0.0"]),
        ],
    )


def test_dialogue_bdat_without_chunking():
    session = in_transaction()
    codes = session.codes(b"BDAT 16 LAST\r\nSubject: x\r\nhi\r\n")
    assert codes == ["502 5.5.1", "500 5.5.1", "500 5.5.1"]
    assert session.codes(b"DATA\r\n") == ["354"]
    other = ready()
    assert other.codes(b"BDAT 4294967296 LAST\r\nBDAT 0 LAST\r\nNOOP\r\n") == [
        "502 5.5.1",
        "502 5.5.1",
        "250 2.0.0",
    ]
    assert ready().codes(b"BDAT 5\r\n.\r\n\r\nNOOP\r\n") == [
        "502 5.5.1",
        "500 5.5.1",
        "500 5.5.1",
        "250 2.0.0",
    ]


def test_dialogue_null_reverse_path():
    converse(
        ready(),
        [
            (b"MAIL FROM:<>\r\n", ["250 2.0.0"]),
            (b"RCPT TO:<>\r\n", ["501 5.1.3"]),
            (b"RCPT TO:<postmaster@example.test>\r\n", ["250 2.0.0"]),
            (b"DATA\r\n", ["354"]),
            (b"Subject: bounce\r\n\r\nbounce body\r\n.\r\n", ["250 2.0.0"]),
            (b"MAIL FROM:<> SIZE=120\r\n", ["250 2.0.0"]),
        ],
    )
