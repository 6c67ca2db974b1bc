"""The short crash-consistency run: SIGKILL under load loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sink import require_smtp_sink

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "crashtest"
KILLS = 20


def test_short_crashtest_loses_nothing():
    require_smtp_sink()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--kills", str(KILLS), "--seed", "7", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(result.stdout)
    assert report["kills"] == KILLS, report
    assert report["acknowledged"] > 0, result.stderr
    # A tenth of the messages wait for the ATRN customer, and the drain
    # collects whatever the kills left, so the customer always gets some.
    assert report["atrn_turnarounds"] > 0, report
    assert report["received_by_atrn_customer"] > 0, report
    assert report["lost"] == 0, report
    assert report["duplicates_unexplained"] == [], report
    assert report["debris"] == [], report
    assert report["bounces"] == 0, report
    assert report["drained"], report
    assert report["final_exit_code"] == 0, report
    assert result.returncode == 0, result.stderr
