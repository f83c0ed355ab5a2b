"""What the benchmarks share: the printed line of each figure and the throwaway database."""

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HEADER = f"{'benchmark':<52} {'portal':>9} {'anchor':>9} {'ratio':>7} {'target':>7}"


def _amount(value: float, unit: str) -> str:
    decimals = {"s": 3, "ms": 2}.get(unit, 0)
    return f"{value:>{9 - len(unit)}.{decimals}f}{unit}"


@dataclass
class Result:
    """One figure. With an anchor, the ratio portal / anchor is held to `target` (lower is
    better); without one (`anchor` None), the portal's own value is, in `unit`."""

    name: str
    portal: float
    anchor: float | None
    target: float | None  # None: a figure for information, with no target
    unit: str = "s"

    @property
    def ratio(self) -> float | None:
        return None if self.anchor is None else self.portal / self.anchor

    @property
    def met(self) -> bool:
        if self.target is None:
            return True
        ratio = self.ratio
        return (self.portal if ratio is None else ratio) <= self.target

    def line(self) -> str:
        ratio = self.ratio
        if self.target is None:
            target = "info"
        elif ratio is None:
            target = f"≤{self.target:g}{self.unit}"
        else:
            target = "≤" + format(self.target, ".1f")
        anchor = "" if self.anchor is None else _amount(self.anchor, self.unit)
        return (
            f"{self.name:<52} {_amount(self.portal, self.unit)} {anchor:>9} "
            f"{'—' if ratio is None else format(ratio, '.2f'):>7} {target:>7}"
            f"{'' if self.met else '  (not met)'}"
        )


def database(workdir: Path, label: str) -> tuple[str, str | None]:
    """The portal's database for a benchmark: a throwaway PostgreSQL database when
    DATABASE_URL points at PostgreSQL (the production configuration), else SQLite in the work
    folder. Returns its URL and, for PostgreSQL, the name to drop afterwards."""
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://")):
        name = f"portal_bench_{label}_{os.getpid()}"
        base = url.rsplit("/", 1)[0]
        subprocess.run(
            ["psql", url, "-qc", f"CREATE DATABASE {name}"], check=True, capture_output=True
        )
        return f"{base}/{name}", name
    return f"sqlite:///{workdir / 'bench.sqlite3'}", None


def drop_database(url: str, name: str | None) -> None:
    """Drop what `database` created; `url` is the server's DATABASE_URL it was given."""
    if name:
        subprocess.run(["psql", url, "-qc", f"DROP DATABASE IF EXISTS {name}"], capture_output=True)


def settle() -> None:
    """Let the disk finish the previous run's writes and deletions before timing the next:
    on some file systems creating a file waits for them, which would penalise whichever side
    runs right after a clean-up."""
    os.sync()
    time.sleep(0.5)
