"""The SageMaker HyperPod API, read-only: what the cluster itself says of its login groups, its nodes'
status and its network. It explains and fills gaps; it never decides a write on its own.

Clusters defined through `CreateCluster` name each instance group's role in
`InstanceGroups[].SlurmConfig.NodeType` (`Controller`, `Login`, `Compute`) and may have no
`provisioning_parameters.json`. Every failure is a `ClusterError` naming the permission, so the
caller can say "grant sagemaker:DescribeCluster" and carry on as it did before this existed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hpodlb.awscalls import CallTally

if TYPE_CHECKING:
    from mypy_boto3_sagemaker import SageMakerClient

LOGIN = "Login"
PAGE_LIMIT = 100  # ListClusterNodes pages; a cluster of thousands of nodes is a handful of calls
MAX_PAGES = 100


class ClusterError(Exception):
    """A HyperPod API call failed; the message names the permission and AWS's error code."""


def region_of(cluster_arn: str) -> str:
    """`arn:aws:sagemaker:REGION:ACCOUNT:cluster/ID` -> REGION ("" if it is not such an ARN)."""
    parts = cluster_arn.split(":")
    return parts[3] if len(parts) > 5 and parts[2] == "sagemaker" else ""


class HyperPod:
    """One cluster's API, through a sagemaker client built on first use (it is not cheap)."""

    def __init__(self, client: Callable[[str], SageMakerClient]) -> None:
        self._make = client  # called with the cluster's ARN: its region is the API's
        self._client: SageMakerClient | None = None
        self.calls = CallTally()  # for the metrics

    def describe(self, cluster: str) -> dict[str, Any]:
        reply: dict[str, Any] = self._call(
            "DescribeCluster", "describe_cluster", ClusterName=cluster
        )
        return reply

    def login_groups(self, cluster: str) -> tuple[str, ...]:
        """The instance groups whose SlurmConfig.NodeType is Login (the others: Controller,
        Compute), in the cluster's order."""
        return tuple(
            g["InstanceGroupName"]
            for g in self.describe(cluster).get("InstanceGroups", [])
            if g.get("SlurmConfig", {}).get("NodeType") == LOGIN and g.get("InstanceGroupName")
        )

    def node_statuses(self, cluster: str, group: str = "") -> dict[str, str]:
        """InstanceId -> InstanceStatus.Status (Running, Pending, ShuttingDown, ...); `group`:
        only the instance groups whose name contains it (the login group, not the whole fleet)."""
        statuses: dict[str, str] = {}
        kwargs: dict[str, Any] = {"ClusterName": cluster, "MaxResults": PAGE_LIMIT}
        if group:
            kwargs["InstanceGroupNameContains"] = group
        for _ in range(MAX_PAGES):
            reply = self._call("ListClusterNodes", "list_cluster_nodes", **kwargs)
            for node in reply.get("ClusterNodeSummaries", []):
                status = node.get("InstanceStatus", {}).get("Status", "")
                if node.get("InstanceId") and status:
                    statuses[node["InstanceId"]] = status
            if not reply.get("NextToken"):
                break
            kwargs["NextToken"] = reply["NextToken"]
        return statuses

    def _call(self, operation: str, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            if self._client is None:
                self._client = self._make(kwargs["ClusterName"])
            reply = getattr(self._client, method)(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            self.calls.failed(operation, error.get("Code", "Unknown"))
            message = " ".join(str(error.get("Message", "")).split())[:300]
            raise ClusterError(
                f"sagemaker:{operation}: {error.get('Code', 'Unknown')}: {message}"
            ) from None
        except BotoCoreError as exc:
            self.calls.unreachable(operation)
            raise ClusterError(f"sagemaker:{operation}: {type(exc).__name__}: {exc}") from None
        self.calls.ok(operation)
        return reply


def sagemaker_client(region: str) -> Callable[[str], SageMakerClient]:
    """A factory for a client as an admin's boto3 would build it, with hpodlb's retries; in
    `region`, else the cluster ARN's."""

    def make(cluster: str) -> SageMakerClient:
        import boto3

        from hpodlb.targets import boto_config

        where = region or region_of(cluster) or None
        return boto3.session.Session().client("sagemaker", region_name=where, config=boto_config())

    return make
