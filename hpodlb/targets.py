"""The NLB adapter: read and change one target group's targets, and nothing else.

It takes a ready boto3 `elbv2` client (tests hand it a moto-backed one; the daemon one with botocore's
`standard` retry mode, which already backs off on throttling). Every failure becomes a `TargetsError`
naming the target group and the AWS error code, because "AccessDenied on smhp-login-node-tg" is what
an admin can act on, and a raw botocore traceback is not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from hpodlb.config import target_group_name
from hpodlb.planner import GroupView, Target

if TYPE_CHECKING:
    from botocore.config import Config as BotoConfig

# RegisterTargets and DeregisterTargets take at most this many targets per call (elbv2 API limit
# for IP targets is far higher per group, so batching keeps one call from being rejected).
BATCH_SIZE = 200


class TargetsError(Exception):
    """An AWS call for one target group failed; `code` is the AWS error code (or the transport's)."""

    def __init__(self, target_group: str, operation: str, code: str, message: str) -> None:
        super().__init__(
            f"{target_group_name(target_group)}: {operation} failed: {code}: {message}"
        )
        self.target_group = target_group
        self.operation = operation
        self.code = code


def boto_config(connect_timeout_seconds: float = 5, read_timeout_seconds: float = 15) -> BotoConfig:
    """Retries with backoff for throttling and 5xx, bounded so a pass cannot hang on AWS.

    `AWS_RETRY_MODE` / `AWS_MAX_ATTEMPTS` still win, as they do for any boto3 program.
    """
    import os

    from botocore.config import Config as BotoConfig

    retries = {
        "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
        "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "5")),
    }
    return BotoConfig(
        retries=retries,
        connect_timeout=connect_timeout_seconds,
        read_timeout=read_timeout_seconds,
    )


def elbv2_client(region: str) -> Any:
    """A client as an admin's boto3 would build it (AWS_ENDPOINT_URL, profiles, instance role)."""
    import boto3

    return boto3.session.Session().client("elbv2", region_name=region, config=boto_config())


class TargetGroup:
    """One configured target group, through one elbv2 client."""

    def __init__(self, client: Any, arn: str, port: int) -> None:
        self.client = client
        self.arn = arn
        self.port = port

    @property
    def name(self) -> str:
        return target_group_name(self.arn)

    def observe(self) -> GroupView:
        """All targets with their health state (DescribeTargetHealth: one call, not paginated)."""
        reply = self._call("DescribeTargetHealth", TargetGroupArn=self.arn)
        targets = tuple(
            Target(
                ip=d["Target"]["Id"],
                port=int(d["Target"].get("Port", self.port)),
                state=d.get("TargetHealth", {}).get("State", "unknown"),
            )
            for d in reply.get("TargetHealthDescriptions", [])
        )
        return GroupView(arn=self.arn, port=self.port, targets=targets)

    def describe(self) -> dict[str, Any]:
        """The target group itself (for check-config: type, protocol, port, attached LBs)."""
        reply = self._call("DescribeTargetGroups", TargetGroupArns=[self.arn])
        groups: list[dict[str, Any]] = reply.get("TargetGroups", [])
        if not groups:
            raise TargetsError(
                self.arn, "DescribeTargetGroups", "TargetGroupNotFound", "no such group"
            )
        return groups[0]

    def register(self, ips: Sequence[str]) -> None:
        for batch in _batches(ips):
            self._call("RegisterTargets", TargetGroupArn=self.arn, Targets=self._targets(batch))

    def deregister(self, ips: Sequence[str]) -> None:
        for batch in _batches(ips):
            self._call("DeregisterTargets", TargetGroupArn=self.arn, Targets=self._targets(batch))

    def _targets(self, ips: Sequence[str]) -> list[dict[str, Any]]:
        return [{"Id": ip, "Port": self.port} for ip in ips]

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        method = getattr(self.client, _snake(operation))
        try:
            reply: dict[str, Any] = method(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise TargetsError(
                self.arn, operation, error.get("Code", "Unknown"), error.get("Message", str(exc))
            ) from None
        except BotoCoreError as exc:
            raise TargetsError(self.arn, operation, type(exc).__name__, str(exc)) from None
        return reply


def _batches(ips: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(ips), BATCH_SIZE):
        yield ips[start : start + BATCH_SIZE]


def _snake(operation: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in operation).lstrip("_")
