"""The docs an admin reads: a short README, links that lead somewhere, and a reference that names
every command and configuration key there is."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from hpodlb.cli import COMMANDS
from hpodlb.commandline import build_parser
from hpodlb.config import Config

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """The file without its fenced code blocks (a `## ` or `[x](y)` inside one is not markdown)."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the file's headings."""
    titles = re.findall(r"^#+ (.+)$", prose(path), re.M)
    return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in titles}


def test_every_link_between_the_docs_resolves() -> None:
    """Each relative link in the README, the changelog and docs/ names a file that exists, and
    each #anchor a heading of that file."""
    broken = []
    for doc in DOCS:
        for target in LINK.findall(prose(doc)):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            name, _, anchor = target.partition("#")
            path = (doc.parent / name).resolve() if name else doc
            if not path.exists() or (anchor and anchor not in anchors(path)):
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert broken == []


def test_the_readme_is_short_and_starts_with_the_two_commands() -> None:
    """At most 250 lines; its first command block is `./dev demo` and `./dev test`, the command
    CI runs; no per-run test counts anywhere in the docs (they are stale the next day)."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert first
    assert [line.split()[:2] for line in first.group(1).splitlines()] == [
        ["./dev", "demo"],
        ["./dev", "test"],
    ]
    assert "\n./dev test\n" in (REPO / ".ci" / "run").read_text()
    for doc in DOCS:
        assert not re.search(r"\b\d+ (passed|failed)\b|\b\d+ tests\b", doc.read_text()), doc


def test_the_reference_names_every_command_and_key() -> None:
    """docs/reference.md's command table has a row for each command and `keys` action, and its
    configuration section names every section and key of the config."""
    reference = (REPO / "docs" / "reference.md").read_text()
    rows = re.findall(r"^\| `hpodlb ([a-z-]+(?: [a-z-]+)?)", reference, re.M)

    def commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
        found = []
        for action in parser._actions:  # argparse keeps its subcommands here
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    nested = commands(sub, f"{prefix}{name} ")
                    found += nested or [f"{prefix}{name}"]
        return found

    assert sorted(commands(build_parser(COMMANDS))) == sorted(r for r in rows if r != "--version")
    configuration = reference.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    for name, field in Config.model_fields.items():
        assert f"`[{name}]`" in configuration or f"`[[{name}]]`" in configuration, name
        for key in field.annotation.model_fields if name != "target_groups" else ("arn", "port"):  # type: ignore[union-attr]
            assert f"`{key}`" in configuration, f"{name}.{key}"
