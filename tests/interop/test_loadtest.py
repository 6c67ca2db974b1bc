"""The short load run: delivering sessions, slow clients and a crowd.

It checks what trimta promises under load, never how fast it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "loadtest"


@pytest.fixture(scope="module")
def report():
    """Run `scripts/loadtest --quick --json` once and return its JSON report."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--seed", "7", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout, result.stderr
    report = json.loads(result.stdout)
    report["returncode"] = result.returncode
    return report


def test_load_acknowledged_messages_in_spool(report):
    spool = report["spool"]
    assert spool["acknowledged"] > 0, spool
    assert spool["listed"] is not None, "trimta queue list --json failed"
    assert spool["missing"] == 0, spool["missing_ids"]


def test_load_delivering_sessions_served(report):
    delivering = report["delivering"]
    assert delivering["completed"] == delivering["sessions"], delivering["errors"]
    acknowledged = delivering["messages_acknowledged"]
    assert acknowledged == delivering["messages_expected"], delivering


@pytest.mark.parametrize("kind", ["command", "data"])
def test_load_slow_clients_closed_421(report, kind):
    slow = report["slow"][kind]
    assert slow["clients"] > 0, slow
    assert slow["setup_failed"] == 0, slow["setup_errors"]
    assert slow["not_closed"] == 0, slow
    assert slow["closed"] == slow["clients"], slow
    for reply in slow["replies"]:
        assert reply.startswith("421 4.4.2 "), slow["replies"]


def test_load_slow_clients_closed_after_timeout(report):
    timeout = report["settings"]["timeout_s"]
    for kind in ("command", "data"):
        closed_after = report["slow"][kind]["closed_after_s"]
        # The client starts its clock when it reads trimta's last reply, a
        # little after trimta starts the deadline, so allow 1 s for that.
        assert closed_after["min"] >= timeout - 1.0, (kind, closed_after)


def test_load_extra_sessions_rejected(report):
    crowd = report["per_address"]
    extras = crowd["sessions"] - crowd["limit"]
    assert crowd["rejected"] == extras, crowd["greetings"]
    rejection = f"421 4.3.2 too many sessions from {crowd['address']}"
    assert crowd["greetings"].get(rejection) == extras, crowd["greetings"]


def test_load_sessions_within_limit_served(report):
    crowd = report["per_address"]
    assert crowd["served"] == crowd["limit"], crowd["greetings"]
    assert crowd["served_acknowledged"] == crowd["limit"], crowd["errors"]


@pytest.mark.parametrize("phase", ["quiet", "load"])
def test_load_probes_served(report, phase):
    probes = report["probes"][phase]
    assert probes["served"] > 0, probes
    # The script skips a probe instead of sending it when 90 are in flight.
    sent = probes["probes"] - probes["skipped"]
    assert probes["served"] == sent, probes["errors"]


def test_load_memory_sampled(report):
    memory = report["memory"]
    assert memory["samples"] > 0, memory
    assert memory["peak_hwm_mib"] is not None, memory


def test_load_trimta_stops_cleanly(report):
    trimta = report["trimta"]
    assert trimta["alive_at_end"], trimta
    assert trimta["exit_code"] == 0, trimta
    assert trimta["log"]["error_lines"] == 0, trimta["log"]["first_errors"]


def test_load_script_exits_zero(report):
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert failed == [], failed
    assert report["returncode"] == 0, report["checks"]
