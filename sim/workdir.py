"""What `./dev sandbox` and `./dev demo` may touch on this machine: their work dir, nothing else.

The config defaults are a head node's real paths (`/etc/hpodlb/host_keys`, `/var/lib/hpodlb`,
`/home/ubuntu/.ssh/id_rsa`): a sandbox config that leaves one at its default makes a command typed
in the sandbox's shell (`hpodlb keys generate`) write the machine's real key store. So each of
their configs names every path on this machine inside the work dir, and is refused before anything
starts if it does not.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from hpodlb.config import Config, load_config

ON_THE_NODES = frozenset({"host_keys.remote_dir"})  # a path on the login nodes, not on this machine


def paths_outside(config: Config, work: Path) -> list[str]:
    """`section.key = PATH` for each path of `config` on this machine that is not under `work`
    (every path-valued key, so a key added later is judged too)."""
    found = []
    for section, table in config:
        if not isinstance(table, BaseModel):
            continue  # [[target_groups]]: ARNs and ports
        for key, value in table:
            name = f"{section}.{key}"
            here = isinstance(value, Path) and name not in ON_THE_NODES
            if here and not value.is_relative_to(work):
                found.append(f"{name} = {value}")
    return found


def require_inside(config_path: Path, work: Path) -> None:
    """Refuse (SystemExit, one line) a config naming a path on this machine outside `work`."""
    outside = paths_outside(load_config(config_path, {}), work)
    if outside:
        raise SystemExit(f"{config_path}: outside the work dir {work}: {'; '.join(outside)}")
