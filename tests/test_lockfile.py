"""Installs are reproducible: requirements.lock pins every package with its hashes, and a
change of pyproject.toml's dependencies without `make lock` fails the suite and CI."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from django.conf import settings

BASE_DIR = Path(settings.BASE_DIR)


def check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / ".ci" / "lockfile.py"), "check"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def copy_of_the_project(tmp_path: Path) -> Path:
    (tmp_path / ".ci").mkdir()
    for name in ("pyproject.toml", "requirements.lock", ".ci/lockfile.py"):
        shutil.copy(BASE_DIR / name, tmp_path / name)
    return tmp_path


def test_the_lock_matches_pyproject() -> None:
    result = check(BASE_DIR)

    assert result.returncode == 0, result.stderr


def test_every_locked_package_is_pinned_with_hashes() -> None:
    text = (BASE_DIR / "requirements.lock").read_text()
    # One entry per package: its line, its hashes and pip-compile's "via" comments.
    entries = [e for e in re.split(r"\n(?=\S)", text) if e and not e.startswith("#")]

    assert len(entries) > 20
    for entry in entries:
        assert re.match(r"^[A-Za-z0-9._-]+==[^ ]+ \\", entry), entry
        assert "--hash=sha256:" in entry, entry


def test_a_dependency_added_without_make_lock_fails_the_check(tmp_path: Path) -> None:
    root = copy_of_the_project(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace(
            '"requests>=2.31",', '"requests>=2.31",\n    "left-pad>=1.0",', 1
        )
    )

    result = check(root)

    assert result.returncode == 1
    assert "requirements.lock does not match the dependencies in pyproject.toml" in result.stderr
    assert "make lock" in result.stderr


def test_a_changed_range_fails_the_check_too(tmp_path: Path) -> None:
    root = copy_of_the_project(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"pytest>=8",', '"pytest>=7",', 1))

    assert check(root).returncode == 1


def test_other_changes_to_pyproject_leave_the_lock_valid(tmp_path: Path) -> None:
    root = copy_of_the_project(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("line-length = 100", "line-length = 99"))

    assert check(root).returncode == 0
