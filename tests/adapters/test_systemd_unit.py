"""The systemd unit: valid for systemd, and as hardened as the job allows."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "hpodlb.service"


def _installed_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's hpodlb (verify checks the binary exists)."""
    hpodlb = shutil.which("hpodlb") or str(Path(sys.executable).with_name("hpodlb"))
    unit = tmp_path / "hpodlb.service"
    unit.write_text(UNIT.read_text().replace("/opt/hpodlb/bin/hpodlb", hpodlb))
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a single complaint."""
    done = subprocess.run(
        ["systemd-analyze", "verify", str(_installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert not done.stderr.strip(), done.stderr


def test_unit_exposure_is_below_2_5(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=true` scores the unit below 2.5 (docs/design.md quotes it)."""
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(_installed_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for hpodlb.service: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) < 2.5


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values (in order; a key may repeat), as systemd reads a unit file."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line and not line.endswith("\\"), line
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_contract() -> None:
    """Type=notify with a watchdog, `hpodlb run` on the packaged config, reload by SIGHUP, restart
    on failure, state and config dirs systemd creates, and no MemoryDenyWriteExecute (cffi)."""
    service = unit_settings(UNIT.read_text())["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert int(service["WatchdogSec"][0]) > 0
    assert [shlex.split(v)[1:] for v in service["ExecStart"]] == [
        ["run", "--config", "/etc/hpodlb/config.toml"]
    ]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Restart"] == ["on-failure"]
    assert service["StateDirectory"] == ["hpodlb"]
    assert service["ConfigurationDirectory"] == ["hpodlb hpodlb/host_keys"]
    assert "MemoryDenyWriteExecute" not in service


def test_unit_lets_the_metrics_endpoint_listen_and_the_textfile_be_written() -> None:
    """[metrics]: nothing in the hardening blocks a listening TCP socket (no IPAddressDeny or
    PrivateNetwork, AF_INET and AF_INET6 allowed, the network syscalls of @system-service), and
    ProtectSystem=strict leaves node_exporter's textfile dir writable, without failing where there
    is none."""
    service = unit_settings(UNIT.read_text())["Service"]
    for blocking in (
        "IPAddressDeny",
        "IPAddressAllow",
        "PrivateNetwork",
        "SocketBindDeny",
        "SocketBindAllow",
        "RestrictNetworkInterfaces",
    ):
        assert blocking not in service, blocking
    families = " ".join(service["RestrictAddressFamilies"]).split()
    assert {"AF_INET", "AF_INET6"} <= set(families)
    assert "@system-service" in service["SystemCallFilter"]  # bind, listen, accept are in it
    denied = " ".join(v[1:] for v in service["SystemCallFilter"] if v.startswith("~")).split()
    assert "@network-io" not in denied
    assert service["ProtectSystem"] == ["strict"]
    assert "-/var/lib/prometheus/node-exporter" in service["ReadWritePaths"]
