"""`./dev sandbox` touches nothing outside its work dir (issue 23, item 12), and neither does any
command it suggests: `hpodlb keys generate` typed in its shell wrote the machine's real key store.

The sandbox and each command run as processes in mount namespaces whose /etc, /var, /opt, /home,
/srv and /usr are overlays (`tests/support/confine.py`): a write there is seen by the test and
never reaches the machine. Where overlays cannot be mounted, they run as they are, and the head
node's own paths (/etc/hpodlb, /var/lib/hpodlb) are compared before and after.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.support.confine import Confined, overlays_work

REPO = Path(__file__).resolve().parents[2]
HEAD_NODE_PATHS = (Path("/etc/hpodlb"), Path("/var/lib/hpodlb"))


def snapshot() -> dict[str, tuple[int, int, int]]:
    """What the head node's own paths hold now (whether or not the overlays catch writes)."""
    found = {}
    for top in HEAD_NODE_PATHS:
        for p in [top, *top.rglob("*")] if top.exists() else []:
            st = p.lstat()
            found[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def test_the_sandbox_and_what_it_suggests_touch_nothing_outside_its_work_dir(
    tmp_path: Path, fresh_env: None
) -> None:
    """The sandbox, then check-config, keys generate, plan, once and status with its exports and
    an empty HOME: the key store it generates is in the work dir, nothing is written under /etc,
    /var, /opt, /home, /srv or /usr, nothing in HOME, and Ctrl-C removes the work dir."""
    confined = Confined(tmp_path / "watch") if overlays_work(tmp_path / "probe") else None

    def watched(*argv: str) -> list[str]:
        return confined.command(*argv) if confined else list(argv)

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HPODLB_"))}
    env["HOME"] = str(home)
    before = snapshot()
    sandbox = subprocess.Popen(
        watched(sys.executable, "-m", "sim.sandbox"),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(sandbox.stdout or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any(line.startswith("Ctrl-C here") for line in list(lines)):
            assert time.monotonic() < deadline and sandbox.poll() is None, "".join(lines)
            time.sleep(0.1)
        work = Path(lines[0].rsplit(" work dir ", 1)[1].strip())
        (exports,) = [line.split()[1:] for line in lines if line.startswith("  export ")]
        shell = {**env, **dict(word.split("=", 1) for word in exports)}
        ran = {}
        for command in ("check-config", "keys generate", "plan", "once", "status"):
            done = subprocess.run(
                watched(sys.executable, "-m", "hpodlb", *command.split()),
                cwd=REPO,
                env=shell,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            ran[command] = (done.returncode, done.stdout + done.stderr)
        stored = sorted(p.name for p in (work / "host_keys" / "current").glob("ssh_host_*"))
    finally:
        sandbox.send_signal(signal.SIGINT)
        sandbox.wait(timeout=60)
    assert sandbox.returncode == 0, "".join(lines)
    assert confined is None or confined.written() == [], ran
    assert ran["keys generate"][0] == 0, ran
    assert len(stored) == 6, (stored, ran)  # a private and a public key per type, in the work dir
    assert list(home.iterdir()) == []
    assert snapshot() == before
    assert not work.exists()
