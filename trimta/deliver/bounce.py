"""Delivery status notifications (DSNs, RFC 3464) for failed or delayed mail.

A DSN is a multipart/report message (RFC 6522) with three parts: a text
for people, the machine-readable message/delivery-status fields, and the
headers of the original message as text/rfc822-headers. The caller queues
the returned bytes with the null reverse-path (MAIL FROM:<>) to the
original sender, so a DSN can never cause another DSN.

Text from remote servers (reply lines, host names) ends up in header
fields here. Every such value is cleaned: control characters (CR and LF
included) become spaces, non-ASCII becomes "?", and long values are
shortened and folded, so no line of the DSN exceeds 998 octets
(RFC 5322 2.1.1).
"""

from __future__ import annotations

import quopri
import re
import secrets
from collections.abc import Iterable
from datetime import datetime, timezone
from email.utils import format_datetime
from pathlib import Path

import attrs

from trimta.spool.envelope import Envelope

ACTIONS = ("failed", "delayed")

# Longest cleaned value put into one field. With the field name and the
# folding this keeps every line far below 998 octets.
_MAX_VALUE = 900
_FOLD_WIDTH = 78
_MAX_LINE = 998
_READ_BLOCK = 8192
_SMTP_REPLY = re.compile(r"[245]\d\d[ -]")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_XTEXT_ESCAPE = re.compile(r"\+([0-9A-F]{2})")
_HUMAN_INTROS = {
    "failed": "It could not be delivered to these recipients, and the server\n"
    "has given up:",
    "delayed": "It has not been delivered to these recipients yet. The server\n"
    "keeps trying, so you need not send it again:",
}


@attrs.frozen
class FailedRecipient:
    """One recipient to report in a DSN.

    Attributes:
        address: the final recipient, as in RCPT TO without brackets.
        status: the RFC 3463 enhanced status code, e.g. "5.1.1".
        diagnostic: the remote reply or local error text, e.g.
            "550 5.1.1 no such user", or None.
        remote_mta: the host name of the next hop that sent the reply, or None.
        action: "failed" (given up) or "delayed" (still being retried).
        orcpt: the RFC 3461 ORCPT parameter as received, e.g.
            "rfc822;a+2Bb@example.org", or None.
        will_retry_until: for "delayed", when trimta gives up, or None.
    """

    address: str
    status: str
    diagnostic: str | None
    remote_mta: str | None
    action: str = attrs.field(default="failed", validator=attrs.validators.in_(ACTIONS))
    orcpt: str | None = None
    will_retry_until: datetime | None = None


def should_bounce(envelope: Envelope) -> bool:
    """Return whether a failure of this message may be reported to its sender.

    RFC 5321 4.5.5 and 6.1: mail with the null reverse-path (a DSN or
    another notification) never gets a DSN, so that two servers cannot
    bounce mail back and forth forever.
    """
    return envelope.sender != ""


def recipients_to_notify(
    envelope: Envelope, failed: Iterable[FailedRecipient]
) -> list[FailedRecipient]:
    """Keep the recipients whose RFC 3461 NOTIFY parameter requests this DSN.

    A recipient without NOTIFY gets failure and delay DSNs, which RFC 3461
    4.1 allows as the default. NOTIFY=NEVER suppresses both. Otherwise a
    "failed" entry needs FAILURE and a "delayed" entry needs DELAY in the
    list. A recipient not found in the envelope is treated as having no
    NOTIFY. The envelope sender is not checked; see `should_bounce`.
    """
    notify_by_address = {r.address: r.notify for r in envelope.recipients}
    kept = []
    for recipient in failed:
        notify = notify_by_address.get(recipient.address)
        if _notify_allows(notify, recipient.action):
            kept.append(recipient)
    return kept


def _notify_allows(notify: list[str] | None, action: str) -> bool:
    if notify is None:
        return True
    words = {word.upper() for word in notify}
    if "NEVER" in words:
        return False
    needed = "FAILURE" if action == "failed" else "DELAY"
    return needed in words


def read_original_headers(body_path: Path, limit: int = 64 * 1024) -> bytes:
    """Read the header section of a stored message, for the DSN's third part.

    The file is read in blocks until the empty line that ends the header
    section, or until `limit` octets. The result ends after the last
    complete header line and does not include the empty line. This
    function does blocking file I/O; call it through ``trio.to_thread``.

    Raises:
        OSError: the body file cannot be read.
    """
    content = b""
    at_end = False
    with open(body_path, "rb") as body:
        while len(content) < limit and not at_end:
            block = body.read(min(_READ_BLOCK, limit - len(content)))
            at_end = not block
            content += block
            end = _header_end(content)
            if end is not None:
                return content[:end]

    # No empty line: a message without a body is all headers, and a header
    # section cut at `limit` keeps only its complete lines.
    if at_end:
        return content
    last_break = max(content.rfind(b"\n"), content.rfind(b"\r"))
    return content[: last_break + 1]


def _header_end(content: bytes) -> int | None:
    # The header section ends at the first empty line; a message that starts
    # with an empty line has no headers at all.
    if content.startswith((b"\r\n", b"\n")):
        return 0
    match = re.search(rb"\r?\n\r?\n", content)
    if match is None:
        return None
    return match.start() + (2 if content[match.start()] == 13 else 1)


def build_bounce(
    *,
    envelope: Envelope,
    failed: list[FailedRecipient],
    reporting_mta: str,
    original_headers: bytes,
    postmaster: str,
    now: datetime | None = None,
    message_id_domain: str,
) -> bytes:
    """Build a complete DSN message for the sender of `envelope`.

    Args:
        envelope: the envelope of the failed message; its sender receives
            the DSN, and its id, arrival time and ENVID are reported.
        failed: the recipients to report, at least one; entries whose
            action is "delayed" make a delay notice if none has failed.
        reporting_mta: this server's host name (Reporting-MTA).
        original_headers: the header section of the failed message, for
            example from `read_original_headers`; empty leaves out part 3.
        postmaster: the address the DSN comes from.
        now: the time of the report; the current time when None.
        message_id_domain: the domain part of the new Message-ID.

    Returns:
        The message with CRLF line endings, headers and body.

    Raises:
        ValueError: `failed` is empty.
    """
    if not failed:
        raise ValueError("build_bounce needs at least one recipient to report")
    now = _aware(now or datetime.now(timezone.utc))
    headers_part = _normalise_lines(original_headers)

    parts = [
        _human_part(envelope, failed, reporting_mta),
        _status_part(envelope, failed, reporting_mta, now),
    ]
    if headers_part:
        parts.append(_headers_part(headers_part))
    boundary = _pick_boundary(parts)

    head = _top_headers(envelope, failed, postmaster, now, message_id_domain)
    head += _field_lines(
        "Content-Type",
        f'multipart/report; report-type=delivery-status; boundary="{boundary}"',
    )
    return _join_multipart(head, parts, boundary)


def _top_headers(
    envelope: Envelope,
    failed: list[FailedRecipient],
    postmaster: str,
    now: datetime,
    message_id_domain: str,
) -> list[bytes]:
    any_failed = any(r.action == "failed" for r in failed)
    subject = "Undelivered Mail Returned to Sender" if any_failed else "Delayed Mail"
    message_id = f"<{envelope.id}.{secrets.token_hex(8)}@{_clean(message_id_domain)}>"
    lines = []
    lines += _field_lines("From", f"Mail Delivery System <{_clean(postmaster)}>")
    # RFC 6532 allows a UTF-8 address here, and a non-ASCII sender can only
    # be reached over SMTPUTF8 anyway.
    lines += _field_lines("To", f"<{_clean(envelope.sender, keep_utf8=True)}>")
    lines += _field_lines("Subject", subject)
    lines += _field_lines("Date", format_datetime(now))
    lines += _field_lines("Message-ID", message_id)
    # RFC 3834 5: marks the message as automatic, so responders stay quiet.
    lines += _field_lines("Auto-Submitted", "auto-replied")
    lines += _field_lines("MIME-Version", "1.0")
    return lines


def _human_part(
    envelope: Envelope, failed: list[FailedRecipient], reporting_mta: str
) -> bytes:
    host = _clean(reporting_mta)
    lines = [f"This is the mail server {host}, reporting on your message"]
    lines.append(f"(queue id {envelope.id}).")
    lines.append("")
    for action, intro in _HUMAN_INTROS.items():
        entries = [r for r in failed if r.action == action]
        if entries:
            lines += [intro, ""]
            for recipient in entries:
                lines += _human_entry(recipient)
    lines.append("The delivery report and the headers of your message are attached.")

    text = "\n".join(lines) + "\n"
    body = text.encode("utf-8")
    if text.isascii():
        header = _part_header("text/plain; charset=us-ascii", "7bit")
    else:
        header = _part_header("text/plain; charset=utf-8", "quoted-printable")
        body = quopri.encodestring(body)
    return header + _LINE_BREAK.sub(b"\r\n", body)


def _human_entry(recipient: FailedRecipient) -> list[str]:
    entry = [f"  <{_clean(recipient.address, keep_utf8=True)}>"]
    reason = f"status {_clean(recipient.status)}"
    if recipient.remote_mta:
        reason += f", from {_clean(recipient.remote_mta)}"
    entry.append(f"    {reason}")
    if recipient.diagnostic:
        entry.append(f"    {_clean(recipient.diagnostic)}")
    entry.append("")
    return entry


def _status_part(
    envelope: Envelope, failed: list[FailedRecipient], reporting_mta: str, now: datetime
) -> bytes:
    # RFC 3464 2.1: the per-message fields, then the fields of each
    # recipient, with one empty line between two blocks.
    arrival = datetime.fromtimestamp(envelope.arrival, timezone.utc)
    block = []
    block += _field_lines("Reporting-MTA", f"dns; {_clean(reporting_mta)}")
    envid = envelope.params.get("ENVID")
    if envid:
        block += _field_lines("Original-Envelope-Id", _clean(_decode_xtext(envid)))
    if envelope.client.helo:
        block += _field_lines(
            "Received-From-MTA", f"dns; {_clean(envelope.client.helo)}"
        )
    block += _field_lines("Arrival-Date", format_datetime(arrival))

    blocks = [block]
    blocks += [_recipient_fields(recipient, now) for recipient in failed]
    body = b"\r\n".join(b"".join(lines) for lines in blocks)
    return _part_header("message/delivery-status", "7bit") + body


def _recipient_fields(recipient: FailedRecipient, now: datetime) -> list[bytes]:
    lines = []
    if recipient.orcpt:
        lines += _field_lines(
            "Original-Recipient", _original_recipient(recipient.orcpt)
        )
    lines += _field_lines("Final-Recipient", _typed_address(recipient.address))
    lines += _field_lines("Action", recipient.action)
    lines += _field_lines("Status", _clean(recipient.status))
    if recipient.remote_mta:
        lines += _field_lines("Remote-MTA", f"dns; {_clean(recipient.remote_mta)}")
    if recipient.diagnostic:
        lines += _field_lines("Diagnostic-Code", _diagnostic_code(recipient.diagnostic))
    lines += _field_lines("Last-Attempt-Date", format_datetime(now))
    if recipient.will_retry_until is not None:
        until = format_datetime(_aware(recipient.will_retry_until))
        lines += _field_lines("Will-Retry-Until", until)
    return lines


def _diagnostic_code(text: str) -> str:
    # RFC 3464 2.3.6: "smtp" marks an SMTP reply; anything else is a local
    # error, which gets a private "x-" type.
    cleaned = _clean(text)
    if _SMTP_REPLY.match(cleaned + " "):
        return f"smtp; {cleaned}"
    return f"x-trimta; {cleaned}"


def _typed_address(address: str) -> str:
    # RFC 6533 3: a non-ASCII address uses the "utf-8" type, written in its
    # xtext form because message/delivery-status is ASCII only.
    if address.isascii():
        return f"rfc822; {_clean(address)}"
    return f"utf-8; {_utf8_addr_xtext(address)}"


def _utf8_addr_xtext(address: str) -> str:
    # RFC 6533 3: printable ASCII except "+", "=" and "\" stays; every other
    # character becomes \x{HEX} with its code point in upper-case hex.
    out = []
    for char in address:
        if "!" <= char <= "~" and char not in "+=\\":
            out.append(char)
        else:
            out.append(f"\\x{{{ord(char):02X}}}")
    return _clean("".join(out))


def _original_recipient(orcpt: str) -> str:
    # The ORCPT parameter is "addr-type;xtext" (RFC 3461 4.2). For the
    # rfc822 type the "+XX" escapes are undone so the field shows the
    # address itself; other types are reported as received.
    addr_type, _, value = orcpt.partition(";")
    if addr_type.strip().lower() == "rfc822":
        decoded = _decode_xtext(value)
        if decoded.isascii() and decoded.isprintable():
            value = decoded
    return _clean(f"{addr_type.strip()}; {value.strip()}")


def _decode_xtext(text: str) -> str:
    return _XTEXT_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def _headers_part(original_headers: bytes) -> bytes:
    content_type = "text/rfc822-headers"
    # NOTE: 8-bit headers (SMTPUTF8 mail) go out as 8bit; RFC 6533 would
    # use message/global-headers for them, which is not built here.
    encoding = "7bit" if original_headers.isascii() else "8bit"
    return _part_header(content_type, encoding) + original_headers


def _normalise_lines(content: bytes) -> bytes:
    # CRLF everywhere, and each line cut to the 998-octet limit.
    lines = _LINE_BREAK.split(content)
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line[:_MAX_LINE] + b"\r\n" for line in lines)


def _part_header(content_type: str, encoding: str) -> bytes:
    lines = _field_lines("Content-Type", content_type)
    lines += _field_lines("Content-Transfer-Encoding", encoding)
    return b"".join(lines) + b"\r\n"


def _pick_boundary(parts: list[bytes]) -> str:
    # "=_" never occurs in quoted-printable text, and the random part makes
    # a collision with the original headers unlikely; check anyway.
    for _attempt in range(10):
        boundary = f"=_trimta_{secrets.token_hex(12)}"
        if not any(boundary.encode() in part for part in parts):
            return boundary
    raise RuntimeError("no MIME boundary absent from the DSN parts in 10 tries")


def _join_multipart(head: list[bytes], parts: list[bytes], boundary: str) -> bytes:
    delimiter = b"--" + boundary.encode()
    out = b"".join(head) + b"\r\n"
    out += b"This is a MIME-encapsulated delivery status notification.\r\n"
    for part in parts:
        out += b"\r\n" + delimiter + b"\r\n" + part
    return out + b"\r\n" + delimiter + b"--\r\n"


def _field_lines(name: str, value: str) -> list[bytes]:
    """Fold one header field at spaces into lines of about 78 characters."""
    lines: list[str] = []
    current = f"{name}:"
    for word in value.split(" "):
        if not word:
            continue
        if len(current) + 1 + len(word) > _FOLD_WIDTH and current.strip() != f"{name}:":
            lines.append(current)
            current = ""
        current += f" {word}"
    lines.append(current)
    return [line.encode("utf-8") + b"\r\n" for line in lines]


def _clean(text: str, *, keep_utf8: bool = False) -> str:
    """Make text from outside safe as a header value or a line of text.

    Control characters, CR and LF included, become spaces so no new field
    or line can be injected. Non-ASCII becomes "?" unless `keep_utf8`.
    The result is at most 900 octets long in UTF-8.
    """
    chars = []
    for char in text:
        if not char.isprintable() or char in "\r\n\t":
            chars.append(" ")
        elif not char.isascii() and not keep_utf8:
            chars.append("?")
        else:
            chars.append(char)
    cleaned = " ".join("".join(chars).split())
    encoded = cleaned.encode("utf-8")
    if len(encoded) > _MAX_VALUE:
        # Cut by octets; a UTF-8 sequence cut in half is dropped.
        cleaned = encoded[: _MAX_VALUE - 3].decode("utf-8", errors="ignore") + "..."
    return cleaned


def _aware(moment: datetime) -> datetime:
    # A naive datetime is taken as UTC.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment
