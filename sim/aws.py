"""A moto server on loopback standing in for AWS: a VPC, a private subnet, an internal NLB with a
TCP:22 listener and its IP target group, built as an admin would in the console.

The daemon reaches it the way an admin's boto3 reaches AWS, through `AWS_ENDPOINT_URL`, so nothing
in hpodlb knows it is talking to an emulator.
"""

from __future__ import annotations

import os
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
        ).client(service, region_name=self.region, endpoint_url=self.endpoint_url)

    def create_login_nlb(self, name: str = "smhp-login-node", port: int = 22) -> str:
        """The manual procedure's steps 2 and 3; returns the target group ARN."""
        ec2, elb = self.client("ec2"), self.client("elbv2")
        vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.1.64.0/18")["Subnet"]["SubnetId"]
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
    try:
        yield FakeAws(endpoint_url=f"http://{host}:{port}", region=REGION)
    finally:
        server.stop()
