"""Queue a DSN bounce (RFC 3464) for the recipients that failed for good."""

from __future__ import annotations

import logging

import attrs
import trio

from trimta.deliver.bounce import (
    FailedRecipient,
    build_bounce,
    read_original_headers,
    recipients_to_notify,
    should_bounce,
)
from trimta.deliver.outcome import RecipientOutcome
from trimta.smtp.address import AddressError, parse_mailbox
from trimta.spool.envelope import Envelope
from trimta.spool.store import Spool, SpoolError

logger = logging.getLogger("trimta.deliver")


@attrs.frozen
class Bouncer:
    """Builds DSNs and queues them in the spool with the null sender.

    Attributes:
        spool: Where the DSN is queued; it is delivered like any message.
        hostname: trimta's host name, the DSN's Reporting-MTA.
        postmaster: Address shown in the DSN's From: header.
    """

    spool: Spool
    hostname: str
    postmaster: str

    async def __call__(self, envelope: Envelope, failed: list[RecipientOutcome]) -> None:
        """Queue one DSN listing `failed`, unless the rules forbid one.

        A message from the null sender is never bounced (RFC 5321 6.1),
        and recipients that asked for NOTIFY=NEVER, or for notices without
        FAILURE, are left out (RFC 3461 4.1). Errors are logged, not
        raised: a bounce that cannot be queued is dropped.
        """
        if not should_bounce(envelope):
            logger.info(
                "bounce dropped mid=%s domain=%s reason=null sender rcpts=%d",
                envelope.id, envelope.domain, len(failed),
            )
            return
        recipients = recipients_to_notify(envelope, _failed_recipients(envelope, failed))
        if not recipients:
            logger.info("bounce not requested mid=%s domain=%s", envelope.id, envelope.domain)
            return
        try:
            dsn_id = await self._queue(envelope, recipients)
        except (SpoolError, AddressError, ValueError, OSError) as exc:
            logger.error("bounce failed mid=%s to=<%s> error=%s", envelope.id, envelope.sender, exc)
            return
        logger.info(
            "bounced mid=%s domain=%s dsn=%s to=<%s> rcpts=%d",
            envelope.id, envelope.domain, dsn_id, envelope.sender, len(recipients),
        )

    async def _queue(self, envelope: Envelope, recipients: list[FailedRecipient]) -> str:
        sender = parse_mailbox(envelope.sender, utf8=True)
        body_path = self.spool.body_path(envelope.part)
        headers = await trio.to_thread.run_sync(read_original_headers, body_path)
        dsn = build_bounce(
            envelope=envelope,
            failed=recipients,
            reporting_mta=self.hostname,
            original_headers=headers,
            postmaster=self.postmaster,
            message_id_domain=self.hostname,
        )
        params: dict[str, str | None] = {} if envelope.sender.isascii() else {"SMTPUTF8": None}
        writer = self.spool.new_message()
        try:
            await writer.write(dsn)
            await writer.commit(
                sender="", recipients={sender.domain: [str(sender)]}, params=params
            )
        finally:
            await writer.abort()
        return writer.mid


def _failed_recipients(
    envelope: Envelope, failed: list[RecipientOutcome]
) -> list[FailedRecipient]:
    orcpts = {recipient.address: recipient.orcpt for recipient in envelope.recipients}
    return [
        FailedRecipient(
            address=outcome.address,
            status=outcome.status,
            diagnostic=outcome.text,
            remote_mta=outcome.remote,
            orcpt=orcpts.get(outcome.address),
        )
        for outcome in failed
    ]
