"""The simulated login nodes hold up against what the host machine does meanwhile."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sim.nodes import SIM_USER, SimCluster, sim_cluster

pytestmark = pytest.mark.sshd


@pytest.fixture
def cluster() -> Iterator[SimCluster]:
    base = Path(tempfile.mkdtemp(prefix="hpodlb-sim-"))
    with sim_cluster(base) as c:
        yield c


def as_login_user(cluster: SimCluster, ip: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "ssh",
            "-i",
            str(cluster.client_key),
            "-p",
            str(cluster.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
            f"{SIM_USER}@{ip}",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def replace_like_useradd(path: Path) -> None:
    """What `useradd` does to /etc/passwd: a new file renamed over the old one (here with the same
    content, owner and mode, so nothing on the machine changes but the file's inode)."""
    fresh = path.with_name(f".{path.name}.hpodlb-test-{os.getpid()}")
    lock = os.open("/etc/.pwd.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # the lock useradd and vipw take: no update is lost
        old_umask = os.umask(0o077)  # the copy of /etc/shadow is never readable by others
        try:
            shutil.copy2(path, fresh)
        finally:
            os.umask(old_umask)
        st = path.stat()
        os.chown(fresh, st.st_uid, st.st_gid)
        fresh.replace(path)
    finally:
        fresh.unlink(missing_ok=True)
        os.close(lock)


def test_login_user_survives_the_host_replacing_its_user_database(cluster: SimCluster) -> None:
    """A `useradd` on the machine (a new /etc/passwd, /etc/group, /etc/shadow renamed into place)
    while nodes run leaves their login user able to log in and use sudo."""
    ip = cluster.ip(2)
    cluster.add_node(ip, "i-0lab0000000000001")
    before = as_login_user(cluster, ip, "sudo -n id -un")
    assert before.stdout.strip() == "root", before.stderr
    for name in ("passwd", "group", "shadow"):
        replace_like_useradd(Path("/etc") / name)
    after = as_login_user(cluster, ip, "sudo -n id -un")
    assert after.returncode == 0, after.stderr
    assert after.stdout.strip() == "root"
