"""The systemd unit: valid for systemd, and as hardened as the job allows."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "hpodlb.service"


def _installed_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's hpodlb (verify checks the binary exists)."""
    hpodlb = shutil.which("hpodlb") or str(Path(sys.executable).with_name("hpodlb"))
    unit = tmp_path / "hpodlb.service"
    unit.write_text(UNIT.read_text().replace("/opt/hpodlb/bin/hpodlb", hpodlb))
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a single complaint."""
    done = subprocess.run(["systemd-analyze", "verify", str(_installed_copy(tmp_path))],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert not done.stderr.strip(), done.stderr


def test_unit_exposure_is_below_2_5(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=true` scores the unit below 2.5 (README quotes it)."""
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(_installed_copy(tmp_path))],
        capture_output=True, text=True, check=False,
    )
    match = re.search(r"Overall exposure level for hpodlb.service: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) < 2.5


def test_unit_contract() -> None:
    """Type=notify, a watchdog, reload by SIGHUP, restart on failure, the state dir."""
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID",
                 "Restart=on-failure", "StateDirectory=hpodlb", "ConfigurationDirectory=hpodlb"):
        assert line in text
    assert "\nMemoryDenyWriteExecute" not in text
