"""The fixture files, and the figures the reliability tests print at the end of a run."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FIGURES: dict[str, str] = {}
