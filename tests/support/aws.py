"""AWS for tests: a target group in moto, IAM that denies one action, a clock moved by hand."""

from __future__ import annotations

from typing import Any

import boto3
import pytest

TG_ARN = "arn:aws:elasticloadbalancing:us-west-2:123456789012:targetgroup/smhp-login-node-tg/0123456789abcdef"


def make_group(elb: Any, name: str = "smhp-login-node-tg") -> str:
    ec2 = boto3.client("ec2", region_name="us-west-2")
    vpc = ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
    return str(
        elb.create_target_group(Name=name, Protocol="TCP", Port=22, VpcId=vpc, TargetType="ip")[
            "TargetGroups"
        ][0]["TargetGroupArn"]
    )


class Clock:
    """A monotonic clock the test moves by hand (intervals pass without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def credentials_denied(action: str) -> dict[str, str]:
    """In moto (in-process): an IAM user allowed everything but `action`; its access key."""
    import json

    import boto3

    iam = boto3.client("iam", region_name="us-east-1")
    iam.create_user(UserName="head-node")
    policy = iam.create_policy(
        PolicyName="hpodlb",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": "*", "Resource": "*"},
                    {"Effect": "Deny", "Action": action, "Resource": "*"},
                ],
            }
        ),
    )
    iam.attach_user_policy(UserName="head-node", PolicyArn=policy["Policy"]["Arn"])
    key = iam.create_access_key(UserName="head-node")["AccessKey"]
    return {
        "aws_access_key_id": key["AccessKeyId"],
        "aws_secret_access_key": key["SecretAccessKey"],
    }


def enforce_iam(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on moto checks every call against IAM (it lets all through by default)."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
