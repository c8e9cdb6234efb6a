"""`python -m bench [idle|latency|push|scale|isolation|idle200|cold200|startup|doctor|metrics|memory|all]`: what hpodlb costs, measured side by side.

Run by hand as root on a quiet machine (`./dev bench all`); each measurement prints a table with
the goal beside the figure. Medians of several runs; ratios are measured in the same run. A run
also adds its tables to docs/benchmarks.md, newest first, with the date and the machine (cores,
CPU model, Python), so the figures the docs quote are the ones a run wrote, never pasted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import hpodlb
from bench import measures
from hpodlb.logs import setup_logging

MEASURES = {
    "idle": measures.idle,
    "latency": measures.latency,
    "push": measures.push,
    "scale": measures.scale,
    "isolation": measures.isolation,
    "idle200": measures.idle200,
    "cold200": measures.cold200,
    "startup": measures.startup,
    "doctor": measures.doctor,
    "metrics": measures.metrics,
    "memory": measures.memory,
}
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "benchmarks.md"
# Runs go right below this line of docs/benchmarks.md, newest first.
MARKER = "<!-- ./dev bench adds each run below this line, newest first -->"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("what", nargs="*", help=f"any of {', '.join(MEASURES)}, all (default)")
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions and sizes (smoke run; not recorded)"
    )
    parser.add_argument(
        "--no-record", action="store_true", help=f"print only; leave {RESULTS.name} alone"
    )
    args = parser.parse_args()
    names = list(MEASURES) if not args.what or "all" in args.what else args.what
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        parser.error(f"unknown measurement(s): {', '.join(unknown)}")
    # In-process passes (scale) would log every registration: keep the tables readable.
    setup_logging(stream=Path(os.devnull).open("w"))  # noqa: SIM115 - lives as long as the process
    heading = run_heading(names)  # the load before the run, not the load it makes
    tables = []
    for name in names:
        started = time.monotonic()
        rows = MEASURES[name](quick=args.quick)
        tables.append(f"## {name}  ({time.monotonic() - started:.0f} s)\n{measures.render(rows)}")
        print(f"\n{tables[-1]}")
    if not (args.quick or args.no_record):
        record(RESULTS, heading, tables)
        print(f"\nrecorded in {RESULTS.relative_to(REPO)}")
    return 0


def run_heading(names: list[str]) -> str:
    """`### DATE: what, on which machine`: what a reader needs to compare two runs."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    build = f"hpodlb {hpodlb.__version__}" + (f" ({commit})" if commit else "")
    return (
        f"### {when}: {', '.join(names)}\n\n"
        f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, "
        f"load {os.getloadavg()[0]:.2f} at start; {build}"
    )


def record(path: Path, heading: str, tables: list[str]) -> None:
    """Put this run's tables below the marker of `path` (newest first), the rest kept as is."""
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{MARKER}\n"
    if MARKER not in text:
        text = f"{text.rstrip()}\n\n{MARKER}\n"
    run = f"{heading}\n\n```\n" + "\n\n".join(tables) + "\n```\n"
    before, _, after = text.partition(MARKER)
    older = after.strip("\n")
    path.write_text(f"{before}{MARKER}\n\n{run}" + (f"\n{older}\n" if older else ""))


if __name__ == "__main__":
    sys.exit(main())
