"""trimta's SMTP client and server engines talking to each other in memory."""

from __future__ import annotations

import pytest

from trimta.smtp import replies
from trimta.smtp.client import (
    NEED_DATA,
    ClientConnection,
    ClientState,
    Phase,
    SendBody,
    Transaction,
    TransactionResult,
)
from trimta.smtp.events import (
    ConnectionClosed,
    EndOfMessage,
    MailFrom,
    MessageData,
    RcptTo,
)
from trimta.smtp.replies import Reply
from trimta.smtp.server import ServerConnection, ServerSettings

MAX_STEPS = 1000
QUEUED = replies.queued("Q1")


def recipient_policy(event: RcptTo) -> Reply:
    """Accept every recipient except the local parts "unknown" and "defer"."""
    local = event.recipient.local
    if local == "unknown":
        return replies.user_unknown(str(event.recipient))
    if local == "defer":
        return Reply(451, "4.2.0", ("mailbox busy, try later",))
    return replies.recipient_ok()


class Pump:
    """A ClientConnection wired to a ServerConnection through byte buffers.

    ``pipelining=False`` strips PIPELINING from the EHLO reply, and
    ``reject_ehlo=True`` replies 502 to EHLO without passing it on, to
    simulate older servers. ``batches`` records each write of the client.
    """

    def __init__(
        self,
        *,
        pipelining: bool = True,
        reject_ehlo: bool = False,
        final_reply: Reply = QUEUED,
        **settings,
    ) -> None:
        self.server = ServerConnection(ServerSettings("mx.example.test", **settings))
        self.client = ClientConnection(local_hostname="client.example.org")
        self.pipelining = pipelining
        self.reject_ehlo = reject_ehlo
        self.final_reply = final_reply
        self.batches: list[bytes] = []
        self.events: list = []
        self.messages: list[bytes] = []
        self._content = bytearray()
        self.server.send_greeting()
        self.client.receive_data(self.server.data_to_send())

    def exchange(self) -> None:
        """Move the client's bytes to the server and the replies back."""
        out = self.client.data_to_send()
        if not out:
            raise AssertionError("client asked for data but sent nothing")
        self.batches.append(out)
        if self.reject_ehlo and out.startswith(b"EHLO "):
            self.client.receive_data(b"502 5.5.1 EHLO is not implemented\r\n")
            return
        self.server.receive_data(out)
        self._run_server()
        answer = self.server.data_to_send()
        if not self.pipelining:
            answer = answer.replace(b"250-PIPELINING\r\n", b"")
        self.client.receive_data(answer)

    def _run_server(self) -> None:
        for _ in range(MAX_STEPS):
            event = self.server.next_event()
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return
            self.events.append(event)
            if isinstance(event, MessageData):
                self._content += event.data
            if self.server.awaiting_reply:
                self.server.send_reply(self._policy(event))
        raise AssertionError("server did not run out of events")

    def _policy(self, event) -> Reply:
        if isinstance(event, RcptTo):
            return recipient_policy(event)
        if isinstance(event, EndOfMessage):
            self.messages.append(bytes(self._content))
            self._content.clear()
            return self.final_reply
        return replies.sender_ok()

    def wait_reply(self) -> Reply:
        """Exchange bytes until the client has a complete reply."""
        for _ in range(MAX_STEPS):
            reply = self.client.next_reply()
            if reply is not NEED_DATA:
                return reply
            self.exchange()
        raise AssertionError("no reply arrived")

    def open_session(self) -> None:
        """Read the greeting and greet with EHLO, falling back to HELO on 5xx."""
        assert self.wait_reply().code == 220
        self.client.send_ehlo()
        if self.wait_reply().code // 100 == 5:
            self.client.send_helo()
            assert self.wait_reply().code == 250

    def run(self, transaction: Transaction, chunks: list[bytes]) -> TransactionResult:
        """Drive a transaction the way a delivery driver would."""
        for _ in range(MAX_STEPS):
            action = transaction.next_action()
            if action is NEED_DATA:
                self.exchange()
            elif isinstance(action, SendBody):
                for chunk in chunks:
                    self.client.send_message_data(chunk)
                self.client.end_message()
            else:
                return action
        raise AssertionError("transaction did not finish")

    def command_lines(self) -> list[bytes]:
        """Return the first line of each client write."""
        return [batch.split(b"\r\n", 1)[0] for batch in self.batches]


BODY = b"Subject: test\r\n\r\nHello.\r\n"


def codes(result: TransactionResult) -> list[tuple[str, int, Phase]]:
    return [(r.address, r.reply.code, r.phase) for r in result.results]


@pytest.mark.parametrize("pipelining", [True, False])
def test_full_transaction_delivers_message(pipelining):
    pump = Pump(pipelining=pipelining)
    pump.open_session()
    assert pump.client.supports("PIPELINING") is pipelining
    transaction = Transaction(
        pump.client, "a@example.org", ["b@example.test", "c@example.test"]
    )
    result = pump.run(transaction, [BODY])
    assert codes(result) == [
        ("b@example.test", 250, Phase.DATA_END),
        ("c@example.test", 250, Phase.DATA_END),
    ]
    assert all(r.delivered for r in result.results)
    assert result.final_reply == QUEUED
    assert pump.messages == [BODY]
    assert pump.server.state.name == "COMMAND"


def test_pipelined_commands_sent_in_one_batch():
    pump = Pump()
    pump.open_session()
    transaction = Transaction(pump.client, "a@example.org", ["b@x.test", "c@x.test"])
    pump.run(transaction, [BODY])
    group = pump.batches[1]
    assert group == (
        b"MAIL FROM:<a@example.org>\r\n"
        b"RCPT TO:<b@x.test>\r\n"
        b"RCPT TO:<c@x.test>\r\n"
        b"DATA\r\n"
    )
    assert pump.batches[2] == BODY + b".\r\n"


def test_unpipelined_commands_sent_one_by_one():
    pump = Pump(pipelining=False)
    pump.open_session()
    transaction = Transaction(pump.client, "a@example.org", ["b@x.test", "c@x.test"])
    pump.run(transaction, [BODY])
    for batch in pump.batches[:-1]:
        assert batch.count(b"\r\n") == 1, batch
    assert pump.command_lines() == [
        b"EHLO client.example.org",
        b"MAIL FROM:<a@example.org>",
        b"RCPT TO:<b@x.test>",
        b"RCPT TO:<c@x.test>",
        b"DATA",
        b"Subject: test",
    ]


@pytest.mark.parametrize("pipelining", [True, False])
def test_partial_recipient_failure_results(pipelining):
    pump = Pump(pipelining=pipelining)
    pump.open_session()
    recipients = ["ok@x.test", "unknown@x.test", "defer@x.test"]
    result = pump.run(Transaction(pump.client, "a@x.test", recipients), [BODY])
    ok, unknown, defer = result.results
    assert (ok.reply.code, ok.phase, ok.delivered) == (250, Phase.DATA_END, True)
    assert (unknown.reply.code, unknown.phase) == (550, Phase.RCPT)
    assert unknown.permanent
    assert (defer.reply.code, defer.phase) == (451, Phase.RCPT)
    assert defer.temporary
    assert [str(e.recipient) for e in pump.events if isinstance(e, RcptTo)] == [
        "ok@x.test",
        "unknown@x.test",
        "defer@x.test",
    ]
    assert pump.server.recipients == ()  # the transaction ended with the message
    assert pump.messages == [BODY]


@pytest.mark.parametrize("pipelining", [True, False])
def test_all_recipients_failing_sends_no_data(pipelining):
    pump = Pump(pipelining=pipelining)
    pump.open_session()
    recipients = ["unknown@x.test", "defer@x.test"]
    result = pump.run(Transaction(pump.client, "a@x.test", recipients), [BODY])
    assert codes(result) == [
        ("unknown@x.test", 550, Phase.RCPT),
        ("defer@x.test", 451, Phase.RCPT),
    ]
    assert pump.messages == []
    assert not any(BODY in batch for batch in pump.batches)
    if pipelining:
        assert result.data_reply is not None
        assert result.data_reply.code == 554
    else:
        assert result.data_reply is None
        assert b"DATA" not in b"".join(pump.batches)
    # RSET closed the server's transaction, so a new one works.
    assert b"RSET\r\n" in pump.batches
    assert not pump.server.in_transaction
    again = pump.run(Transaction(pump.client, "a@x.test", ["b@x.test"]), [BODY])
    assert again.results[0].delivered


@pytest.mark.parametrize("pipelining", [True, False])
def test_reply_552_after_dot_applies_to_accepted(pipelining):
    pump = Pump(pipelining=pipelining, final_reply=replies.too_big(100))
    pump.open_session()
    recipients = ["b@x.test", "unknown@x.test", "c@x.test"]
    result = pump.run(Transaction(pump.client, "a@x.test", recipients), [BODY])
    assert codes(result) == [
        ("b@x.test", 552, Phase.DATA_END),
        ("unknown@x.test", 550, Phase.RCPT),
        ("c@x.test", 552, Phase.DATA_END),
    ]
    assert all(r.permanent for r in result.results)
    assert result.delivered == ()


def test_helo_fallback_when_ehlo_rejected():
    pump = Pump(reject_ehlo=True)
    pump.open_session()
    assert pump.client.extensions == {}
    assert not pump.client.extended
    params = {"SIZE": "100", "BODY": "8BITMIME"}
    transaction = Transaction(pump.client, "a@x.test", ["b@x.test"], params)
    result = pump.run(transaction, [BODY])
    assert result.results[0].delivered
    assert not transaction.pipelined
    mail = next(e for e in pump.events if isinstance(e, MailFrom))
    assert mail.params == {}
    assert pump.command_lines()[:3] == [
        b"EHLO client.example.org",
        b"HELO client.example.org",
        b"MAIL FROM:<a@x.test>",
    ]


def test_parameters_reach_server_when_advertised():
    pump = Pump()
    pump.open_session()
    params = {"SIZE": str(len(BODY)), "BODY": "8BITMIME", "RET": "HDRS"}
    recipients = [("b@x.test", {"NOTIFY": "FAILURE,DELAY"})]
    transaction = Transaction(pump.client, "", recipients, params)
    result = pump.run(transaction, [BODY])
    assert result.results[0].delivered
    mail = next(e for e in pump.events if isinstance(e, MailFrom))
    assert mail.sender is None
    assert mail.params == {"SIZE": str(len(BODY)), "BODY": "8BITMIME", "RET": "HDRS"}
    rcpt = next(e for e in pump.events if isinstance(e, RcptTo))
    assert rcpt.params == {"NOTIFY": "FAILURE,DELAY"}


def test_size_over_limit_rejected_at_mail():
    pump = Pump(max_message_size=10)
    pump.open_session()
    assert pump.client.max_size == 10
    transaction = Transaction(pump.client, "a@x.test", ["b@x.test"], {"SIZE": "50"})
    result = pump.run(transaction, [BODY])
    assert codes(result) == [("b@x.test", 552, Phase.MAIL)]
    assert pump.messages == []
    assert not pump.server.in_transaction


STUFFING_BODY = (
    b".\r\n"
    b"..\r\n"
    b"...\r\n"
    b".leading dot\r\n"
    b"middle . dot\r\n"
    b"\r\n"
    b". \r\n"
    b"end.\r\n"
)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_dot_stuffing_round_trip_through_server(size):
    pump = Pump()
    pump.open_session()
    chunks = [STUFFING_BODY[i : i + size] for i in range(0, len(STUFFING_BODY), size)]
    result = pump.run(Transaction(pump.client, "a@x.test", ["b@x.test"]), chunks)
    assert result.results[0].delivered
    assert pump.messages == [STUFFING_BODY]
    content = b"".join(e.data for e in pump.events if isinstance(e, MessageData))
    assert content == STUFFING_BODY


def test_body_without_final_crlf_gets_one():
    pump = Pump()
    pump.open_session()
    result = pump.run(
        Transaction(pump.client, "a@x.test", ["b@x.test"]), [b"no newline", b"."]
    )
    assert result.results[0].delivered
    assert pump.messages == [b"no newline.\r\n"]


def test_empty_body_delivered():
    pump = Pump()
    pump.open_session()
    result = pump.run(Transaction(pump.client, "a@x.test", ["b@x.test"]), [])
    assert result.results[0].delivered
    assert pump.messages == [b""]


def test_two_transactions_then_quit():
    pump = Pump()
    pump.open_session()
    for sender in ("a@x.test", "c@x.test"):
        result = pump.run(Transaction(pump.client, sender, ["b@x.test"]), [BODY])
        assert result.results[0].delivered
    pump.client.send_quit()
    assert pump.wait_reply().code == 221
    assert pump.client.state is ClientState.CLOSED
    assert pump.messages == [BODY, BODY]


def test_server_421_mid_transaction_closes_session():
    pump = Pump(max_errors=1)
    pump.open_session()
    # The server replies 501 to the invalid second address, then closes
    # with 421 4.7.0 because max_errors is 1. That 421 is the reply to the
    # third RCPT.
    recipients = ["b@x.test", "not an address", "c@x.test"]
    result = pump.run(Transaction(pump.client, "a@x.test", recipients), [BODY])
    assert codes(result) == [
        ("b@x.test", 421, Phase.DATA),
        ("not an address", 501, Phase.RCPT),
        ("c@x.test", 421, Phase.RCPT),
    ]
    assert result.results[0].temporary
    assert result.results[1].permanent
    assert result.results[2].temporary
    assert pump.client.state is ClientState.CLOSED
    assert pump.messages == []
