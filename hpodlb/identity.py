"""Which identity a login node presents, and what hpodlb may do about it. Pure: no I/O, no clock.

The two red lines of the host-key side are decided here, and only here:
- **Private keys go only to an endpoint we can vouch for.** A push session is pinned (`pin`) to the
  exact keys this pass's probe saw, and only when those keys are vouched for: the canonical or the
  previous canonical set (a known identity), the first sight of a *new* instance (trust on first
  use, pinned to what the probe saw so a different endpoint in between gets nothing), or keys an
  admin accepted with `hpodlb keys trust IP`.
- **A known instance presenting unknown keys is held, not "repaired".** It was verified before and
  now shows keys nobody vouches for: re-imaged in place, or an impostor. Pushing the canonical
  private keys to it would hand them to whoever answers; it waits for an admin instead.

Only the key types a node offers count: a node whose sshd offers only ed25519, canonical, is in sync.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from hpodlb.keystore import fingerprint


class KeyState(str, enum.Enum):
    """What `status` shows in its KEYS column, and what the planner acts on."""

    IN_SYNC = "in-sync"
    ROTATING = "rotating"  # presents the previous canonical set: updated in place
    NEW_INSTANCE = "new-instance"  # first sight of this instance: pushed, pinned to the probe
    ADMIN_TRUSTED = "trusted-by-admin"  # `hpodlb keys trust IP` accepted what it presents
    UNKNOWN_KEYS = "unknown-keys"  # a verified instance with keys nobody vouches for: held
    NO_KEY_TYPE = "no-configured-type"  # answers, offers none of host_keys.types: held
    UNREACHABLE = "unreachable"  # the probe failed: nothing is known this pass
    NO_CANONICAL = "no-canonical-keys"  # the key store is empty or refused
    PENDING = "pending"  # its probe has not come back yet (within a pass)
    NOT_CHECKED = "not checked"  # host_keys.enabled = false


# Recorded key states (as the state file keeps them) of a node whose identity is not in question.
KEYS_SETTLED = frozenset({KeyState.IN_SYNC.value, KeyState.NOT_CHECKED.value})
# ... and of a node held out of rotation until an admin acts (nothing is pushed to it).
KEYS_HELD = frozenset({KeyState.UNKNOWN_KEYS.value, KeyState.NO_KEY_TYPE.value})
# ... and of a node whose keys users may trust now (during a rotation, the previous set too): one
# of the conditions of being in service (`guards.in_service`). A probe not back yet, or failed,
# vouches for nothing.
KEYS_VOUCHED = frozenset(
    {KeyState.IN_SYNC.value, KeyState.NOT_CHECKED.value, KeyState.ROTATING.value}
)


@dataclass(frozen=True)
class Judgement:
    state: KeyState
    pin: frozenset[str] = frozenset()  # keys a push session must present; empty: never push
    wrong: tuple[str, ...] = ()  # offered types whose key is not the canonical one
    detail: str = ""

    @property
    def pushable(self) -> bool:
        return bool(self.pin) and self.state in PUSHABLE


PUSHABLE = frozenset({KeyState.ROTATING, KeyState.NEW_INSTANCE, KeyState.ADMIN_TRUSTED})


def judge(
    offered: Mapping[str, str],
    current: Mapping[str, str],
    previous: Mapping[str, str],
    *,
    known_instance: bool,
    admin_trusted: frozenset[str] | None = None,
    ip: str = "IP",
) -> Judgement:
    """`offered`: the `algo base64` key per configured type the node offers (types it does not
    offer are absent). `known_instance`: this instance's keys were verified canonical before.
    `admin_trusted`: the key lines an admin accepted for this instance, if any."""
    if not offered:
        return Judgement(
            KeyState.NO_KEY_TYPE,
            detail=f"offers none of the configured key types ({', '.join(current) or '-'})",
        )
    wrong = tuple(t for t in offered if offered[t] != current.get(t))
    if not wrong:
        return Judgement(KeyState.IN_SYNC)
    presented = frozenset(offered.values())
    shown = ", ".join(f"{t} {fingerprint(offered[t])}" for t in wrong)
    if previous and all(offered[t] == previous.get(t) for t in wrong):
        return Judgement(
            KeyState.ROTATING, presented, wrong, f"presents the previous canonical {shown}"
        )
    if admin_trusted is not None and presented == admin_trusted:
        return Judgement(
            KeyState.ADMIN_TRUSTED, presented, wrong, f"keys accepted by an admin: {shown}"
        )
    if known_instance:
        return Judgement(
            KeyState.UNKNOWN_KEYS,
            wrong=wrong,
            detail=f"this instance was verified before and now presents unknown {shown}; "
            "held out of rotation, nothing pushed (if it was re-imaged on purpose, run "
            f"`hpodlb keys trust {ip}`)",
        )
    return Judgement(
        KeyState.NEW_INSTANCE, presented, wrong, f"new instance presents its own {shown}"
    )
