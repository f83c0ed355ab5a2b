"""Test servers and peers shared by the test suite, the demo runner and the benchmark.

Nothing here depends on pytest: `python -m tests.bench` uses the same Orthanc and dcmtk helpers.
"""

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
