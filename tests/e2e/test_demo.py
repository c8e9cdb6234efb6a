"""The README's first command keeps working: the demo runs end to end and every step behaves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.confine import Confined, overlays_work

pytestmark = [pytest.mark.sshd, pytest.mark.slow]


def test_demo_runs_and_every_step_behaves(fresh_env: None, tmp_path: Path) -> None:
    """`python -m sim.demo` (what `./dev demo` runs) exits 0 with every step as expected, and
    writes nothing under the machine's /etc, /var, /opt, /home, /srv or /usr (its work dir is in
    /tmp; watched through overlays where the machine allows them, see tests/support/confine.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    confined = Confined(tmp_path / "watch") if overlays_work(tmp_path / "probe") else None
    argv = [sys.executable, "-m", "sim.demo"]
    done = subprocess.run(
        confined.command(*argv) if confined else argv,
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
    assert confined is None or confined.written() == []
