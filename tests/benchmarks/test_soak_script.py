"""benchmarks/soak.py, a small version: clients that leave at random points cost nothing and break nothing."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def test_a_small_soak_has_no_errors_no_incomplete_answers_no_wasted_steps_and_no_growth():
    done = subprocess.run([sys.executable, str(SCRIPT), "--requests", "48", "--clients", "8", "--seed", "1"],
                          capture_output=True, text=True, timeout=600)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    figures = dict(part.split("=") for part in lines[-1].split())
    assert list(figures) == ["requests", "server_errors", "incomplete", "wasted_steps", "rss_growth_mib"]
    assert figures["requests"] == "48" and figures["server_errors"] == figures["incomplete"] == figures["wasted_steps"] == "0"
    assert float(figures["rss_growth_mib"]) < 16
    details = dict(part.split("=") for part in lines[-2].split())
    assert int(details["departed"]) > 0 and details["differ_from_solo"] == details["live_requests"] == "0"
