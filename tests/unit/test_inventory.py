"""Reading the desired set: fixtures, every kind of broken file, and hostile input."""

from __future__ import annotations

import contextlib
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpodlb.inventory import (
    InventoryError,
    LoginNode,
    login_group_names,
    parse_login_nodes,
    read_login_nodes,
)
from tests.support.data import FIXTURES
from tests.support.inputs import PATH, PRIVATE, config_like


def doc(*instances: dict[str, Any], group: str = "login-group") -> bytes:
    return json.dumps({"InstanceGroups": [{"Name": group, "Instances": list(instances)}]}).encode()


def inst(ip: Any = "10.1.0.1", iid: Any = "i-1", name: Any = "login-1") -> dict[str, Any]:
    return {"CustomerIpAddress": ip, "InstanceId": iid, "InstanceName": name}


def test_fixture_login_nodes() -> None:
    """The realistic fixture yields its three login nodes, in the file's order, and nothing from
    other groups (the first one listed is the one an empty key store adopts)."""
    nodes = read_login_nodes(FIXTURES / "resource_config.json", ["login-group"], PRIVATE)
    assert nodes == (
        LoginNode("10.1.71.12", "i-0a1b2c3d4e5f60011", "login-group-1", "login-group"),
        LoginNode("10.1.72.45", "i-0a1b2c3d4e5f60012", "login-group-2", "login-group"),
        LoginNode("10.1.70.201", "i-0a1b2c3d4e5f60013", "login-group-3", "login-group"),
    )


def test_login_group_from_provisioning_parameters(tmp_path: Path) -> None:
    """Empty login_groups: the fixture's provisioning parameters name the group."""
    groups, source = login_group_names([], FIXTURES / "provisioning_parameters.json")
    assert groups == ("login-group",)
    assert "login_group" in source
    assert login_group_names(["a", "b"], tmp_path / "x.json")[0] == ("a", "b")
    assert login_group_names([], tmp_path / "missing.json")[0] == ("login-group",)
    (tmp_path / "pp.json").write_text('{"login_group": "my-logins"}')
    assert login_group_names([], tmp_path / "pp.json")[0] == ("my-logins",)
    (tmp_path / "bad.json").write_text('{"login_group": 7}')
    with pytest.raises(InventoryError, match="login_group"):
        login_group_names([], tmp_path / "bad.json")


def test_several_login_groups_and_name_only_instances() -> None:
    """Nodes of several groups are merged; an instance with only a name uses it as its id."""
    raw = json.dumps(
        {
            "InstanceGroups": [
                {"Name": "a", "Instances": [inst("10.1.0.1", "i-1")]},
                {
                    "Name": "b",
                    "Instances": [{"CustomerIpAddress": "10.1.0.2", "InstanceName": "b-1"}],
                },
            ]
        }
    ).encode()
    nodes = parse_login_nodes(raw, PATH, ["a", "b"], PRIVATE)
    assert [(n.ip, n.instance_id, n.group) for n in nodes] == [
        ("10.1.0.1", "i-1", "a"),
        ("10.1.0.2", "b-1", "b"),
    ]


def test_empty_login_group_is_valid() -> None:
    """A login group with no instances is a real answer (the guards decide what that may cause)."""
    assert parse_login_nodes(doc(), PATH, ["login-group"], PRIVATE) == ()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "file is empty"),
        (b"   \n", "file is empty"),
        (b'{"InstanceGroups": [{"Name": "login-group", "Inst', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"Groups": []}', "InstanceGroups: expected a list"),
        (b'{"InstanceGroups": [{"Name": 3}]}', r"InstanceGroups\[0\].Name"),
        (b'{"InstanceGroups": [{"Name": "other", "Instances": []}]}', "no group named login-group"),
        (
            b'{"InstanceGroups": [{"Name": "login-group"}]}',
            r"InstanceGroups\[0\].Instances: expected a list",
        ),
        (doc("x"), r"Instances\[0\]: expected an object"),  # type: ignore[arg-type]  # the wrong type is the point
        (doc({"InstanceId": "i-1"}), r"Instances\[0\].CustomerIpAddress: expected a string"),
        (doc(inst(ip=10)), "CustomerIpAddress: expected a string"),
        (doc(inst(ip="10.1.0.256")), "is not an IP address"),
        (doc(inst(ip="fd00::1")), "is IPv6"),
        (doc(inst(ip="8.8.8.8")), "outside cluster.allowed_cidrs"),
        (doc(inst(ip="127.0.0.1")), "outside cluster.allowed_cidrs"),
        (doc(inst(ip="169.254.169.254")), "outside cluster.allowed_cidrs"),
        (doc(inst(ip="224.0.0.1")), "outside cluster.allowed_cidrs"),
        (doc(inst(iid=None, name=None)), "needs an InstanceId or an InstanceName"),
        (doc(inst(iid="")), "InstanceId: expected a non-empty string"),
        (
            doc(inst(), inst(iid="i-2")),
            r"10.1.0.1 is listed twice \(also InstanceGroups\[0\].Instances\[0\]\)",
        ),
        # A second, empty entry of the login group must not read as "every login node left".
        (
            json.dumps(
                {
                    "InstanceGroups": [
                        {"Name": "login-group", "Instances": [inst()]},
                        {"Name": "login-group", "Instances": []},
                    ]
                }
            ).encode(),
            r"InstanceGroups\[1\].Name: group 'login-group' is listed twice \(also InstanceGroups\[0\]\)",
        ),
        # Nor may a repeated key, of which json would silently keep the last one.
        (
            b'{"InstanceGroups": [{"Name": "login-group", "Instances": []}], "InstanceGroups": []}',
            "key 'InstanceGroups' appears twice in one object",
        ),
        (
            b'{"InstanceGroups": [{"Name": "login-group", "Instances": [], "Instances": []}]}',
            "key 'Instances' appears twice",
        ),
    ],
)
def test_malformed_resource_configs_are_refused(raw: bytes, message: str) -> None:
    """Every broken shape is an InventoryError naming the file and the field."""
    with pytest.raises(InventoryError, match=message) as err:
        parse_login_nodes(raw, PATH, ["login-group"], PRIVATE)
    assert str(err.value).startswith(str(PATH))


def test_missing_and_truncated_files(tmp_path: Path) -> None:
    """A missing file and a file cut in half are both refused (never read as 'no login nodes')."""
    with pytest.raises(InventoryError, match="file not found"):
        read_login_nodes(tmp_path / "nope.json", ["login-group"], PRIVATE)
    whole = (FIXTURES / "resource_config.json").read_bytes()
    half = tmp_path / "half.json"
    half.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InventoryError, match="not valid JSON"):
        read_login_nodes(half, ["login-group"], PRIVATE)


def test_unreadable_file(tmp_path: Path) -> None:
    """A directory where the file should be is reported, not crashed on."""
    (tmp_path / "rc.json").mkdir()
    with pytest.raises(InventoryError, match="cannot read"):
        read_login_nodes(tmp_path / "rc.json", ["login-group"], PRIVATE)


@pytest.mark.parametrize("which", ["resource config", "provisioning parameters"])
def test_a_sticky_directory_given_as_a_file_is_named_a_directory(
    tmp_path: Path, which: str
) -> None:
    """A sticky world-writable directory (/tmp) where a file should be is "a directory", the one
    thing wrong with it, not "writable by group or others": the fix the message points to is the
    path, not the mode."""
    sticky = tmp_path / "sticky"
    sticky.mkdir(mode=0o1777)
    sticky.chmod(0o1777)
    expected = f"{sticky}: cannot read: not a regular file (a directory)"
    with pytest.raises(InventoryError) as err:
        if which == "resource config":
            read_login_nodes(sticky, ["login-group"], PRIVATE)
        else:
            login_group_names((), sticky, lambda: None)
    assert str(err.value) == expected


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(config_like)
def test_no_input_crashes_the_reader(data: Any) -> None:
    """Whatever the JSON says, the reader returns valid private IPv4 nodes or an InventoryError."""
    raw = json.dumps(data).encode()
    try:
        nodes = parse_login_nodes(raw, PATH, ["login-group"], PRIVATE)
    except InventoryError:
        return
    ips = [n.ip for n in nodes]
    assert len(ips) == len(set(ips))
    for n in nodes:
        assert any(ipaddress.IPv4Address(n.ip) in net for net in PRIVATE)
        assert n.instance_id


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_no_bytes_crash_the_reader(raw: bytes) -> None:
    """Arbitrary bytes (a file caught mid-write) give an InventoryError, never another exception."""
    with contextlib.suppress(InventoryError):
        parse_login_nodes(raw, PATH, ["login-group"], PRIVATE)


def test_a_50_mb_resource_config_is_read(tmp_path: Path) -> None:
    """Resource configs of 50 MB exist on large clusters: the size bound on reads lets them through."""
    compute = [
        inst(f"10.2.{i // 250}.{i % 250}", f"i-{i:017x}", f"compute-{i}") | {"Pad": "x" * 300}
        for i in range(120_000)
    ]
    data = {
        "InstanceGroups": [
            {"Name": "compute", "Instances": compute},
            {"Name": "login-group", "Instances": [inst()]},
        ]
    }
    rc = tmp_path / "resource_config.json"
    rc.write_text(json.dumps(data))
    assert rc.stat().st_size > 50_000_000
    assert [n.ip for n in read_login_nodes(rc, ["login-group"], PRIVATE)] == ["10.1.0.1"]
