"""`./dev sandbox`: an AWS emulator and a config to try `hpodlb plan`, `once`, `status` by hand.

Starts a moto server on loopback holding an internal NLB and its empty target group, copies the
realistic resource config of `tests/fixtures`, writes a config for them (host keys off: there are
no login nodes to probe here; `./dev demo` has those), prints the lines to paste into a shell, and
waits until Ctrl-C. Nothing outside its work dir changes, whatever of the printed commands is typed:
every path of its config on this machine (key store, state dir, SSH key) is inside it
(`sim/workdir.py`).
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from sim.aws import moto_server
from sim.workdir import require_inside

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="hpodlb-sandbox-"))
    work.chmod(0o700)
    for name in ("resource_config.json", "provisioning_parameters.json"):
        shutil.copy(FIXTURES / name, work / name)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with moto_server() as aws:
            arn = aws.create_login_nlb()
            config = write_config(work, arn)
            exports = " ".join(
                f"{k}={v}" for k, v in {**aws.env(), "HPODLB_CONFIG": str(config)}.items()
            )
            print(
                f"AWS emulator at {aws.endpoint_url}, target group {arn.split('/')[1]}, work dir {work}"
            )
            print("In another shell, from this clone:")
            print(f"  export {exports}")
            print(
                "  .venv/bin/hpodlb check-config; .venv/bin/hpodlb plan; .venv/bin/hpodlb once; "
                ".venv/bin/hpodlb status"
            )
            print(f"  (edit {work / 'resource_config.json'} and run plan/once again)")
            print("Ctrl-C here stops the emulator and removes the work dir.", flush=True)
            stop.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def write_config(work: Path, arn: str) -> Path:
    """The sandbox's config, every path on this machine inside `work` (refused otherwise)."""
    config = work / "config.toml"
    config.write_text(
        f"""[cluster]
resource_config = {json.dumps(str(work / "resource_config.json"))}
provisioning_parameters = {json.dumps(str(work / "provisioning_parameters.json"))}
leader = "always"   # one simulated head node, whatever Slurm this machine has

[[target_groups]]
arn = {json.dumps(arn)}

[reconcile]
interval_seconds = 5

[ssh]
key_file = {json.dumps(str(work / "ssh" / "id_ed25519"))}   # no login nodes here to log in to

[host_keys]
enabled = false   # no login nodes to probe here: ./dev demo has real ones
store = {json.dumps(str(work / "host_keys"))}   # `hpodlb keys generate` here writes this one

[state]
dir = {json.dumps(str(work / "state"))}
"""
    )
    config.chmod(0o600)
    require_inside(config, work)
    return config


if __name__ == "__main__":
    sys.exit(main())
