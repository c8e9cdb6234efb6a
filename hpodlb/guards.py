"""The guards that keep a bad input from emptying a target group, and their arithmetic.

Pure. The planner holds deregistrations back with them, and `hpodlb drain` refuses up front what
they would hold; both count with the same `Ledger`, so the command can never promise what the pass
then refuses (or the other way round). Which guard a caller names first when both hold is the
caller's to say: the pass names the budget, the drain command names the floor.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from hpodlb.config import ReconcileConfig


class Guard(str, enum.Enum):
    ABSENCE = "absent_passes_before_deregister"
    FRACTION = "max_deregister_fraction"
    MIN_IN_SERVICE = "min_in_service"
    BACKOFF = "backoff"  # a failed node's key push waits; it never holds a deregistration


# What can hold a deregistration back (hpodlb_deregistrations_held's `guard` label).
DEREGISTRATION_GUARDS = (Guard.ABSENCE, Guard.FRACTION, Guard.MIN_IN_SERVICE)


@dataclass(frozen=True)
class Guards:
    prune: bool = True
    max_deregister_fraction: float = 0.5
    absent_passes_before_deregister: int = 2
    min_in_service: int = 1
    min_absent_seconds: float = 0.0  # (absent_passes_before_deregister - 1) x interval_seconds


def guards_of(cfg: ReconcileConfig) -> Guards:
    return Guards(
        prune=cfg.prune,
        max_deregister_fraction=cfg.max_deregister_fraction,
        absent_passes_before_deregister=cfg.absent_passes_before_deregister,
        min_in_service=cfg.min_in_service,
        # N scheduled passes are N - 1 intervals apart; a burst of passes is not.
        min_absent_seconds=(cfg.absent_passes_before_deregister - 1) * cfg.interval_seconds,
    )


class Ledger:
    """The deregistration budget of one group in one pass: max_deregister_fraction of the
    targets registered as the pass began (`base`), less what left already (`spent`), and never
    fewer than min_in_service of the `registered` left."""

    def __init__(self, guards: Guards, registered: int, base: int, spent: int = 0) -> None:
        self.budget = math.floor(guards.max_deregister_fraction * base) - spent
        self.remaining = registered
        self.floor = guards.min_in_service

    @property
    def fraction_spent(self) -> bool:
        """No deregistration is left in this pass's share."""
        return self.budget <= 0

    @property
    def at_floor(self) -> bool:
        """One more leaving would take the group below min_in_service."""
        return self.remaining - 1 < self.floor

    def take(self, *, forced: bool = False) -> Guard | None:
        """A deregistration's place in the budget, or the guard that holds it; a forced drain
        passes both guards but still counts, so that nothing else leaves in its place."""
        if not forced:
            if self.fraction_spent:
                return Guard.FRACTION
            if self.at_floor:
                return Guard.MIN_IN_SERVICE
        self.budget -= 1
        self.remaining -= 1
        return None
