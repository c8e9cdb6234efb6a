"""The README's first command keeps working: the demo runs end to end and every step behaves."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.sshd, pytest.mark.slow]


def test_demo_runs_and_every_step_behaves(fresh_env: None) -> None:
    """`python -m sim.demo` (what `./dev demo` runs) exits 0 with every step as expected."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    done = subprocess.run(
        [sys.executable, "-m", "sim.demo"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Demo finished: every step behaved" in done.stdout
    assert "UNEXPECTED" not in done.stdout
    assert done.stdout.count("--> ok:") >= 16  # one per checked step
