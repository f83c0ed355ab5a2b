"""A private PostgreSQL cluster (initdb into a temporary folder) on a free loopback port.

For tests that restart the database server under the portal's processes: the machine's own
PostgreSQL is shared with other runs. initdb refuses to run as root: as root, the cluster
belongs to the `postgres` system user.
"""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support import Service, free_port


class PostgresClusterError(RuntimeError):
    """The cluster could not be created or started."""


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise PostgresClusterError(f"no PostgreSQL {name} under /usr/lib/postgresql")
    return found[-1]


class PostgresCluster(Service):
    """initdb (trust authentication, loopback only) then `pg_ctl start`; `restart()` is a
    fast shutdown and a start: every open connection is cut."""

    def __init__(self) -> None:
        # Not under pytest's temporary folder: the postgres user must be able to reach it.
        self.workdir = Path(tempfile.mkdtemp(prefix="portal-pg-"))
        self.data_dir = self.workdir / "data"
        self.port = free_port()
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/portal"
        self._user = "postgres" if os.geteuid() == 0 else None
        self.started = False

    def _run(self, *command: str) -> None:
        if self._user is not None:
            command = ("runuser", "-u", self._user, "--", *command)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise PostgresClusterError(
                f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}\n{self.log()}"
            )

    def start(self) -> "PostgresCluster":
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.workdir, entry.pw_uid, entry.pw_gid)
        if not self.data_dir.exists():
            self._run(
                _bin("initdb"), "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
                "--no-sync", "-E", "UTF8",
            )  # fmt: skip
        self._run(
            _bin("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.workdir / "server.log"),
            "-w", "-t", "30",
            "-o", f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )  # fmt: skip
        self.started = True
        return self

    def create_database(self, name: str = "portal") -> None:
        self._run(_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)

    def stop(self) -> None:
        if self.started:
            self._run(_bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
            self.started = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.workdir / "server.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
