"""Catching a command that writes where it should not: it runs in a mount namespace of its own in
which the machine's system directories are overlays, so whatever it writes there lands in a
scratch dir that the test reads afterwards. The machine's real /etc is never touched, even by a
build that would write to it (a test that fails on such a build must not damage the machine).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

# Where a head node's own files live (the config defaults: /etc/hpodlb, /var/lib/hpodlb,
# /home/ubuntu/.ssh, /opt/ml/config). HOME is the caller's to point at a temp dir.
WATCHED = ("/etc", "/var", "/opt", "/home", "/srv", "/usr")


class Confined:
    """Commands run through `command(...)`, each with fresh overlays over WATCHED; `written()`
    lists every path they created or changed there."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.watched = [d for d in WATCHED if Path(d).is_dir() and not Path(d).is_symlink()]
        self.runs = 0

    def command(self, *argv: str) -> list[str]:
        """`argv` in its own mount namespace (one upper dir per command: overlayfs refuses an
        upper dir that another mount uses)."""
        self.runs += 1
        mounts = []
        for d in self.watched:
            upper, work = self._upper(self.runs, d), self.scratch / f"{self.runs}-work{d}"
            upper.mkdir(parents=True)
            work.mkdir(parents=True)
            mounts.append(
                f"mount -t overlay hpodlb-watch -o lowerdir={d},upperdir={upper},workdir={work} {d}"
            )
        script = " && ".join([*mounts, 'exec "$@"'])
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "w", *argv]

    def written(self) -> list[str]:
        """The paths (as the machine names them) written under WATCHED by any command so far."""
        found = set()
        for run in range(1, self.runs + 1):
            for d in self.watched:
                upper = self._upper(run, d)
                found |= {f"{d}/{p.relative_to(upper)}" for p in upper.rglob("*")}
        return sorted(found)

    def _upper(self, run: int, d: str) -> Path:
        return self.scratch / f"{run}-upper{d}"


def overlays_work(scratch: Path) -> bool:
    """Whether this machine lets a mount namespace put an overlay on /etc (root, overlayfs)."""
    confined = Confined(scratch)
    confined.watched = ["/etc"]
    done = subprocess.run(confined.command("true"), capture_output=True, check=False)
    return done.returncode == 0
