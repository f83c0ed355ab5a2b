"""dcmtk command-line tools as DICOM peers: each call is bounded by a timeout.

The functions return the CompletedProcess (exit code, stdout and stderr as text) and never
raise on a DICOM failure: the tests assert on what the tool reports. A tool that hangs past its
timeout raises subprocess.TimeoutExpired.
"""

import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.support import Service, free_port, terminate

DEFAULT_TIMEOUT = 60.0


def run(
    tool: str, *args: str, timeout: float = DEFAULT_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, *args],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _peer(host: str, port: int, aet: str, aec: str) -> list[str]:
    return ["-aet", aet, "-aec", aec, host, str(port)]


def echoscu(
    host: str,
    port: int,
    *,
    aet: str,
    aec: str,
    extra: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    return run("echoscu", *extra, *_peer(host, port, aet, aec), timeout=timeout)


def storescu(
    host: str,
    port: int,
    files: Iterable[str | Path],
    *,
    aet: str,
    aec: str,
    extra: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Send files (or folders, with "+sd" in `extra`) to a storage SCP."""
    return run("storescu", *extra, *_peer(host, port, aet, aec), *map(str, files), timeout=timeout)


def findscu(
    host: str,
    port: int,
    keys: dict[str, str],
    *,
    aet: str,
    aec: str,
    level: str = "STUDY",
    extra: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Study-root C-FIND; `keys` maps a keyword or a tag ("0010,0010") to its value."""
    args = ["-S", "-k", f"QueryRetrieveLevel={level}"]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}" if value else key]
    return run("findscu", *extra, *args, *_peer(host, port, aet, aec), timeout=timeout)


def movescu(
    host: str,
    port: int,
    study_uid: str,
    *,
    aet: str,
    aec: str,
    move_destination: str,
    extra: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Study-root C-MOVE of one study to another AE (movescu does not receive it itself)."""
    args = [
        "-S",
        "-aem",
        move_destination,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
    ]
    return run("movescu", *extra, *args, *_peer(host, port, aet, aec), timeout=timeout)


def getscu(
    host: str,
    port: int,
    study_uid: str,
    output_dir: str | Path,
    *,
    aet: str,
    aec: str,
    extra: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Study-root C-GET of one study into a folder."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    args = [
        "-S",
        "-od",
        str(output_dir),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
    ]
    return run("getscu", *extra, *args, *_peer(host, port, aet, aec), timeout=timeout)


class StoreSCP(Service):
    """dcmtk's storescp, writing what it receives under `output_dir`, as a context manager.

    By default it accepts every AE title and every transfer syntax and writes files as
    received ("+B": bit-preserving).
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        extra: Sequence[str] = ("+xa", "+B"),
    ) -> None:
        self.output_dir = Path(output_dir)
        self.aet = aet
        self.port = port or free_port()
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> "StoreSCP":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "storescp",
                "-aet",
                self.aet,
                "-od",
                str(self.output_dir),
                *self.extra,
                str(self.port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_listening(self, self.port, timeout)
        return self

    def stop(self) -> None:
        terminate(self.process)
        self.process = None


class QueryRetrieveSCP(Service):
    """dcmtk's dcmqrscp: a second PACS, independent of Orthanc, as a context manager.

    It keeps what it is sent (C-STORE) in `workdir`, and answers queries and retrievals
    (C-FIND, C-MOVE, C-GET), from and to the AEs of `peers` only: name → (AE title, port), all
    on this machine. Unlike Orthanc it answers an unknown move destination with 0xA801, and
    follows a final response with the list of the instances it could not send.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        peers: dict[str, tuple[str, int]],
        aet: str = "DCMQRSCP",
        extra: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.peers = dict(peers)
        self.aet = aet
        self.extra = list(extra)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def configuration(self) -> str:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        # dcmqrscp matches a peer by the host name its address resolves to, never by the
        # address itself: 127.0.0.1 is "localhost".
        hosts = [f"{name} = ({aet}, localhost, {port})" for name, (aet, port) in self.peers.items()]
        return "\n".join(
            [
                f"NetworkTCPPort = {self.port}",
                "MaxPDUSize = 16384",
                "MaxAssociations = 16",
                "HostTable BEGIN",
                *hosts,
                "HostTable END",
                "VendorTable BEGIN",
                "VendorTable END",
                "AETable BEGIN",
                f"{self.aet} {storage} RW (200, 1024mb) {' '.join(self.peers)}",
                "AETable END",
                "",
            ]
        )

    def start(self, timeout: float = 10.0) -> "QueryRetrieveSCP":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "dcmqrscp.cfg"
        config.write_text(self.configuration())
        with (self.workdir / "dcmqrscp.log").open("ab") as log:
            # One process per association, its default: dcmtk 3.6.7's --single-process mode
            # crashes once its first association ends.
            self.process = subprocess.Popen(
                ["dcmqrscp", "-c", str(config), *self.extra, str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait_listening(self, self.port, timeout)
        return self

    def stop(self) -> None:
        terminate(self.process)
        self.process = None


def _wait_listening(server: "StoreSCP | QueryRetrieveSCP", port: int, timeout: float) -> None:
    import socket

    assert server.process is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{type(server).__name__} exited with {server.process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"{type(server).__name__} did not start listening")
