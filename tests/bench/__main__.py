"""Run the benchmarks and print each figure as a ratio to its anchor."""

import argparse
import os
import sys

from tests.bench import load, retrieval, viewing
from tests.bench.common import HEADER, Result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each side (median)")
    parser.add_argument("--slices", type=int, default=300, help="slices of the CT study")
    parser.add_argument(
        "--only",
        choices=("retrieval", "viewing", "load"),
        help="run one benchmark (default: all)",
    )
    parser.add_argument(
        "--load-seconds", type=float, default=60.0, help="length of each load phase"
    )
    parser.add_argument(
        "--load-sessions", type=int, default=200, help="recipient sessions in the load phases"
    )
    args = parser.parse_args()
    results: list[Result] = []
    if args.only in (None, "retrieval"):
        environ = dict(os.environ)
        results += retrieval.run(runs=args.runs, slices=args.slices)
        # The retrieval bench points this process at its own (now dropped) database and store.
        os.environ.clear()
        os.environ.update(environ)
    if args.only in (None, "viewing"):
        results += viewing.run(runs=args.runs, slices=args.slices)
    if args.only in (None, "load"):
        results += load.run(seconds=args.load_seconds, sessions=args.load_sessions)
    print()
    print(HEADER)
    failed = False
    for result in results:
        print(result.line())
        failed |= not result.met
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
