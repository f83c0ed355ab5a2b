"""Test servers and peers shared by the test suite, the demo runner and the benchmark.

Nothing here depends on pytest: `python -m tests.bench` uses the same Orthanc and dcmtk helpers.
"""

import signal
import socket
import subprocess
from types import TracebackType
from typing import Self


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def terminate(
    process: "subprocess.Popen[bytes] | subprocess.Popen[str] | None",
    sig: int = signal.SIGTERM,
    timeout: float = 10.0,
) -> None:
    """Stop a server process with `sig`, then SIGKILL if it lingers past `timeout`."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Service:
    """A test server started and stopped around a `with` block: each subclass (Orthanc, a
    dcmtk storescp, a Celery worker, a TCP relay) says how it starts and stops."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
