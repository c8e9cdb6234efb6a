"""What an admin asked for that must outlive any pass: kept apart from the state cache.

Two kinds: `hpodlb keys trust IP` requests (accept, once, the keys a re-imaged instance presents
now) and `hpodlb drain IP` (keep a login node out of rotation until `hpodlb undrain IP`).
The state file is a cache that may be deleted at will; an admin's decision is not, so it lives in
its own small file, changed only under its own lock (the daemon and the commands may all touch it).
A trust request is bound to the instance and the exact keys it was made for: it can never approve
anything else, and it is removed once that node verified with the canonical keys. A drain is bound
to the IP (a HyperPod replacement at that IP stays drained: the admin's word outlives instances)
and is removed only by `undrain`. The daemon keeps a copy of the drains in its state, so that a
lost intents file is noticed, said loudly, and never puts a drained node back by itself.

Several heads share one truth: the intents are kept as tags on every configured target group
(`intentmodel.intent_tags`: one tag per drain, one per trust request), and intents.json is this
head's cache of them. Every change is written to the tags of every group, under this head's lock;
a read takes the union of the groups' tags (a drain in any group is a drain: two groups that
disagree mean a write half done, and keeping the node out is the safe half). When no group's tags
can be read, the cache stands in and the caller says so: a failed read never forgets a drain. A
cache written before the tags (no `shared` mark) is carried into them once, at the next change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from hpodlb.files import (
    UnusableFileError,
    read_regular_file,
    write_atomically,
)
from hpodlb.intentmodel import (
    DRAIN_PREFIX,
    TAGS_PER_GROUP,
    TRUST_PREFIX,
    Intents,
    intent_tags,
    intents_of_tags,
)
from hpodlb.logs import get_logger
from hpodlb.state import load_state

if TYPE_CHECKING:
    from hpodlb.targets import TargetGroup

log = get_logger("hpodlb.intents")

INTENTS_FILE = "intents.json"
LOCK_FILE = "intents.lock"
MAX_BYTES = 1024 * 1024


class IntentsError(Exception):
    """The intents file exists but cannot be used; the message names it."""


def intents_path(state_dir: Path) -> Path:
    return state_dir / INTENTS_FILE


def load_intents(state_dir: Path) -> Intents:
    """The admin's intents; an empty set when the file does not exist (see `intents_path`)."""
    path = intents_path(state_dir)
    try:
        raw = read_regular_file(path, MAX_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        return Intents()
    except UnusableFileError as exc:
        raise IntentsError(str(exc)) from None
    except OSError as exc:
        raise IntentsError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return Intents.model_validate(json.loads(raw))
    except (ValueError, ValidationError, RecursionError) as exc:  # deep nesting: json recurses
        raise IntentsError(f"{path}: unusable ({str(exc).splitlines()[0]})") from None


class IntentTagsError(IntentsError):
    """The target groups' tags, where the intents are kept, could not be read or written."""


@dataclass
class SharedIntents:
    """The intents as the target groups' tags keep them: the union of every group read."""

    intents: Intents
    tags: dict[str, dict[str, str]] = field(default_factory=dict)  # by group ARN: all its tags
    unread: dict[str, str] = field(default_factory=dict)  # group name -> why not
    disagree: list[str] = field(default_factory=list)  # drained IPs some group lacks


def read_shared(groups: Sequence[TargetGroup]) -> SharedIntents:
    """The drains and trust requests kept on the groups. IntentTagsError when no group's tags
    could be read (then nobody knows them, and the caller falls back on the cache)."""
    from hpodlb.targets import TargetsError

    read = SharedIntents(Intents(shared=True))
    for group in groups:
        try:
            read.tags[group.arn] = group.tags()
        except TargetsError as exc:
            read.unread[group.name] = str(exc)
    if not read.tags:
        raise IntentTagsError(
            "cannot read the drains and trust requests kept on the target groups: "
            + "; ".join(read.unread.values())
        )
    each = [intents_of_tags(tags) for tags in read.tags.values()]
    for one in each:
        read.intents.drain.update(one.drain)
        read.intents.trust.update(one.trust)
    read.disagree = sorted(
        ip for ip in read.intents.drain if any(ip not in one.drain for one in each)
    )
    return read


def update_intents(
    state_dir: Path,
    change: Callable[[Intents], None],
    groups: Sequence[TargetGroup] = (),
) -> Intents:
    """Read, change and write the intents under their lock; returns what was written. With
    `groups` the tags of each are the record (and intents.json its cache): the change is
    written to every group, or refused before any write when one cannot take it (unreadable, or
    past AWS's 50 tags), so a drain is never half recorded without saying so. Without groups (or
    when the file is gone but the daemon's last pass had drains) the file is the record, and
    remembered drains are put back first: whoever writes next must not erase them."""
    with _locked(state_dir):
        cached = load_intents(state_dir)
        if not groups:
            if not intents_path(state_dir).exists():
                _restore_drains(state_dir, cached)
            change(cached)
            cached.shared = False  # not in the tags: carried there by the next pass that can
            _write_cache(state_dir, cached)
            return cached
        shared = read_shared(groups)
        if shared.unread:
            raise IntentTagsError(
                "cannot change the drains and trust requests kept on the target groups, one "
                "cannot be read: " + "; ".join(shared.unread.values())
            )
        intents = shared.intents
        carried = _carry(cached, intents)
        change(intents)
        _write_tags(groups, shared, intent_tags(intents))
        if carried:
            log.warning(
                "intents_carried_to_tags",
                drained=sorted(cached.drain),
                trusted=sorted(cached.trust),
                why="intents.json was written before the target groups' tags kept them",
            )
        _write_cache(state_dir, intents)
        return intents


def cache_intents(state_dir: Path, intents: Intents) -> None:
    """Keep what the tags said as this head's cache (used when they cannot be read)."""
    with _locked(state_dir):
        try:
            if load_intents(state_dir) == intents:
                return
        except IntentsError as exc:  # unusable: replaced by what the tags hold
            log.warning("intents_cache_replaced", error=str(exc), why="the tags hold the record")
        _write_cache(state_dir, intents)


def needs_carrying(state_dir: Path) -> bool:
    """An intents.json from before the tags, with drains or trust requests in it."""
    try:
        cached = load_intents(state_dir)
    except IntentsError:
        return False
    return not cached.shared and bool(cached.drain or cached.trust)


def _carry(cached: Intents, intents: Intents) -> bool:
    """An old cache's drains and trust requests into the tags' (theirs win where both have one)."""
    if cached.shared or not (cached.drain or cached.trust):
        return False
    for ip, drain in cached.drain.items():
        intents.drain.setdefault(ip, drain)
    for ip, trust in cached.trust.items():
        intents.trust.setdefault(ip, trust)
    return True


def _ours(tags: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in tags.items() if k.startswith((DRAIN_PREFIX, TRUST_PREFIX))}


def _write_tags(
    groups: Sequence[TargetGroup], shared: SharedIntents, wanted: dict[str, str]
) -> None:
    """Each group's tags brought to `wanted`: all checked first, then written. A group that
    would hold more tags than AWS allows refuses the whole change, naming it."""
    from hpodlb.targets import TargetsError

    work = []
    for group in groups:
        now = shared.tags[group.arn]
        gone = sorted(set(_ours(now)) - set(wanted))
        new = {k: v for k, v in wanted.items() if now.get(k) != v}
        count = len(now) - len(gone) + len(set(new) - set(now))
        if count > TAGS_PER_GROUP:
            raise IntentTagsError(
                f"{group.name}: would hold {count} tags, and AWS allows {TAGS_PER_GROUP} per "
                f"target group (hpodlb keeps one per drain and per trust request; "
                f"{len(now) - len(_ours(now))} are others'): nothing changed; undrain a node or "
                "remove other tags from the group"
            )
        work.append((group, gone, new))
    failed, kept = [], False
    for group, gone, new in work:
        try:
            group.remove_tags(gone)
        except TargetsError as exc:
            failed.append(_tag_failure(group, exc))
            kept = True  # what it still holds is still in force (the union)
            continue
        try:
            group.add_tags(new)
        except TargetsError as exc:
            failed.append(_tag_failure(group, exc))
    if failed and (kept or len(failed) == len(work)):
        raise IntentTagsError(
            "not changed on every target group (a drain kept on any group holds): "
            + "; ".join(failed)
        )
    if failed:  # recorded on the others: the union keeps it in force
        log.warning("intent_tags_partly_written", error="; ".join(failed))


def _tag_failure(group: TargetGroup, exc: Exception) -> str:
    """What a failed tag write says; AWS's TooManyTags (its own count, which moto puts at 10)
    names the way out."""
    if getattr(exc, "code", "") == "TooManyTags":
        return (
            f"{group.name}: AWS refused another tag (TooManyTags; hpodlb keeps one per drain and "
            "per trust request): undrain a node or remove other tags from the group"
        )
    return str(exc)


def _write_cache(state_dir: Path, intents: Intents) -> None:
    write_atomically(
        intents_path(state_dir), intents.model_dump_json(indent=1).encode(), mode=0o600
    )


def _restore_drains(state_dir: Path, intents: Intents) -> None:
    """The daemon's copy of the drains, kept in the state file, back into `intents`."""
    remembered = load_state(state_dir)[0].drains
    if remembered:
        intents.drain.update(remembered)
        get_logger("hpodlb.intents").warning(
            "drain_intents_restored",
            drained=sorted(remembered),
            source="the state file's copy (intents.json was gone)",
        )


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(
        state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
