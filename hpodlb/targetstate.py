"""What an NLB target's state means to hpodlb: the one home of "registered", "up" and "serving".

AWS reports each target's `TargetHealth.State` (and a `Reason`). Every part of hpodlb that asks
"is this target registered?", "is it up?" or "does the NLB send it users?" (the planner, the
guards, the pass, health, drain, doctor's judgements, status and the metrics) asks these
functions, so that the answer cannot drift between them. Pure: strings in, booleans out.
Whether a *login node* is in service (its keys count too) is `guards.in_service`'s, built on these.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

# A target on its way out: `draining`, and any `<health>.draining` (`unhealthy.draining`: failing
# its health checks and having its connections drained). Neither counts as registered: the NLB
# sends it no new users, so a login node in that state is registered again.
DRAINING = "draining"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
# The NLB sends no user to these, registered or not: failing its checks, or in an Availability
# Zone (or a group) no load balancer uses.
NOT_UP = frozenset({UNHEALTHY, "unused"})
# With health checks off, AWS says `unavailable` and sends traffic anyway: not a failure.
CHECKS_OFF = "Target.HealthCheckDisabled"


class TargetLike(Protocol):
    """A target as the adapters and the state file hold it."""

    @property
    def ip(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def state(self) -> str: ...


def is_leaving(state: str) -> bool:
    """`draining` or `<health>.draining`: the target is being taken out of the group."""
    return state == DRAINING or state.endswith("." + DRAINING)


def is_failing_out(state: str) -> bool:
    """Leaving *and* failing its health checks (`unhealthy.draining`): registering it again
    cannot make it pass them."""
    return is_leaving(state) and state != DRAINING


def is_registered(state: str) -> bool:
    """The target is in the group and not leaving it, healthy or not (`unused` and `initial`
    count: registering them again would change nothing)."""
    return not is_leaving(state)


def is_up(state: str) -> bool:
    """Registered and not failing: the NLB sends it users, or will once its first checks pass
    (`initial`; a target hpodlb just registered is `initial` until the next read)."""
    return is_registered(state) and state not in NOT_UP


def is_serving(state: str, reason: str) -> bool:
    """The NLB sends it users: healthy, or health checks are off (AWS then sends to every
    target)."""
    return state == HEALTHY or reason == CHECKS_OFF


def registered_ips(targets: Iterable[TargetLike], port: int) -> set[str]:
    """The Ids of the targets registered at `port` (targets at other ports are not ours)."""
    return {t.ip for t in targets if t.port == port and is_registered(t.state)}
