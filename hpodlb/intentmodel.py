"""The admin's intents as data: `keys trust` requests and drains, as intents.json holds them.

Only the shapes. Reading and writing the file, under its lock, is `intents.py`; the state file
keeps a copy of the drains in force (`state.py`), and both import the shapes from here, so that
neither has to import the other's module to know what a drain is.
"""

from __future__ import annotations

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
