"""What an NLB target's state means to hpodlb: the one home of "registered" and "serving".

AWS reports each target's `TargetHealth.State` (and a `Reason`). Every part of hpodlb that asks
"is this target registered?" or "does the NLB send it users?" (the planner, the pass, health,
drain, doctor's judgements, status and the metrics) asks these functions, so that the answer
cannot drift between them. Pure: strings in, booleans out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

# States in which a target is on its way out or gone: it does not count as registered.
# (`unhealthy.draining` is not one: that target is registered, failing its health checks, and
# only its existing connections are being drained.)
LEAVING = frozenset({"draining"})
HEALTHY = "healthy"
# With health checks off, AWS says `unavailable` and sends traffic anyway: not a failure.
CHECKS_OFF = "Target.HealthCheckDisabled"


class _Target(Protocol):
    @property
    def ip(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def state(self) -> str: ...


def is_registered(state: str) -> bool:
    """The target is in the group and not leaving it, healthy or not (`unused` and `initial`
    count: registering them again would change nothing)."""
    return state not in LEAVING


def is_serving(state: str, reason: str) -> bool:
    """The NLB sends it users: healthy, or health checks are off (AWS then sends to every
    target)."""
    return state == HEALTHY or reason == CHECKS_OFF


def registered_ips(targets: Iterable[_Target], port: int) -> set[str]:
    """The Ids of the targets registered at `port` (targets at other ports are not ours)."""
    return {t.ip for t in targets if t.port == port and is_registered(t.state)}
