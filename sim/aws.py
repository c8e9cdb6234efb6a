"""A moto server on loopback standing in for AWS: a VPC, a private subnet, an internal NLB with a
TCP:22 listener and its IP target group, built as an admin would in the console.

The daemon reaches it the way an admin's boto3 reaches AWS, through `AWS_ENDPOINT_URL`, so nothing
in hpodlb knows it is talking to an emulator.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

REGION = "us-west-2"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}


@dataclass(frozen=True)
class FakeAws:
    endpoint_url: str
    region: str

    def env(self) -> dict[str, str]:
        """What a process needs in its environment to use this emulator as its AWS."""
        return {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint_url}

    def client(self, service: str) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # noqa: S106
        ).client(service, region_name=self.region, endpoint_url=self.endpoint_url)  # type: ignore[call-overload]  # any service, by name

    def create_login_nlb(self, name: str = "smhp-login-node", port: int = 22) -> str:
        """The manual procedure's steps 2 and 3; returns the target group ARN. The login nodes'
        security group (`NAME-login`) admits the NLB's subnet on the port, as HyperPod's docs say."""
        ec2, elb = self.client("ec2"), self.client("elbv2")
        vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(
            VpcId=vpc, CidrBlock="10.1.64.0/18", AvailabilityZone=f"{self.region}a"
        )["Subnet"]["SubnetId"]
        login_sg = ec2.create_security_group(
            GroupName=f"{name}-login", Description="login nodes", VpcId=vpc
        )["GroupId"]
        ec2.authorize_security_group_ingress(
            GroupId=login_sg,
            IpPermissions=[
                {
                    "IpProtocol": "tcp",
                    "FromPort": port,
                    "ToPort": port,
                    "IpRanges": [{"CidrIp": "10.1.64.0/18"}],
                }
            ],
        )
        tg = elb.create_target_group(
            Name=f"{name}-tg",
            Protocol="TCP",
            Port=port,
            VpcId=vpc,
            TargetType="ip",
            HealthCheckProtocol="TCP",
        )["TargetGroups"][0]["TargetGroupArn"]
        lb = elb.create_load_balancer(
            Name=f"{name}-lb", Subnets=[subnet], Scheme="internal", Type="network"
        )["LoadBalancers"][0]["LoadBalancerArn"]
        elb.create_listener(
            LoadBalancerArn=lb,
            Protocol="TCP",
            Port=port,
            DefaultActions=[{"Type": "forward", "TargetGroupArn": tg}],
        )
        return str(tg)

    def attach_login_node(self, arn: str, ip: str, zone: str = "") -> str:
        """A network interface with private IP `ip` in the target group's VPC and its login
        security group, as a HyperPod login instance has; `zone`: in a new subnet of that AZ."""
        ec2, elb = self.client("ec2"), self.client("elbv2")
        group = elb.describe_target_groups(TargetGroupArns=[arn])["TargetGroups"][0]
        vpc = group["VpcId"]
        in_vpc = [{"Name": "vpc-id", "Values": [vpc]}]
        subnets = ec2.describe_subnets(Filters=in_vpc)["Subnets"]
        chosen = [s for s in subnets if not zone or s["AvailabilityZone"] == zone]
        if chosen:
            subnet = chosen[0]["SubnetId"]
        else:
            cidr = f"10.1.{128 + 16 * len(subnets)}.0/20"
            subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=zone)["Subnet"][
                "SubnetId"
            ]
        sgs = ec2.describe_security_groups(Filters=in_vpc)["SecurityGroups"]
        login = [g["GroupId"] for g in sgs if g["GroupName"].endswith("-login")]
        eni = ec2.create_network_interface(SubnetId=subnet, PrivateIpAddress=ip, Groups=login)
        return str(eni["NetworkInterface"]["NetworkInterfaceId"])

    def targets(self, arn: str) -> set[tuple[str, int]]:
        reply = self.client("elbv2").describe_target_health(TargetGroupArn=arn)
        return {(d["Target"]["Id"], d["Target"]["Port"]) for d in reply["TargetHealthDescriptions"]}


@contextmanager
def moto_server() -> Iterator[FakeAws]:
    """A ThreadedMotoServer on 127.0.0.1 at a free port, stopped on exit."""
    from moto.server import ThreadedMotoServer

    for key, value in FAKE_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps its accounts in this process, not in the server: without a reset, a server
    # started after another (the next test in a pytest worker) would still hold the first one's
    # load balancers, VPCs and target groups.
    urllib.request.urlopen(
        urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"), timeout=30
    ).close()
    try:
        yield FakeAws(endpoint_url=f"http://{host}:{port}", region=REGION)
    finally:
        server.stop()


@contextmanager
def nlb_health(
    overrides: dict[str, tuple[str, str, str]],
) -> Iterator[dict[str, tuple[str, str, str]]]:
    """Make the emulator's NLB report `ip -> (state, reason, description)` for registered targets.

    moto reports every registered IP target healthy at once: it runs no health checks, so it cannot
    produce a failing one. This is the one fault injected into it rather than built: the rest of
    the answer (the target, its port, the call itself) is still moto's. Works for `mock_aws` and
    for a `ThreadedMotoServer` in this process; the dict may be changed while it is in effect."""
    from moto.elbv2 import models

    original = models.FakeTargetGroup.health_for

    def health_for(self: Any, target: dict[str, Any], ec2_backend: Any) -> Any:
        status = original(self, target, ec2_backend)
        override = overrides.get(target["Id"])
        if override is None or status.status != "healthy":
            return status
        return models.FakeHealthStatus(
            status.instance_id, status.port, status.health_check_port, *override
        )

    models.FakeTargetGroup.health_for = health_for  # type: ignore[method-assign]
    try:
        yield overrides
    finally:
        models.FakeTargetGroup.health_for = original  # type: ignore[method-assign]
