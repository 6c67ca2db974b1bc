"""scripts/bench --quick runs to the end and reports figures for every system.

It checks only that the benchmark works, never how fast anything is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench"
TOOLS = ("/usr/sbin/postfix", "/usr/sbin/smtp-source", "/usr/sbin/smtp-sink")

# --quick takes about a minute on a 2-core machine, so this bound only stops
# a hung run.
TIMEOUT = 600

# Figures that --quick measures, and the systems each one covers.
EXPECTED = {
    "accept_small": ("trimta", "postfix", "aiosmtpd"),
    "accept_large": ("trimta", "postfix", "aiosmtpd"),
    "relay_small": ("trimta", "postfix"),
    "latency_accept_p50": ("trimta", "postfix", "aiosmtpd"),
    "latency_accept_p99": ("trimta", "postfix", "aiosmtpd"),
    "latency_relay_p50": ("trimta", "postfix"),
    "latency_relay_p99": ("trimta", "postfix"),
    "release_etrn": ("trimta", "postfix"),
    "release_atrn": ("trimta",),
}

pytestmark = pytest.mark.interop


def require_bench_tools() -> None:
    """Skip unless root with Postfix's tools, or fail if peers are required."""
    missing = [tool for tool in TOOLS if not os.access(tool, os.X_OK)]
    if missing:
        reason = f"{', '.join(missing)} missing; install the Debian package postfix"
    elif os.geteuid() != 0:
        reason = "scripts/bench starts a private Postfix, which needs root"
    else:
        return
    if os.environ.get("TRIMTA_REQUIRE_PEERS"):
        pytest.fail(f"{reason} and TRIMTA_REQUIRE_PEERS is set")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Run scripts/bench --quick once; return the process, its record and parent.

    The parent of the benchmark's temporary folder is made with mkdtemp
    and opened to other users, because the Postfix daemons run as user
    postfix and cannot enter pytest's private folders.
    """
    require_bench_tools()
    output = tmp_path_factory.mktemp("bench") / "quick.json"
    parent = Path(tempfile.mkdtemp(prefix="bench-parent-"))
    parent.chmod(0o755)
    command = [
        sys.executable,
        str(BENCH),
        "--quick",
        "--json",
        str(output),
        "--tmpdir",
        str(parent),
    ]
    try:
        process = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=TIMEOUT
        )
        leftovers = sorted(os.listdir(parent))
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    record = json.loads(output.read_text()) if output.exists() else None
    return process, record, leftovers


def test_bench_quick_exits_zero(quick_run):
    process, _, _ = quick_run
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]


def test_bench_quick_reports_no_failure(quick_run):
    process, record, _ = quick_run
    assert record is not None, process.stderr[-3000:]
    assert record["failures"] == []


@pytest.mark.parametrize("figure", sorted(EXPECTED))
def test_bench_quick_figure_measured(quick_run, figure):
    _, record, _ = quick_run
    assert record is not None
    measured = record["values"].get(figure, {})
    for system in EXPECTED[figure]:
        values = measured.get(system)
        assert values, f"{figure} has no value for {system}"
        assert len(values) == 1, f"{figure} {system}: --quick runs once"
        assert values[0] > 0, f"{figure} {system} = {values[0]}"


def test_bench_quick_prints_table(quick_run):
    process, _, _ = quick_run
    assert "| Figure | trimta | Postfix | aiosmtpd |" in process.stdout
    assert "Durable accept, 5 KiB (msg/s)" in process.stdout


def test_bench_quick_removes_temporary_folder(quick_run):
    _, _, leftovers = quick_run
    assert leftovers == []


def run_bench_arguments(*arguments: str) -> subprocess.CompletedProcess:
    """Run scripts/bench with arguments that make it stop before any server."""
    return subprocess.run(
        [sys.executable, str(BENCH), *arguments],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bench_only_rejects_unknown_figure():
    process = run_bench_arguments("--only", "release,nosuch")
    assert process.returncode == 2
    assert "invalid figure nosuch" in process.stderr
    assert "accept, relay, latency, memory, release" in process.stderr


def test_bench_only_memory_quick_runs_nothing():
    process = run_bench_arguments("--quick", "--only", "memory")
    assert process.returncode == 2
    assert "runs nothing in the quick plan" in process.stderr
