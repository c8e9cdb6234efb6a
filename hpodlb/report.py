"""Text and JSON views of a plan and of the state, for `plan` and `status`.

Pure formatting: no I/O besides returning strings, so the CLI stays a thin layer and the views are
testable. Nothing rendered here ever contains key material (the state holds none).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from hpodlb import health
from hpodlb.config import target_group_name
from hpodlb.inventory import LoginNode
from hpodlb.keystore import fingerprint
from hpodlb.planner import Plan
from hpodlb.state import State, TargetRecord


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def plan_text(plan: Plan, nodes: Sequence[LoginNode]) -> str:
    if plan.settled and not plan.unmanaged:
        drained = f" ({len(plan.drained)} drained, kept out)" if plan.drained else ""
        return f"Nothing to do: {len(nodes)} login nodes{drained} in step with every target group."
    rows: list[list[str]] = [["ACTION", "TARGET GROUP", "IP", "INSTANCE", "WHY"]]
    for a in plan.actions:
        where = f"{target_group_name(a.target_group)}:{a.port}" if a.target_group else "-"
        why = f"HELD by {a.held_by.value}: {a.reason}" if a.held_by else a.reason
        rows.append([a.kind.value, where, a.ip, a.instance_id or "-", why])
    for w in plan.waiting:
        rows.append(["waiting", "-", w.node.ip, w.node.instance_id, w.reason])
    for arn, t in plan.unmanaged:
        rows.append(
            ["leave", f"{target_group_name(arn)}:{t.port}", t.ip, "-", "not ours and prune = false"]
        )
    return table(rows)


def plan_json(plan: Plan, nodes: Sequence[LoginNode]) -> str:
    doc = {
        "nothing_to_do": plan.settled,
        "problems": list(plan.problems),
        "login_nodes": [n.__dict__ for n in nodes],
        "actions": [
            {
                "kind": a.kind.value,
                "target_group": a.target_group,
                "port": a.port,
                "ip": a.ip,
                "instance_id": a.instance_id,
                "reason": a.reason,
                "held_by": a.held_by.value if a.held_by else None,
                "after_push": a.after_push,
                "pin_fingerprints": sorted(fingerprint(k) for k in a.pin),
            }
            for a in plan.actions
        ],
        "waiting": [
            {"ip": w.node.ip, "instance_id": w.node.instance_id, "reason": w.reason}
            for w in plan.waiting
        ],
        "host_keys": {
            ip: {"state": j.state.value, "detail": j.detail} for ip, j in plan.judgements.items()
        },
        "unmanaged": [
            {"target_group": arn, "ip": t.ip, "port": t.port} for arn, t in plan.unmanaged
        ],
    }
    return json.dumps(doc, indent=2)


def _when(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    ago = now - ts
    if ago < 0:
        return f"in {-ago:.0f}s"
    return f"{ago:.0f}s ago" if ago < 3600 else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def _health_cell(record: TargetRecord | None, now: float) -> str:
    """`unhealthy (Target.Timeout) for 12m`: what the NLB says of a target, and since when."""
    if record is None:
        return "not registered"
    cell = f"{record.state} ({record.reason})" if record.reason else record.state
    if not health.serving(record) and record.since:
        cell += f" for {_span(now - record.since)}"
    return cell


def _drained_cell(node: dict[str, Any], now: float) -> str:
    """`kernel update, 2 sessions (40s ago)`: why it is out, and who is still on it."""
    if node["sessions"] is not None:
        count = f"{node['sessions']} sessions ({_when(node['sessions_at'], now)})"
    else:
        error = node["sessions_error"]
        count = f"sessions unknown: {error}" if error else "sessions not counted yet"
    return f"{node['drained']}, {count}"


def _error_cell(error: str, platform: str) -> str:
    """The last error, with what HyperPod says of the instance when it is not simply running."""
    if platform and platform != "Running":
        verb = "being replaced" if platform == "Pending" else "HyperPod"
        return f"{error or '-'} ({verb}: {platform})"
    return error or "-"


def _span(seconds: float) -> str:
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.0f}h"


def status_doc(state: State, target_groups: Sequence[str], now: float) -> dict[str, Any]:
    """One entry per login node and per stray target, as `status --json` prints it."""
    by_ip = {arn: {t.ip: t for t in state.targets.get(arn, [])} for arn in target_groups}
    nodes = []
    for ip, rec in sorted(state.nodes.items()):
        records = {arn: by_ip[arn].get(ip) for arn in target_groups}
        nodes.append(
            {
                "ip": ip,
                "instance_id": rec.instance_id,
                "name": rec.name,
                "group": rec.group,
                "key_state": rec.key_state,
                "key_detail": rec.key_detail,
                "verified_at": rec.verified_at,
                "retry_at": rec.retry_at if (rec.retry_at or 0) > now else None,
                "last_error": rec.last_error,
                "platform_status": rec.platform_status,
                "drained": rec.drained or None,
                "sessions": rec.sessions,
                "sessions_at": rec.sessions_at,
                "sessions_error": rec.sessions_error,
                "targets": {arn: r.state if r else "not registered" for arn, r in records.items()},
                "health": {arn: _health_json(r) if r else None for arn, r in records.items()},
            }
        )
    strays = [
        {"ip": ip, "target_group": arn, "state": t.state, "health": _health_json(t)}
        for arn, targets in by_ip.items()
        for ip, t in sorted(targets.items())
        if ip not in state.nodes
    ]
    return {
        "nodes": nodes,
        "other_targets": strays,
        "target_group_errors": state.target_errors,
        "last_pass": state.last_pass.model_dump() if state.last_pass else None,
    }


def _health_json(record: TargetRecord) -> dict[str, Any]:
    return {
        "state": record.state,
        "reason": record.reason,
        "description": record.description,
        "since": record.since or None,
    }


def status_text(state: State, target_groups: Sequence[str], now: float) -> str:
    doc = status_doc(state, target_groups, now)
    by_ip = {arn: {t.ip: t for t in state.targets.get(arn, [])} for arn in target_groups}
    out: list[str] = []
    last = state.last_pass
    if last is None:
        out.append("No pass has run yet (no state file): run `hpodlb once` or start the service.")
    else:
        verdict = last.standby or ("converged" if last.ok else "NOT converged")
        if last.standby and not last.standby.startswith("standby (controller: "):
            verdict = f"NOT converged: {last.standby}"  # standing by because something is wrong
        out.append(f"Last pass {_when(last.finished_at, now)}: {verdict}: {last.summary}")
        out.append(health.headline(state, target_groups))
    header = ["IP", "INSTANCE", "NAME", "GROUP", "KEYS", "VERIFIED", "PUSH RETRY"]
    header += [target_group_name(a) for a in target_groups] + ["LAST ERROR"]
    rows = [header]
    for n in doc["nodes"]:
        keys = n["key_state"] + (f": {n['key_detail']}" if n["key_detail"] else "")
        rows.append(
            [
                n["ip"],
                n["instance_id"],
                n["name"],
                n["group"],
                keys,
                _when(n["verified_at"], now),
                _when(n["retry_at"], now),
                *[_health_cell(by_ip[a].get(n["ip"]), now) for a in target_groups],
                _error_cell(n["last_error"], n["platform_status"]),
            ]
        )
    for s in doc["other_targets"]:
        cells = [
            _health_cell(by_ip[a][s["ip"]], now) if a == s["target_group"] else ""
            for a in target_groups
        ]
        rows.append([s["ip"], "(not a login node)", "-", "-", "-", "-", "-", *cells, "-"])
    if len(rows) > 1:
        out.append(table(rows))
    for arn, err in doc["target_group_errors"].items():
        out.append(f"target group {target_group_name(arn)}: {err}")
    out.extend(
        f"drained: {n['ip']} ({n['instance_id']}): {_drained_cell(n, now)}"
        for n in doc["nodes"]
        if n["drained"]
    )
    if last is not None:
        out.extend(f"held back: {h}" for h in last.held)
        out.extend(f"waiting: {w}" for w in last.waiting)
        out.extend(f"unhealthy: {u}" for u in last.unhealthy)
        if last.login_groups:
            out.append(f"login groups: {last.login_groups}")
        out.extend(f"error: {e}" for e in last.errors)
    return "\n".join(out)
