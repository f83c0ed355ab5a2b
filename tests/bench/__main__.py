"""Run every benchmark and print its ratio to its anchor."""

import argparse
import sys

from tests.bench import retrieval


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each side (median)")
    parser.add_argument("--slices", type=int, default=300, help="slices of the CT study")
    args = parser.parse_args()
    results = retrieval.run(runs=args.runs, slices=args.slices)
    print()
    print(f"{'benchmark':<52} {'portal':>9} {'anchor':>9} {'ratio':>7} {'target':>7}")
    failed = False
    for result in results:
        print(result.line())
        failed |= not result.met
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
