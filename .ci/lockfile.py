"""requirements.lock against pyproject.toml.

`make install` installs exactly what requirements.lock names, each file checked against its
hash, so two installs a month apart run the same code. The lock records a digest of the
dependency lists it was made from (requires-python, dependencies, optional dependencies);
`make lock` writes it (`stamp`), and `make test` (so CI) refuses a lock whose digest no longer
matches pyproject.toml (`check`): somebody changed the dependencies without `make lock`.
"""

import hashlib
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
MARK = "# pyproject.toml dependencies sha256: "


def digest() -> str:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    wanted = {
        "requires-python": project.get("requires-python", ""),
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {
            extra: sorted(requirements)
            for extra, requirements in project.get("optional-dependencies", {}).items()
        },
    }
    return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()


def recorded() -> str | None:
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if line.startswith(MARK):
            return line.removeprefix(MARK).strip()
    return None


def stamp() -> None:
    lines = [
        line for line in LOCK.read_text(encoding="utf-8").splitlines() if not line.startswith(MARK)
    ]
    # After pip-compile's header comment, before the first requirement.
    at = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    lines[at:at] = [MARK + digest(), "#"]
    LOCK.write_text("\n".join(lines) + "\n", encoding="utf-8")


def check() -> int:
    if not LOCK.exists():
        print("requirements.lock is missing: run `make lock`.", file=sys.stderr)
        return 1
    if recorded() != digest():
        print(
            "requirements.lock does not match the dependencies in pyproject.toml: run "
            "`make lock` and commit requirements.lock.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "stamp":
        stamp()
    elif command == "check":
        sys.exit(check())
    else:
        sys.exit(f"usage: {sys.argv[0]} stamp|check")
