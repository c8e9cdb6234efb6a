"""The real `hpodlb` command as a process, as an admin types it: what the e2e tests run."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def run_hpodlb(
    *args: str,
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`hpodlb ARGS [--config CONFIG]` with this interpreter; `env` replaces the environment
    when given (the caller starts from os.environ if it wants it); never raises on exit status."""
    command = [sys.executable, "-m", "hpodlb", *args]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=dict(env) if env is not None else None,
    )
