"""The guards that keep a bad input from emptying a target group: what "in service" means to
them, and their arithmetic.

Pure. The planner holds deregistrations back with them, and `hpodlb drain` refuses up front what
they would hold; both count with the same `Ledger` and the same `in_service`, so the command can
never promise what the pass then refuses (or the other way round). When both hold, both name the
floor: it says why a target stays for as long as it holds, where the budget only delays.

**In service** has one definition, `in_service`: a login node of the resource config whose host
keys are vouched for (`identity.KEYS_VOUCHED`), registered at the group's port and up (neither
unhealthy, unused nor draining: `targetstate.is_up`). A target no login node accounts for, one
added by hand, an unhealthy or draining one, or a node whose keys are unverified is registered
but not in service: `min_in_service` never counts it.

**max_deregister_fraction is a rate**: of the targets registered as its window began, at most that
share leaves within `interval_seconds` (less a tenth: a scheduled pass may start a moment early),
whatever triggers the passes (a resource config rewritten every second makes a pass every
second). The pass keeps each deregistration's time in the state file, so the window outlives the
pass, `hpodlb once` and a daemon restart (within one boot, as every monotonic time there).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hpodlb.config import ReconcileConfig
from hpodlb.identity import KEYS_VOUCHED
from hpodlb.targetstate import TargetLike, is_up


class Guard(str, enum.Enum):
    ABSENCE = "absent_passes_before_deregister"
    FRACTION = "max_deregister_fraction"
    MIN_IN_SERVICE = "min_in_service"
    BACKOFF = "backoff"  # a failed node's key push waits; it never holds a deregistration


# What can hold a deregistration back (hpodlb_deregistrations_held's `guard` label).
DEREGISTRATION_GUARDS = (Guard.ABSENCE, Guard.FRACTION, Guard.MIN_IN_SERVICE)

# The fraction's window is interval_seconds less this share of it: the next scheduled pass starts
# an interval after the last one *was due*, and reading leadership and the resource config before
# the pass takes its time can make it look a little early; it must still find a fresh budget.
WINDOW_SLACK = 0.1


@dataclass(frozen=True)
class Guards:
    prune: bool = True
    max_deregister_fraction: float = 0.5
    absent_passes_before_deregister: int = 2
    min_in_service: int = 1
    min_absent_seconds: float = 0.0  # (absent_passes_before_deregister - 1) x interval_seconds
    fraction_window_seconds: float = 0.0  # a deregistration this recent still spends the budget


def guards_of(cfg: ReconcileConfig) -> Guards:
    return Guards(
        prune=cfg.prune,
        max_deregister_fraction=cfg.max_deregister_fraction,
        absent_passes_before_deregister=cfg.absent_passes_before_deregister,
        min_in_service=cfg.min_in_service,
        # N scheduled passes are N - 1 intervals apart; a burst of passes is not.
        min_absent_seconds=(cfg.absent_passes_before_deregister - 1) * cfg.interval_seconds,
        fraction_window_seconds=cfg.interval_seconds * (1 - WINDOW_SLACK),
    )


def in_service(keys: Mapping[str, str], targets: Iterable[TargetLike], port: int) -> set[str]:
    """The login nodes in service in one target group: the one definition every guard counts.
    `keys`: each login node of the resource config, by IP, and its key state (a `KeyState`'s
    value, as the planner judged it or the state file recorded it); `targets`: the group's, as
    AWS (or this pass's writes) left them."""
    return {t.ip for t in targets if t.port == port and not out_of_service(keys, t)}


def out_of_service(keys: Mapping[str, str], target: TargetLike) -> str:
    """Why a target is not in service, for people (empty: it is); `in_service`'s conditions."""
    if target.ip not in keys:
        return "not a login node of the resource config"
    if keys[target.ip] not in KEYS_VOUCHED:
        return f"host keys {keys[target.ip]}"
    if not is_up(target.state):
        return target.state
    return ""


def recent(departures: Iterable[float], now: float, guards: Guards) -> list[float]:
    """The deregistrations (monotonic times) that still spend this window's fraction."""
    return [t for t in departures if now - t < guards.fraction_window_seconds]


class Ledger:
    """The deregistration budget of one group: max_deregister_fraction of the targets registered
    as the window began (`base`), less what left within it already (`spent`); and the floor:
    never fewer than min_in_service of the group's nodes in service (`serving`, now)."""

    def __init__(self, guards: Guards, serving: int, base: int, spent: int = 0) -> None:
        self.budget = math.floor(guards.max_deregister_fraction * base) - spent
        self.serving = serving
        self.floor = guards.min_in_service

    @property
    def fraction_spent(self) -> bool:
        """No deregistration is left in this window's share."""
        return self.budget <= 0

    def too_few(self, *, in_service: bool) -> bool:
        """After this target leaves, fewer than min_in_service nodes would be in service. Also
        true of a target not in service while the group is below the floor already: with nothing
        (or too little) verifiably serving, what is left stays, whatever the inputs say."""
        return self.serving - int(in_service) < self.floor

    def take(self, *, in_service: bool, forced: bool = False) -> Guard | None:
        """A deregistration's place in the budget, or the guard that holds it; a forced drain
        passes both guards but still counts, so that nothing else leaves in its place."""
        if not forced:
            if self.too_few(in_service=in_service):
                return Guard.MIN_IN_SERVICE
            if self.fraction_spent:
                return Guard.FRACTION
        self.budget -= 1
        self.serving -= int(in_service)
        return None
