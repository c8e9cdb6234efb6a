"""What every step of one pass shares: its clocks, its error record and log, and what it knows.

The pass is four plain pieces around the pure planner: `observe` (what the world is), `jobs` (the
node jobs: probes, pushes, adoptions, session counts), `act` (AWS writes and the starts of pushes)
and `record` (the state file, known_hosts). `reconcile` sequences them. What they share is
here, and this module imports none of them; beyond it, `act` starts the jobs `jobs` runs and
`record` writes down what they returned, and nothing imports `reconcile`.

Never any I/O here, and nothing a pass decides: `PassContext` is how a pass was started (which
config, which state, whether it may act) and where it says what went wrong; `Known` is the world
as this pass knows it so far, which the planner is asked about again each time it grows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hpodlb.config import Config
from hpodlb.hostkeys import HostKeys
from hpodlb.intentmodel import DrainRequest, Intents
from hpodlb.inventory import LoginNode
from hpodlb.keystore import KeySet, KeyStore
from hpodlb.leader import Leadership
from hpodlb.logs import get_logger
from hpodlb.outcome import PassOutcome
from hpodlb.planner import GroupView, KeyFacts, Probe
from hpodlb.sshnode import LoginKey
from hpodlb.state import State

log = get_logger("hpodlb.pass")


def read_boot_id() -> str:
    """Monotonic times are comparable only within one boot; this names the boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class KeySide:
    """The host-key side of a pass: the canonical store and the nodes' keys (None: disabled)."""

    store: KeyStore
    nodes: HostKeys
    adopt: bool
    probe_interval_seconds: float
    timeout_seconds: float
    login: LoginKey | None = None  # the head node's SSH key, read each pass (None: none to read)


@dataclass
class PassContext:
    """One pass as it was started, and where it reports."""

    config: Config
    state: State  # the pass's own: the daemon's state, or a copy in a dry run
    outcome: PassOutcome
    boot_id: str
    clock: Callable[[], float]  # monotonic
    wall: Callable[[], float]
    beat: Callable[[], None]  # the pass advanced (the daemon's watchdog follows it)
    apply: bool  # False: a dry run (`plan`): nothing is written, nobody is logged in to
    act: bool  # False: another head acts (or took over mid-pass); this pass observes and records
    # Leadership as of now (cached at most leader.CACHE_SECONDS): `act` asks it before each write.
    leader: Callable[[], Leadership] = lambda: Leadership(True, why="one head")
    now: float = field(init=False)  # monotonic, when the pass began: decisions compare with it
    by_ip: dict[str, LoginNode] = field(init=False)

    def __post_init__(self) -> None:
        self.now = self.clock()
        self.by_ip = {n.ip: n for n in self.outcome.nodes}

    @property
    def nodes(self) -> tuple[LoginNode, ...]:
        return self.outcome.nodes

    @property
    def acting(self) -> bool:
        """Whether this pass may write to AWS and log in to nodes: it applies, and this head is
        the one in control (as the pass began, and at every write since: see `act`)."""
        return self.apply and self.act

    def error(self, line: str) -> None:
        """Something this pass could not do: it is then not converged, and says this."""
        self.outcome.errors.append(line)


@dataclass
class Known:
    """The world as this pass knows it so far: what the planner is asked about."""

    views: dict[str, GroupView] = field(default_factory=dict)  # with this pass's writes applied
    # max_deregister_fraction's window, by arn (`guards.py`): registered as it began, and the
    # deregistrations done within it (earlier passes' and this one's).
    start_registered: dict[str, int] = field(default_factory=dict)
    spent: Counter[str] = field(default_factory=Counter)
    probes: dict[str, Probe] = field(default_factory=dict)  # by IP; a push's result counts too
    facts: KeyFacts = field(default_factory=KeyFacts)
    keyset: KeySet = field(default_factory=dict)  # the canonical set (private keys included)
    intents: Intents = field(default_factory=Intents)
    drains: dict[str, DrainRequest] = field(default_factory=dict)  # in force this pass, by IP
