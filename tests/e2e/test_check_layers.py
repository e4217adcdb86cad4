"""``python -m loadtest.check_layers`` runs: an in-process gateway answers the client's
Checks (every one a cached THROTTLE on the over-limit plans, with authentication on and with
every interceptor left out), and the profile is written. No timed assertion: the figures are
measured, not asserted."""

from __future__ import annotations

import pstats
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("drop", ["", "audit,auth,otel"])
def test_check_layers_answers_every_call_and_profiles(tmp_path: Path, drop: str) -> None:
    profile = tmp_path / "p.pstats"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.check_layers",
            "--scenario",
            "over-limit",
            "--calls",
            "200",
            "--warmup",
            "40",
            "--drop",
            drop,
            "--profile",
            str(profile),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    # the warm-up's first admit took the hour's one SMS: every measured call is refused
    line = re.search(r"over-limit drop=(\S+): 200 calls \(THROTTLE=200\), (\d+) us CPU", run.stdout)
    assert line is not None, run.stdout
    assert line.group(1) == (drop or "-")
    stats = pstats.Stats(str(profile))
    assert any(fn == "Check" and "metering.py" in file for file, _, fn in stats.stats)  # type: ignore[attr-defined]
