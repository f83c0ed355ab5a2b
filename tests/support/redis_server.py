"""A private redis-server on a free loopback port, persistent as the README asks production to
run the broker: `appendonly yes`, `appendfsync always`.

For tests that stop and restart the broker: the machine's own Redis is shared with other runs.
The data folder outlives a restart (and a SIGKILL): the append-only file is what brings the
queued messages back. (With `appendfsync everysec`, Redis may hold back its writes for up to two
seconds while the disk is busy: a crash then loses the messages of those seconds.)
"""

import signal
import subprocess
import time
from pathlib import Path

import redis

from tests.support import Service, free_port, terminate

REDIS_SERVER = "/usr/bin/redis-server"


class RedisServerError(RuntimeError):
    """redis-server did not start."""


class RedisServer(Service):
    """`redis-server` with `appendonly yes` and `appendfsync always` in `workdir`."""

    def __init__(self, *, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> "RedisServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisServerError(f"redis-server exited at start-up:\n{self.log()}")
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RedisServerError(f"redis-server did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        terminate(self.process, signal.SIGTERM, 10.0)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: no shutdown save, as a crash or an OOM kill would leave it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def log(self) -> str:
        try:
            return (self.workdir / "redis.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""
