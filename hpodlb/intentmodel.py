"""The admin's intents as data: `keys trust` requests and drains, as intents.json holds them.

Only the shapes. Reading and writing the file, under its lock, is `intents.py`; the state file
keeps a copy of the drains in force (`state.py`), and both import the shapes from here, so that
neither has to import the other's module to know what a drain is.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel


class TrustRequest(BaseModel):
    instance_id: str
    keys: list[str]  # the `algo base64` lines the node presented when the admin accepted them
    requested_at: float


class DrainRequest(BaseModel):
    reason: str
    force: bool = False  # past min_in_service and max_deregister_fraction
    instance_id: str = ""  # the instance at the IP when it was drained, for people
    requested_at: float = 0
    requested_by: str = ""


class Intents(BaseModel):
    trust: dict[str, TrustRequest] = {}
    drain: dict[str, DrainRequest] = {}
    # False: written before intents were kept as target group tags; its drains and trust
    # requests are carried into the tags once (`intents.py`), then it is a cache of them.
    shared: bool = False


# -- the intents as target group tags ------------------------------------------------------------
# One tag per drained IP and one per trust request, so that a drain made or undone on one head
# changes one key, never a blob another head may be rewriting at the same time. A tag value holds
# at most 256 characters of letters, digits, spaces and `_.:/=+-@` (the set every AWS service
# accepts): other characters are written `=HH` (UTF-8 bytes, `=` itself as `=3D`), a reason too
# long is cut (the drain is the key; the reason is for people). A trust request keeps the SHA256
# fingerprints of the keys, not the keys (a 4096-bit RSA line alone is ~720 characters).

DRAIN_PREFIX = "hpodlb:drain:"
TRUST_PREFIX = "hpodlb:trust:"
TAG_VALUE_MAX = 256
TAG_KEY_MAX = 128
TAGS_PER_GROUP = 50  # AWS's limit per target group, other tags included
_PLAIN = frozenset("_.:/+-@ ")
CUT = "..."


def escape_tag_text(text: str, *, word: bool = False) -> str:
    """`text` in the characters a tag value may hold; readable when it is plain. `word`: spaces
    escaped too (a field other than the last)."""
    out = []
    for ch in text:
        if (ch.isascii() and ch.isalnum()) or (ch in _PLAIN and not (word and ch == " ")):
            out.append(ch)
        else:
            out.extend(f"={b:02X}" for b in ch.encode())
    return "".join(out)


def unescape_tag_text(text: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "=" and _is_hex(text[i + 1 : i + 3]):
            raw.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(text[i].encode())
            i += 1
    return raw.decode(errors="replace")


def _is_hex(pair: str) -> bool:
    return len(pair) == 2 and all(c in "0123456789ABCDEFabcdef" for c in pair)


def drain_tag(ip: str, drain: DrainRequest) -> tuple[str, str]:
    """(key, value) of one drain: `hpodlb:drain:IP` = `f=0 t=EPOCH i=INSTANCE b=WHO r=REASON`."""
    head = (
        f"f={int(drain.force)} t={drain.requested_at!r} "
        f"i={escape_tag_text(drain.instance_id, word=True)} "
        f"b={escape_tag_text(drain.requested_by, word=True)} r="
    )
    reason = escape_tag_text(drain.reason)
    room = TAG_VALUE_MAX - len(head)
    if len(reason) > room:
        reason = reason[: room - len(CUT)]
        cut = reason.rfind("=", len(reason) - 2)  # never half of an `=HH`
        reason = (reason[:cut] if cut >= 0 else reason) + CUT
    return DRAIN_PREFIX + ip, head + reason


def trust_tag(ip: str, trust: TrustRequest) -> tuple[str, str]:
    """(key, value) of one trust request: `hpodlb:trust:IP` = `t=EPOCH i=INSTANCE SHA256:...`."""
    from hpodlb.keystore import fingerprint

    prints = sorted(k if k.startswith("SHA256:") else fingerprint(k) for k in trust.keys)
    value = " ".join(
        [f"t={trust.requested_at!r}", f"i={escape_tag_text(trust.instance_id, word=True)}"]
    )
    return TRUST_PREFIX + ip, " ".join([value, *prints])


def intent_tags(intents: Intents) -> dict[str, str]:
    """Every drain and trust request as the tags that keep it."""
    tags = dict(drain_tag(ip, d) for ip, d in intents.drain.items())
    tags.update(trust_tag(ip, t) for ip, t in intents.trust.items())
    return tags


def intents_of_tags(tags: Mapping[str, str]) -> Intents:
    """The drains and trust requests a group's tags keep; other tags are not ours. A drain tag
    whose value cannot be read is still a drain (its key says which node)."""
    intents = Intents(shared=True)
    for key, value in tags.items():
        if key.startswith(DRAIN_PREFIX):
            intents.drain[key[len(DRAIN_PREFIX) :]] = _drain_of(value)
        elif key.startswith(TRUST_PREFIX):
            trust = _trust_of(value)
            if trust is not None:
                intents.trust[key[len(TRUST_PREFIX) :]] = trust
    return intents


def _fields(value: str, last: str) -> dict[str, str]:
    """`k=v` words; the `last` field takes the rest of the value, spaces and all."""
    head, sep, rest = value.partition(f" {last}=")
    found = dict(w.split("=", 1) for w in head.split() if "=" in w)
    if sep:
        found[last] = rest
    return found


def _drain_of(value: str) -> DrainRequest:
    found = _fields(value, "r")
    try:
        when = float(found.get("t", "0"))
    except ValueError:
        when = 0
    return DrainRequest(
        reason=unescape_tag_text(found.get("r", "")) or f"(unreadable tag value: {value[:40]})",
        force=found.get("f") == "1",
        instance_id=unescape_tag_text(found.get("i", "")),
        requested_at=when,
        requested_by=unescape_tag_text(found.get("b", "")),
    )


def _trust_of(value: str) -> TrustRequest | None:
    words = value.split()
    found = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("SHA256:"))
    prints = [w for w in words if w.startswith("SHA256:")]
    if not prints or not found.get("i"):
        return None  # approves nothing it cannot name
    try:
        when = float(found.get("t", "0"))
    except ValueError:
        when = 0
    return TrustRequest(instance_id=unescape_tag_text(found["i"]), keys=prints, requested_at=when)
