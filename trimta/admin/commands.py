"""`trimta queue`: see and steer the spool of a daemon.

`list` and `show` read the spool directly. Envelope files are only ever
replaced by rename, so a read sees either the old or the new version,
never a torn one; a part that disappears while listing is skipped.
`flush`, `hold`, `release` and `delete` go through the daemon's control
socket, so they never race with delivery; they exit 1 when no daemon
answers.

With `--json` every command prints one JSON object with `"version": 1`.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import attrs

from trimta.admin.control import NoDaemonError, send_request
from trimta.config.model import Config
from trimta.smtp.address import normalize_domain
from trimta.spool import names
from trimta.spool.envelope import Envelope, EnvelopeError, parse_envelope

JSON_VERSION = 1
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


@attrs.frozen
class PartInfo:
    """One queued part as `trimta queue list` shows it."""

    envelope: Envelope
    state: str

    def as_json(self) -> dict:
        envelope = self.envelope
        return {
            "id": envelope.id,
            "domain": envelope.domain,
            "arrival": _iso(envelope.arrival),
            "size": envelope.size,
            "sender": envelope.sender,
            "recipients": [
                {"address": r.address, "state": r.state, "last_error": r.last_error}
                for r in envelope.recipients
            ],
            "state": self.state,
            "attempts": envelope.attempts,
            "next_attempt": _iso(envelope.next_attempt) if self.state == "deferred" else None,
            "last_error": _part_error(envelope),
        }


def read_parts(config: Config, domain: str | None = None) -> list[PartInfo]:
    """Read every queued part of the spool, or of one domain."""
    root = config.spool / "domains"
    held = set(config.domains.hold)
    domains = [domain] if domain else sorted(_domain_dirs(root))
    parts = []
    for name in domains:
        folder = root / names.dirname_for_domain(name)
        for path in sorted(folder.glob("*.env")) if folder.is_dir() else ():
            envelope = _read_envelope(path)
            if envelope is not None:
                parts.append(PartInfo(envelope, _state(envelope, held)))
    return parts


def _domain_dirs(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return [p.name for p in root.iterdir() if names.is_domain_dirname(p.name)]


def _read_envelope(path: Path) -> Envelope | None:
    try:
        return parse_envelope(path.read_bytes())
    except FileNotFoundError:
        return None  # delivered or removed while we listed
    except (OSError, EnvelopeError, ValueError) as exc:
        print(f"trimta: skipped unreadable envelope {path}: {exc}", file=sys.stderr)
        return None


def _state(envelope: Envelope, held_domains: set[str]) -> str:
    if envelope.held or envelope.domain in held_domains:
        return "held"
    if envelope.attempts > 0:
        return "deferred"
    return "queued"


def _part_error(envelope: Envelope) -> str | None:
    errors = [r.last_error for r in envelope.recipients if r.state == "pending" and r.last_error]
    return envelope.last_error or (errors[0] if errors else None)


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_list(config: Config, domain: str | None, summary: bool, as_json: bool) -> int:
    """Print the queued parts, or a count and size per domain."""
    parts = read_parts(config, checked_domain(domain))
    if summary:
        return _print_summary(parts, as_json)
    if as_json:
        _print_json({"messages": [part.as_json() for part in parts]})
        return EXIT_OK
    for part in parts:
        _print_part_line(part)
    print(f"{len(parts)} parts, {sum(p.envelope.size for p in parts)} bytes")
    return EXIT_OK


def _print_part_line(part: PartInfo) -> None:
    envelope = part.envelope
    recipients = ",".join(r.address for r in envelope.recipients if r.state == "pending")
    line = (
        f"{envelope.id} {envelope.domain} {_iso(envelope.arrival)} {envelope.size} "
        f"<{envelope.sender}> {part.state} rcpts={recipients or '-'}"
    )
    if part.state == "deferred":
        line += f" next={_iso(envelope.next_attempt)}"
    error = _part_error(envelope)
    if error:
        line += f" error={error}"
    print(line)


def _print_summary(parts: list[PartInfo], as_json: bool) -> int:
    totals: dict[str, list[int]] = {}
    for part in parts:
        count_bytes = totals.setdefault(part.envelope.domain, [0, 0])
        count_bytes[0] += 1
        count_bytes[1] += part.envelope.size
    rows = [{"domain": d, "count": c, "bytes": b} for d, (c, b) in sorted(totals.items())]
    if as_json:
        _print_json({"domains": rows})
        return EXIT_OK
    for row in rows:
        print(f"{row['domain']} {row['count']} parts {row['bytes']} bytes")
    return EXIT_OK


def run_show(config: Config, mid: str, body: bool, as_json: bool) -> int:
    """Print one message's envelopes and headers, and its body on request."""
    mid = names.check_mid(mid)
    parts = [part for part in read_parts(config) if part.envelope.id == mid]
    if not parts:
        print(f"trimta: no queued message has the id {mid}", file=sys.stderr)
        return EXIT_FAILURE
    first = parts[0].envelope
    path = config.spool / "domains" / names.dirname_for_domain(first.domain) / f"{mid}.eml"
    try:
        content = path.read_bytes()
    except OSError as exc:
        print(f"trimta: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    headers = content.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    text = (content if body else headers).decode("utf-8", "replace")
    if as_json:
        _print_json({"parts": [p.as_json() for p in parts], "message": text})
        return EXIT_OK
    for part in parts:
        _print_part_line(part)
    print()
    sys.stdout.write(text.replace("\r\n", "\n"))
    return EXIT_OK


def run_control(config: Config, request: dict, as_json: bool) -> int:
    """Send a queue change to the running daemon and print its response."""
    try:
        answer = send_request(config.spool, request)
    except NoDaemonError as exc:
        print(f"trimta: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, ValueError) as exc:
        print(f"trimta: control request failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if as_json:
        _print_json({"command": request["command"], **answer})
    elif answer.get("ok"):
        print(f"{request['command']}: {answer.get('parts', 0)} parts")
    if not answer.get("ok"):
        if not as_json:
            print(f"trimta: {request['command']} failed: {answer.get('error')}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def checked_domain(domain: str | None) -> str | None:
    return None if domain is None else normalize_domain(domain)


def _print_json(data: dict) -> None:
    print(json.dumps({"version": JSON_VERSION, "generated": _iso(time.time()), **data}, indent=1))
