"""Inputs the unit tests share: what a resource config looks like (and what hypothesis makes of
one), and key sets the planner takes at face value."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

from hypothesis import strategies as st

PRIVATE = tuple(
    ipaddress.IPv4Network(c)
    for c in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)
PATH = Path("/opt/ml/config/resource_config.json")


def keyset(tag: str) -> dict[str, str]:
    """A set of `algo base64` lines, distinct per tag (the planner never parses the blobs)."""

    def line(algo: str) -> str:
        return f"{algo} {base64.b64encode(f'{tag}-{algo}'.encode()).decode()}"

    return {
        "rsa": line("ssh-rsa"),
        "ecdsa": line("ecdsa-sha2-nistp256"),
        "ed25519": line("ssh-ed25519"),
    }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
ip_like = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(["10.1.0.1", "10.1.0.1 ", "010.1.0.1", "", "10.1.0", "::ffff:10.1.0.1"]),
    st.text(max_size=16),
)
instance_like = st.fixed_dictionaries(
    {},
    optional={
        "CustomerIpAddress": ip_like | json_values,
        "InstanceId": st.text(max_size=12) | json_values,
        "InstanceName": st.text(max_size=12),
    },
)
config_like = (
    st.fixed_dictionaries(
        {
            "InstanceGroups": st.lists(
                st.fixed_dictionaries(
                    {"Name": st.sampled_from(["login-group", "compute"]) | json_values},
                    optional={
                        "Instances": st.lists(instance_like | json_values, max_size=5) | json_values
                    },
                ),
                max_size=4,
            )
            | json_values
        }
    )
    | json_values
)
