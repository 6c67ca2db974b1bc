"""Phases and results of the sans-IO SMTP client engine.

``Phase`` names what the client waits for, which sets the RFC 5321
4.5.3.2 timeout. ``SendBody`` and ``TransactionResult`` are what
``Transaction.next_action`` returns to its driver, and ``RcptResult``
carries the reply that decides one recipient's fate.
"""

from __future__ import annotations

import enum

import attrs

from trimta.smtp.replies import Reply


class Phase(enum.Enum):
    """Command whose reply the client waits for, or the data it sends."""

    GREETING = "GREETING"  # the 220 when the connection opens
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"  # the 354 to the DATA command
    DATA_BLOCK = "DATA_BLOCK"  # sending message data after the 354
    DATA_END = "DATA_END"  # the reply after the final dot
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"


@attrs.frozen
class RcptResult:
    """Result for one recipient of a transaction.

    ``address`` is the recipient as passed to the transaction. ``reply``
    is the reply that decides its fate, and ``phase`` the command that got
    it: MAIL or RCPT when the server rejected those, DATA when it rejected
    the DATA command, DATA_END for the reply after the final dot.
    A 421 closing the session mid-transaction applies to every recipient
    still open, with the phase of the command it answered.
    """

    address: str
    reply: Reply
    phase: Phase

    @property
    def delivered(self) -> bool:
        """Whether the server took responsibility for this recipient."""
        return self.phase is Phase.DATA_END and self.reply.code // 100 == 2

    @property
    def permanent(self) -> bool:
        """Whether the failure is permanent (5xx): bounce, do not retry."""
        return self.reply.code // 100 == 5

    @property
    def temporary(self) -> bool:
        """Whether the recipient should be retried later (not delivered, not 5xx)."""
        return not self.delivered and not self.permanent


@attrs.frozen
class SendBody:
    """The server replied 354: send the message data, then end it.

    The driver calls ``ClientConnection.send_message_data`` for each chunk
    and then ``end_message``, sends the bytes and asks for the next action.
    """


@attrs.frozen
class TransactionResult:
    """Outcome of one mail transaction, with every reply received.

    ``results`` has one RcptResult per recipient, in the order given.
    ``mail_reply`` is the reply to MAIL, and ``rcpt_replies`` contains the
    replies to the RCPT commands that got one, in order. ``data_reply`` is
    the reply to DATA and ``final_reply`` the reply after the final dot.
    Each is None, or shorter, when the transaction stopped earlier.
    """

    results: tuple[RcptResult, ...]
    mail_reply: Reply | None
    rcpt_replies: tuple[Reply, ...]
    data_reply: Reply | None
    final_reply: Reply | None

    @property
    def delivered(self) -> tuple[RcptResult, ...]:
        """Results of the recipients the server accepted the message for."""
        return tuple(result for result in self.results if result.delivered)
