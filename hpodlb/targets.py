"""The NLB adapter: read, check and change one target group's targets, and nothing else.

It takes a ready boto3 `elbv2` client (tests hand it a moto-backed one; the daemon one with botocore's
`standard` retry mode, which already backs off on throttling). Every failure becomes a `TargetsError`
naming the target group and the AWS error code, because "AccessDenied on smhp-login-node-tg" is what
an admin can act on, and a raw botocore traceback is not.

Before anything writes to a group, `problem` checks that it is what the config says: type `ip`,
protocol `TCP`, the configured port. A group of another kind (someone else's `instance` group, say)
gets no write at all. The answer is cached for `CHECK_SECONDS` and checked again after any write
that AWS refused as invalid, so an idle pass stays at one DescribeTargetHealth per group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hpodlb.awscalls import CallTally
from hpodlb.config import ConfigError, target_group_name
from hpodlb.planner import GroupView, Target

if TYPE_CHECKING:
    from botocore.config import Config as BotoConfig
    from botocore.config import _RetryDict
    from mypy_boto3_elbv2 import ElasticLoadBalancingv2Client

# RegisterTargets and DeregisterTargets take at most this many targets per call (elbv2 API limit
# for IP targets is far higher per group, so batching keeps one call from being rejected).
BATCH_SIZE = 200
CHECK_SECONDS = 600.0  # a group's type, protocol and port are checked at least this often
DEFAULT_ATTEMPTS = 5
# AWS refused a call because of what it asked for (a target), not because of the group or AWS.
INVALID_REQUEST_CODES = frozenset({"ValidationError", "InvalidTarget"})


class TargetsError(Exception):
    """An AWS call for one target group failed; `code` is the AWS error code (or the transport's)."""

    def __init__(self, target_group: str, operation: str, code: str, message: str) -> None:
        super().__init__(
            f"{target_group_name(target_group)}: {operation} failed: {code}: {message}"
        )
        self.code = code


@dataclass
class WriteResult:
    """What a register or deregister did, target by target: a batch that partly succeeded is
    recorded as such. `refused`: AWS found the target itself invalid (its reason); `failed`: the
    call failed for another reason (`error` is the first such failure)."""

    done: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    error: TargetsError | None = None


RETRY_MODES = ("standard", "adaptive", "legacy")  # botocore's; anything else is an admin's typo


def boto_config(connect_timeout_seconds: float = 5, read_timeout_seconds: float = 15) -> BotoConfig:
    """Retries with backoff for throttling and 5xx, bounded so a pass cannot hang on AWS.

    `AWS_RETRY_MODE` / `AWS_MAX_ATTEMPTS` still win, as they do for any boto3 program; the latter
    counts every attempt, the first one included (botocore's `total_max_attempts`).
    """
    from botocore.config import Config as BotoConfig

    raw = os.environ.get("AWS_MAX_ATTEMPTS", str(DEFAULT_ATTEMPTS))
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ConfigError(f"AWS_MAX_ATTEMPTS={raw!r}: expected a whole number of attempts >= 1")
    mode = os.environ.get("AWS_RETRY_MODE", "standard")
    if mode not in RETRY_MODES:
        raise ConfigError(f"AWS_RETRY_MODE={mode!r}: expected one of {', '.join(RETRY_MODES)}")
    retries: _RetryDict = {"mode": mode, "total_max_attempts": int(raw)}  # type: ignore[typeddict-item]  # mode: checked against RETRY_MODES above
    return BotoConfig(
        retries=retries,
        connect_timeout=connect_timeout_seconds,
        read_timeout=read_timeout_seconds,
    )


def elbv2_client(region: str) -> ElasticLoadBalancingv2Client:
    """A client as an admin's boto3 would build it (AWS_ENDPOINT_URL, profiles, instance role)."""
    import boto3

    return boto3.session.Session().client("elbv2", region_name=region, config=boto_config())


def check_group(info: dict[str, Any], port: int) -> str | None:
    """Why a described target group is not one hpodlb may write to, or None. One piece of code for
    the pass and `check-config`."""
    wrong = []
    if info.get("TargetType") != "ip":
        wrong.append(f"target type {info.get('TargetType')!r} (expected 'ip')")
    if info.get("Protocol") != "TCP":
        wrong.append(f"protocol {info.get('Protocol')!r} (expected 'TCP')")
    if info.get("Port") != port:
        wrong.append(f"port {info.get('Port')!r} (expected {port}, the configured port)")
    if not wrong:
        return None
    name = target_group_name(str(info.get("TargetGroupArn", "")))
    return f"{name}: not a login target group: {', '.join(wrong)}; hpodlb will not touch it"


class TargetGroup:
    """One configured target group, through one elbv2 client."""

    def __init__(self, client: ElasticLoadBalancingv2Client, arn: str, port: int) -> None:
        self.client = client
        self.arn = arn
        self.port = port
        self._checked: tuple[float, str | None] | None = None  # (monotonic time, problem)
        self.info: dict[str, Any] = {}  # the last DescribeTargetGroups entry (health checks, ...)
        self.calls = CallTally()  # for the metrics

    @property
    def name(self) -> str:
        return target_group_name(self.arn)

    def observe(self) -> GroupView:
        """All targets with their health state (DescribeTargetHealth: one call, not paginated)."""
        reply = self._call("DescribeTargetHealth", TargetGroupArn=self.arn)
        return GroupView(
            arn=self.arn,
            port=self.port,
            targets=tuple(_target(d, self.port) for d in reply.get("TargetHealthDescriptions", [])),
        )

    def describe(self) -> dict[str, Any]:
        """The target group itself (type, protocol, port, attached load balancers)."""
        reply = self._call("DescribeTargetGroups", TargetGroupArns=[self.arn])
        groups: list[dict[str, Any]] = reply.get("TargetGroups", [])
        if not groups:
            raise TargetsError(
                self.arn, "DescribeTargetGroups", "TargetGroupNotFound", "no such group"
            )
        return groups[0]

    def load_balancers(self) -> list[dict[str, Any]]:
        """The load balancers the group is attached to (a listener forwards to it), [] if none.
        Read only by admin commands (the pass never needs them)."""
        arns = self.describe().get("LoadBalancerArns", [])
        if not arns:
            return []
        reply = self._call("DescribeLoadBalancers", LoadBalancerArns=arns)
        return list(reply.get("LoadBalancers", []))

    def problem(self, now: float) -> str | None:
        """Why this group must not be written to (None: it may), checked at most every
        CHECK_SECONDS unless a refused write asked for it again. TargetsError if AWS cannot say."""
        if self._checked is None or now - self._checked[0] >= CHECK_SECONDS:
            self.info = self.describe()
            self._checked = (now, check_group(self.info, self.port))
        return self._checked[1]

    def register(self, ips: Sequence[str]) -> WriteResult:
        return self._write("RegisterTargets", ips)

    def deregister(self, ips: Sequence[str]) -> WriteResult:
        return self._write("DeregisterTargets", ips)

    def _write(self, operation: str, ips: Sequence[str]) -> WriteResult:
        """Batches of BATCH_SIZE; a batch refused as invalid is split until the offender is alone,
        so one bad target cannot keep the good ones out."""
        result = WriteResult()

        def attempt(batch: Sequence[str]) -> None:
            try:
                self._call(operation, TargetGroupArn=self.arn, Targets=self._targets(batch))
            except TargetsError as exc:
                if exc.code not in INVALID_REQUEST_CODES:
                    result.error = result.error or exc
                    result.failed.update(dict.fromkeys(batch, str(exc)))
                    return
                self._checked = None  # what AWS found invalid may be the group itself
                if len(batch) == 1:
                    result.refused[batch[0]] = str(exc).split(": ", 1)[-1]
                    return
                half = len(batch) // 2
                attempt(batch[:half])
                attempt(batch[half:])
                return
            result.done.extend(batch)

        _each_batch(ips, attempt)
        return result

    def _targets(self, ips: Sequence[str]) -> list[dict[str, Any]]:
        return [{"Id": ip, "Port": self.port} for ip in ips]

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        method = getattr(self.client, _snake(operation))
        try:
            reply: dict[str, Any] = method(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            self.calls.failed(operation, error.get("Code", "Unknown"))
            raise TargetsError(
                self.arn, operation, error.get("Code", "Unknown"), error.get("Message", str(exc))
            ) from None
        except BotoCoreError as exc:
            self.calls.unreachable(operation)
            raise TargetsError(self.arn, operation, type(exc).__name__, str(exc)) from None
        self.calls.ok(operation)
        return reply


def _target(description: dict[str, Any], port: int) -> Target:
    health = description.get("TargetHealth", {})
    return Target(
        ip=description["Target"]["Id"],
        port=int(description["Target"].get("Port", port)),
        state=health.get("State", "unknown"),
        reason=health.get("Reason", ""),
        description=health.get("Description", ""),
    )


def _each_batch(ips: Sequence[str], act: Callable[[Sequence[str]], None]) -> None:
    for start in range(0, len(ips), BATCH_SIZE):
        act(ips[start : start + BATCH_SIZE])


def _snake(operation: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in operation).lstrip("_")
