"""`python -m bench [idle|latency|push|scale|isolation|idle200|cold200|startup|doctor|metrics|all]`: what hpodlb costs, measured side by side.

Run by hand as root on a quiet machine (`./dev bench all`); each measurement prints a table with
the goal beside the figure. Medians of several runs; ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

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
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("what", nargs="*", help=f"any of {', '.join(MEASURES)}, all (default)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (smoke run)")
    args = parser.parse_args()
    names = list(MEASURES) if not args.what or "all" in args.what else args.what
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        parser.error(f"unknown measurement(s): {', '.join(unknown)}")
    # In-process passes (scale) would log every registration: keep the tables readable.
    setup_logging(stream=Path(os.devnull).open("w"))  # noqa: SIM115 - lives as long as the process
    for name in names:
        started = time.monotonic()
        rows = MEASURES[name](quick=args.quick)
        print(f"\n## {name}  ({time.monotonic() - started:.0f} s)")
        print(measures.render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
