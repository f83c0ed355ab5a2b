"""Load: 200 recipient sessions browsing studies for 60 s while one client hammers /access/
with wrong codes, against gunicorn on PostgreSQL and Redis (tests.bench.loadgen does the work,
in a process of its own: locust patches the standard library for gevent).

Figures, absolute: requests per second, p50/p95/p99 of each kind of request, errors, how many
attempts the brute-force client makes before it is locked out, and the rendered frame's p95
in a second phase without the attacker, for comparison.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.bench.common import Result

ROOT = Path(__file__).resolve().parents[2]


def run(*, seconds: float = 60.0, sessions: int = 200) -> list[Result]:
    database = os.environ.get("DATABASE_URL", "")
    if not database.startswith(("postgres://", "postgresql://")) or not os.environ.get("REDIS_URL"):
        print(
            "load: not run: it needs PostgreSQL and Redis, as production has them "
            "(DATABASE_URL=postgres://… REDIS_URL=redis://…)"
        )
        return [Result("load: not run (needs DATABASE_URL and REDIS_URL)", 1, None, 0, "")]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.bench.loadgen",
            "--seconds",
            str(seconds),
            "--sessions",
            str(sessions),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    last = ""
    for line in process.stdout:
        if last:
            print(last, end="", flush=True)
        last = line
    if process.wait() != 0:
        raise RuntimeError(f"the load scenario failed (exit status {process.returncode})")
    return [Result(**fields) for fields in json.loads(last)]
