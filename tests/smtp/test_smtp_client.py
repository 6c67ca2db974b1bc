"""Tests for trimta.smtp.client.ClientConnection and Transaction, scripted replies."""

from __future__ import annotations

import base64

import pytest

from trimta.smtp.client import (
    MAX_ACCEPTED_REPLY_LINE,
    NEED_DATA,
    ClientConnection,
    ClientState,
    Phase,
    SendBody,
    Transaction,
    TransactionResult,
    parse_extensions,
    timeout_for,
)
from trimta.smtp.errors import LocalProtocolError, RemoteProtocolError
from trimta.smtp.replies import Reply

EHLO_FULL = (
    b"250-mx.example.test greets client.example.org\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 1000000\r\n"
    b"250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n"
    b"250-STARTTLS\r\n"
    b"250-AUTH PLAIN LOGIN\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250 DSN\r\n"
)
EHLO_PLAIN = b"250 mx.example.test greets client.example.org\r\n"


def new_client() -> ClientConnection:
    return ClientConnection(local_hostname="client.example.org")


def read(client: ClientConnection, data: bytes) -> Reply:
    client.receive_data(data)
    reply = client.next_reply()
    assert reply is not NEED_DATA
    return reply


def ready_client(ehlo_reply: bytes = EHLO_FULL) -> ClientConnection:
    """Return a client past the greeting and EHLO, with its output cleared."""
    client = new_client()
    assert read(client, b"220 mx.example.test ESMTP\r\n").code == 220
    client.send_ehlo()
    assert client.data_to_send() == b"EHLO client.example.org\r\n"
    read(client, ehlo_reply)
    return client


# Reply parsing.


def test_single_line_reply_parsed():
    client = new_client()
    reply = read(client, b"220 mx.example.test ESMTP ready\r\n")
    assert reply.code == 220
    assert reply.status is None
    assert reply.lines == ("mx.example.test ESMTP ready",)
    assert client.state is ClientState.READY


def test_enhanced_status_code_split_off():
    client = ready_client()
    client.send_noop()
    reply = read(client, b"250 2.0.0 OK\r\n")
    assert reply.status == "2.0.0"
    assert reply.lines == ("OK",)


def test_multiline_reply_collects_all_lines():
    client = new_client()
    reply = read(client, b"220-first\r\n220-second\r\n220 third\r\n")
    assert reply.code == 220
    assert reply.lines == ("first", "second", "third")


def test_reply_split_byte_by_byte():
    client = new_client()
    data = b"220-mx\r\n220 ready\r\n"
    for index in range(len(data) - 1):
        client.receive_data(data[index : index + 1])
        assert client.next_reply() is NEED_DATA
    reply = read(client, data[-1:])
    assert reply.lines == ("mx", "ready")


def test_mixed_codes_in_multiline_rejected():
    client = new_client()
    client.receive_data(b"220-mx\r\n250 ready\r\n")
    with pytest.raises(RemoteProtocolError, match="mixes codes 220 and 250"):
        client.next_reply()


@pytest.mark.parametrize(
    "line",
    [b"hello\r\n", b"22 short\r\n", b"2200 long\r\n", b"650 bad class\r\n", b"\r\n"],
)
def test_malformed_reply_line_rejected(line):
    client = new_client()
    client.receive_data(line)
    with pytest.raises(RemoteProtocolError, match="invalid reply line"):
        client.next_reply()


def test_reply_code_over_559_rejected():
    client = new_client()
    client.receive_data(b"599 nonsense\r\n")
    with pytest.raises(RemoteProtocolError, match="invalid reply code 599"):
        client.next_reply()


def test_long_reply_line_accepted_up_to_limit():
    client = new_client()
    text = b"x" * (MAX_ACCEPTED_REPLY_LINE - len(b"220 \r\n"))
    reply = read(client, b"220 " + text + b"\r\n")
    assert reply.code == 220


def test_overlong_reply_line_rejected():
    client = new_client()
    client.receive_data(b"220 " + b"x" * MAX_ACCEPTED_REPLY_LINE)
    with pytest.raises(RemoteProtocolError, match="longer than 4096 octets"):
        client.next_reply()


def test_overlong_terminated_reply_line_rejected():
    client = new_client()
    client.receive_data(b"220 " + b"x" * MAX_ACCEPTED_REPLY_LINE + b"\r\n")
    with pytest.raises(RemoteProtocolError, match="longer than"):
        client.next_reply()


def test_endless_multiline_reply_rejected():
    client = new_client()
    client.receive_data(b"220-more\r\n" * 300)
    with pytest.raises(RemoteProtocolError, match="more than 200 lines"):
        client.next_reply()


def test_bare_lf_line_ending_accepted():
    client = new_client()
    reply = read(client, b"220-mx\n220 ready\n")
    assert reply.lines == ("mx", "ready")


def test_unexpected_reply_rejected():
    client = ready_client()
    client.receive_data(b"250 2.0.0 surprise\r\n")
    with pytest.raises(RemoteProtocolError, match="no command is waiting"):
        client.next_reply()


def test_unsolicited_421_closes_session():
    client = ready_client()
    reply = read(client, b"421 4.4.2 idle too long\r\n")
    assert reply.code == 421
    assert client.state is ClientState.CLOSED
    with pytest.raises(LocalProtocolError):
        client.send_noop()


def test_eof_while_waiting_names_command():
    client = ready_client()
    client.send_mail("a@x.test")
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="reply to MAIL"):
        client.next_reply()
    assert client.state is ClientState.CLOSED


def test_receive_after_eof_rejected():
    client = new_client()
    client.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"220 late\r\n")


def test_intermediate_reply_to_mail_rejected():
    client = ready_client()
    client.send_mail("a@x.test")
    client.receive_data(b"354 go ahead\r\n")
    with pytest.raises(RemoteProtocolError, match="invalid reply 354 to MAIL"):
        client.next_reply()


# Greeting.


def test_commands_before_greeting_rejected():
    client = new_client()
    with pytest.raises(LocalProtocolError, match="GREETING"):
        client.send_ehlo()


def test_554_greeting_allows_quit():
    client = new_client()
    assert read(client, b"554 5.7.0 no service\r\n").code == 554
    client.send_quit()
    assert client.data_to_send() == b"QUIT\r\n"
    assert read(client, b"221 2.0.0 bye\r\n").code == 221
    assert client.state is ClientState.CLOSED


def test_421_greeting_closes_session():
    client = new_client()
    assert read(client, b"421 4.3.2 busy\r\n").code == 421
    assert client.state is ClientState.CLOSED


def test_session_without_greeting_starts_ready():
    client = ClientConnection(local_hostname="h.example", expect_greeting=False)
    assert client.state is ClientState.READY
    client.send_ehlo()
    assert client.data_to_send() == b"EHLO h.example\r\n"


@pytest.mark.parametrize("name", ["", "two words", "x\r\nQUIT"])
def test_invalid_local_hostname_rejected(name):
    with pytest.raises(LocalProtocolError, match="local_hostname"):
        ClientConnection(local_hostname=name)


# EHLO.


def test_ehlo_extensions_parsed():
    client = ready_client()
    assert client.extended
    assert client.extensions == {
        "PIPELINING": "",
        "SIZE": "1000000",
        "8BITMIME": "",
        "SMTPUTF8": "",
        "STARTTLS": "",
        "AUTH": "PLAIN LOGIN",
        "ENHANCEDSTATUSCODES": "",
        "DSN": "",
    }
    assert client.max_size == 1_000_000
    assert client.auth_mechanisms == {"PLAIN", "LOGIN"}


def test_ehlo_keywords_case_insensitive():
    client = ready_client(b"250-mx\r\n250-pipelining\r\n250 Size 42\r\n")
    assert client.supports("PIPELINING")
    assert client.supports("pipelining")
    assert client.max_size == 42


def test_old_auth_form_merged():
    reply = Reply(250, None, ("mx", "AUTH LOGIN PLAIN", "AUTH=LOGIN CRAM-MD5"))
    assert parse_extensions(reply)["AUTH"] == "LOGIN PLAIN LOGIN CRAM-MD5"
    client = ready_client(b"250-mx\r\n250 AUTH=login\r\n")
    assert client.auth_mechanisms == {"LOGIN"}


def test_invalid_extension_lines_skipped():
    reply = Reply(250, None, ("mx", "", "-BAD", "X-OK  a   b"))
    assert parse_extensions(reply) == {"X-OK": "a b"}


@pytest.mark.parametrize(
    "line", [b"250-mx\r\n250 SIZE\r\n", b"250-mx\r\n250 SIZE 0\r\n"]
)
def test_size_without_limit_is_none(line):
    client = ready_client(line)
    assert client.supports("SIZE")
    assert client.max_size is None


def test_rejected_ehlo_leaves_no_extensions():
    client = ready_client(b"500 5.5.1 command not recognized\r\n")
    assert not client.extended
    assert client.extensions == {}
    client.send_helo()
    assert client.data_to_send() == b"HELO client.example.org\r\n"
    assert read(client, EHLO_PLAIN).code == 250
    assert client.extensions == {}


def test_second_ehlo_replaces_extensions():
    client = ready_client()
    client.send_ehlo()
    read(client, b"250-mx\r\n250 8BITMIME\r\n")
    assert client.extensions == {"8BITMIME": ""}


# Command bytes.


def test_command_bytes():
    client = ready_client()
    client.send_mail("a@x.test")
    client.send_rcpt("b@x.test")
    client.send_data()
    assert client.data_to_send() == (
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n"
    )
    assert client.pending == (Phase.MAIL, Phase.RCPT, Phase.DATA)


@pytest.mark.parametrize(
    ("send", "wire"),
    [
        (ClientConnection.send_rset, b"RSET\r\n"),
        (ClientConnection.send_noop, b"NOOP\r\n"),
        (ClientConnection.send_quit, b"QUIT\r\n"),
        (ClientConnection.send_starttls, b"STARTTLS\r\n"),
    ],
)
def test_simple_command_bytes(send, wire):
    client = ready_client()
    send(client)
    assert client.data_to_send() == wire


def test_null_sender_sent_as_brackets():
    client = ready_client()
    client.send_mail("")
    assert client.data_to_send() == b"MAIL FROM:<>\r\n"


def test_parameters_formatted_when_supported():
    client = ready_client()
    dropped = client.send_mail(
        "a@x.test",
        {
            "SIZE": "120",
            "BODY": "8BITMIME",
            "SMTPUTF8": None,
            "RET": "HDRS",
            "ENVID": "id+2B1",
        },
    )
    assert dropped == ()
    assert client.data_to_send() == (
        b"MAIL FROM:<a@x.test> SIZE=120 BODY=8BITMIME SMTPUTF8 RET=HDRS"
        b" ENVID=id+2B1\r\n"
    )
    client.send_rcpt("b@x.test", {"NOTIFY": "FAILURE", "ORCPT": "rfc822;b@x.test"})
    assert client.data_to_send() == (
        b"RCPT TO:<b@x.test> NOTIFY=FAILURE ORCPT=rfc822;b@x.test\r\n"
    )


def test_unsupported_parameters_dropped():
    client = ready_client(b"250-mx\r\n250-PIPELINING\r\n250 SIZE 100\r\n")
    dropped = client.send_mail(
        "a@x.test", {"SIZE": "10", "BODY": "8BITMIME", "RET": "FULL", "X-NEW": "1"}
    )
    assert dropped == ("BODY", "RET", "X-NEW")
    assert client.data_to_send() == b"MAIL FROM:<a@x.test> SIZE=10\r\n"
    assert client.send_rcpt("b@x.test", {"NOTIFY": "NEVER"}) == ("NOTIFY",)
    assert client.data_to_send() == b"RCPT TO:<b@x.test>\r\n"


def test_utf8_address_encoded_as_utf8():
    client = ready_client()
    client.send_mail("ü@bücher.test", {"SMTPUTF8": None})
    assert client.data_to_send() == "MAIL FROM:<ü@bücher.test> SMTPUTF8\r\n".encode()


@pytest.mark.parametrize("address", ["a@x.test\r\nRCPT TO:<evil@x>", "a\n@x", "a\0@x"])
def test_line_breaking_address_rejected(address):
    client = ready_client()
    with pytest.raises(LocalProtocolError, match="CR, LF or NUL"):
        client.send_rcpt(address)
    assert client.data_to_send() == b""


@pytest.mark.parametrize(
    "params", [{"SIZE": "1 2"}, {"SIZE": "a=b"}, {"SIZE": ""}, {"SIZE": "1\r\n"}]
)
def test_invalid_parameter_value_rejected(params):
    client = ready_client()
    with pytest.raises(LocalProtocolError, match="invalid value"):
        client.send_mail("a@x.test", params)


@pytest.mark.parametrize("keyword", ["X_BAD", "-X", "", "SIZE=1"])
def test_invalid_parameter_keyword_rejected(keyword):
    client = ready_client()
    with pytest.raises(LocalProtocolError, match="invalid ESMTP parameter keyword"):
        client.send_mail("a@x.test", {keyword: "1"})
    assert client.data_to_send() == b""


# Pipelining rules.


def test_pipelining_without_extension_rejected():
    client = ready_client(b"250-mx\r\n250 8BITMIME\r\n")
    client.send_mail("a@x.test")
    with pytest.raises(LocalProtocolError, match="did not advertise PIPELINING"):
        client.send_rcpt("b@x.test")
    assert client.data_to_send() == b"MAIL FROM:<a@x.test>\r\n"


@pytest.mark.parametrize(
    "first",
    [
        ClientConnection.send_data,
        ClientConnection.send_noop,
        ClientConnection.send_starttls,
    ],
)
def test_group_ending_command_must_be_last(first):
    client = ready_client()
    first(client)
    with pytest.raises(LocalProtocolError, match="must end a pipelined group"):
        client.send_rset()


def test_commands_may_follow_final_dot():
    client = ready_client()
    client.send_data()
    read(client, b"354 go\r\n")
    client.send_message_data(b"x\r\n")
    client.end_message()
    client.send_quit()
    assert client.data_to_send() == b"DATA\r\nx\r\n.\r\nQUIT\r\n"
    assert client.pending == (Phase.DATA_END, Phase.QUIT)


# Message data.


def test_message_data_before_354_rejected():
    client = ready_client()
    client.send_data()
    with pytest.raises(LocalProtocolError, match="send_message_data"):
        client.send_message_data(b"early\r\n")


def test_message_data_after_refused_data_rejected():
    client = ready_client()
    client.send_data()
    assert read(client, b"554 5.5.1 no valid recipients\r\n").code == 554
    with pytest.raises(LocalProtocolError):
        client.send_message_data(b"x\r\n")
    with pytest.raises(LocalProtocolError):
        client.end_message()


def test_message_data_stuffed_and_ended():
    client = ready_client()
    client.send_data()
    client.data_to_send()
    read(client, b"354 go\r\n")
    assert client.state is ClientState.DATA
    client.send_message_data(b".a\r\n")
    client.send_message_data(b".")
    client.end_message()
    assert client.data_to_send() == b"..a\r\n..\r\n.\r\n"
    assert client.state is ClientState.READY
    assert read(client, b"250 2.0.0 queued\r\n").code == 250
    assert client.pending == ()


def test_commands_during_data_rejected():
    client = ready_client()
    client.send_data()
    read(client, b"354 go\r\n")
    with pytest.raises(LocalProtocolError, match="state READY, not DATA"):
        client.send_rset()


# STARTTLS.


def test_starttls_resets_session():
    client = ready_client()
    client.send_starttls()
    client.data_to_send()
    assert read(client, b"220 2.0.0 ready to start TLS\r\n").code == 220
    assert client.state is ClientState.TLS_HANDSHAKE
    with pytest.raises(LocalProtocolError):
        client.send_ehlo()
    client.reset_after_tls()
    assert client.tls_active
    assert client.extensions == {}
    assert not client.extended
    assert client.state is ClientState.READY
    client.send_ehlo()
    assert client.data_to_send() == b"EHLO client.example.org\r\n"
    read(client, b"250-mx\r\n250 AUTH PLAIN\r\n")
    assert client.extensions == {"AUTH": "PLAIN"}


def test_plaintext_after_starttls_220_rejected():
    client = ready_client()
    client.send_starttls()
    # An attacker appends a fake EHLO reply to the 220 in the same packet.
    client.receive_data(b"220 go ahead\r\n250-mx\r\n250 AUTH PLAIN\r\n")
    with pytest.raises(RemoteProtocolError, match="injected replies"):
        client.next_reply()
    assert client.state is ClientState.CLOSED
    assert client.extensions != {"AUTH": "PLAIN"}


def test_input_before_tls_reset_rejected():
    client = ready_client()
    client.send_starttls()
    read(client, b"220 go ahead\r\n")
    with pytest.raises(LocalProtocolError, match="reset_after_tls"):
        client.receive_data(b"250 injected\r\n")
    with pytest.raises(LocalProtocolError, match="reset_after_tls"):
        client.next_reply()


def test_refused_starttls_keeps_plaintext_session():
    client = ready_client()
    client.send_starttls()
    assert read(client, b"454 4.7.0 TLS not available\r\n").code == 454
    assert client.state is ClientState.READY
    assert not client.tls_active
    assert client.supports("PIPELINING")


def test_second_starttls_rejected():
    client = ready_client()
    client.send_starttls()
    read(client, b"220 go\r\n")
    client.reset_after_tls()
    with pytest.raises(LocalProtocolError, match="already active"):
        client.send_starttls()


def test_reset_after_tls_needs_220():
    client = ready_client()
    with pytest.raises(LocalProtocolError, match="TLS_HANDSHAKE"):
        client.reset_after_tls()


# AUTH.


def test_auth_plain_bytes_and_success():
    client = ready_client()
    client.send_auth_plain("user", "pass")
    assert client.data_to_send() == b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n"
    assert read(client, b"235 2.7.0 authenticated\r\n").code == 235
    assert client.authenticated


def test_auth_plain_with_authzid_and_utf8():
    client = ready_client()
    client.send_auth_plain("usér", "pässword", authzid="admin")
    token = client.data_to_send().split()[2]
    assert base64.b64decode(token) == "admin\0usér\0pässword".encode()


def test_auth_login_answers_challenges():
    client = ready_client()
    client.send_auth_login("user", "secret")
    assert client.data_to_send() == b"AUTH LOGIN\r\n"
    assert read(client, b"334 VXNlcm5hbWU6\r\n").code == 334
    assert client.data_to_send() == b"dXNlcg==\r\n"
    assert read(client, b"334 UGFzc3dvcmQ6\r\n").code == 334
    assert client.data_to_send() == b"c2VjcmV0\r\n"
    assert read(client, b"235 2.7.0 ok\r\n").code == 235
    assert client.authenticated
    assert client.pending == ()


def test_auth_extra_challenge_cancelled():
    client = ready_client()
    client.send_auth_plain("user", "pass")
    client.data_to_send()
    assert read(client, b"334 \r\n").code == 334
    assert client.data_to_send() == b"*\r\n"
    assert read(client, b"501 5.7.0 cancelled\r\n").code == 501
    assert not client.authenticated


def test_auth_failure_not_authenticated():
    client = ready_client()
    client.send_auth_login("user", "wrong")
    read(client, b"334 VXNlcm5hbWU6\r\n")
    read(client, b"334 UGFzc3dvcmQ6\r\n")
    assert read(client, b"535 5.7.8 authentication failed\r\n").code == 535
    assert not client.authenticated


def test_auth_plain_nul_error_hides_password():
    client = ready_client()
    with pytest.raises(LocalProtocolError) as caught:
        client.send_auth_plain("user", "hunter2\0")
    assert "hunter2" not in str(caught.value)
    assert client.data_to_send() == b""


def test_auth_must_end_group():
    client = ready_client()
    client.send_auth_login("user", "secret")
    with pytest.raises(LocalProtocolError) as caught:
        client.send_mail("a@x.test")
    assert "secret" not in str(caught.value)


# Timeouts.


@pytest.mark.parametrize(
    ("phase", "seconds"),
    [
        (Phase.GREETING, 300),
        (Phase.MAIL, 300),
        (Phase.RCPT, 300),
        (Phase.DATA, 120),
        (Phase.DATA_BLOCK, 180),
        (Phase.DATA_END, 600),
        (Phase.EHLO, 300),
        (Phase.QUIT, 300),
    ],
)
def test_rfc5321_client_timeouts(phase, seconds):
    assert timeout_for(phase) == seconds


def test_timeout_follows_oldest_pending_reply():
    client = new_client()
    assert client.timeout == 300
    read(client, b"220 mx\r\n")
    client.send_ehlo()
    read(client, EHLO_FULL)
    client.send_data()
    assert client.timeout == 120
    read(client, b"354 go\r\n")
    assert client.timeout == 180
    client.end_message()
    assert client.timeout == 600


# Transaction with scripted replies.


def drive(transaction: Transaction, script: list[bytes]) -> list:
    """Run a transaction, feeding one scripted server write per NEED_DATA."""
    actions = []
    replies = iter(script)
    for _ in range(50):
        action = transaction.next_action()
        actions.append(action)
        if isinstance(action, TransactionResult):
            return actions
        if action is NEED_DATA:
            transaction.client.receive_data(next(replies))
        else:
            transaction.client.send_message_data(b"body\r\n")
            transaction.client.end_message()
    raise AssertionError("transaction did not finish")


def test_354_without_accepted_recipients_sends_only_dot():
    client = ready_client()
    transaction = Transaction(client, "a@x.test", ["b@x.test"])
    assert transaction.next_action() is NEED_DATA
    assert client.data_to_send() == (
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n"
    )
    client.receive_data(b"250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    assert transaction.next_action() is NEED_DATA
    assert client.data_to_send() == b".\r\n"
    client.receive_data(b"554 5.5.1 no recipients\r\n")
    result = transaction.next_action()
    assert isinstance(result, TransactionResult)
    assert [(r.reply.code, r.phase) for r in result.results] == [(550, Phase.RCPT)]


def test_refused_data_resets_transaction():
    client = ready_client()
    transaction = Transaction(client, "a@x.test", ["b@x.test", "c@x.test"])
    actions = drive(
        transaction,
        [b"250 ok\r\n250 ok\r\n550 no\r\n451 4.3.0 try later\r\n", b"250 reset\r\n"],
    )
    result = actions[-1]
    assert not any(isinstance(action, SendBody) for action in actions)
    assert [(r.reply.code, r.phase) for r in result.results] == [
        (451, Phase.DATA),
        (550, Phase.RCPT),
    ]
    assert result.data_reply.code == 451
    assert client.pending == ()


def test_failed_mail_skips_recipients_unpipelined():
    client = ready_client(EHLO_PLAIN)
    transaction = Transaction(client, "a@x.test", ["b@x.test", "c@x.test"])
    assert transaction.next_action() is NEED_DATA
    assert client.data_to_send() == b"MAIL FROM:<a@x.test>\r\n"
    client.receive_data(b"550 5.7.1 sender rejected\r\n")
    result = transaction.next_action()
    assert isinstance(result, TransactionResult)
    assert [(r.reply.code, r.phase) for r in result.results] == [
        (550, Phase.MAIL),
        (550, Phase.MAIL),
    ]
    assert client.data_to_send() == b""
    assert transaction.next_action() is result


def test_failed_mail_consumes_pipelined_replies():
    client = ready_client()
    transaction = Transaction(client, "a@x.test", ["b@x.test"])
    actions = drive(
        transaction, [b"451 4.3.0 later\r\n503 5.5.1 no\r\n503 5.5.1 no\r\n"]
    )
    result = actions[-1]
    assert [(r.reply.code, r.phase) for r in result.results] == [(451, Phase.MAIL)]
    assert result.rcpt_replies[0].code == 503
    assert client.pending == ()
    # No RSET: the server never opened a transaction.
    assert client.data_to_send() == (
        b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n"
    )


def test_next_action_before_end_message_rejected():
    client = ready_client()
    transaction = Transaction(client, "a@x.test", ["b@x.test"])
    transaction.next_action()
    client.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert isinstance(transaction.next_action(), SendBody)
    with pytest.raises(LocalProtocolError, match="end_message"):
        transaction.next_action()


def test_abort_keeps_decided_recipients():
    client = ready_client()
    transaction = Transaction(client, "a@x.test", ["b@x.test", "c@x.test"])
    transaction.next_action()
    client.receive_data(b"250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n354 go\r\n")
    assert isinstance(transaction.next_action(), SendBody)
    client.send_message_data(b"body\r\n")
    client.end_message()
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="DATA_END"):
        transaction.next_action()
    lost = Reply(451, "4.4.2", ("connection lost",))
    result = transaction.abort(lost)
    assert [(r.reply.code, r.phase) for r in result.results] == [
        (550, Phase.RCPT),
        (451, Phase.DATA_END),
    ]
    assert result.results[1].temporary
    assert transaction.next_action() is result


def test_transaction_needs_recipients():
    with pytest.raises(LocalProtocolError, match="at least one recipient"):
        Transaction(ready_client(), "a@x.test", [])
