"""A throwaway Orthanc: the PACS of the integration tests and of the benchmark.

Each `OrthancServer` runs /usr/sbin/Orthanc with its own storage folder and a generated
configuration, on free loopback ports, with the DICOMweb plugin. Orthanc reads its
configuration once at start-up, so every DICOM peer it must know (the portal's storage SCP,
a dcmtk storescp…) is given to the constructor.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

from tests.support import Service, free_port, terminate

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class OrthancError(RuntimeError):
    """Orthanc did not start, or refused a request the tests rely on."""


class OrthancServer(Service):
    """Orthanc on 127.0.0.1, as a context manager.

    `modalities` maps a name to (AE title, host, port): the peers Orthanc may send to (C-MOVE
    destinations) and accept queries from. `config` overrides or adds configuration options,
    e.g. {"DicomCheckCalledAet": True}.
    """

    def __init__(
        self,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        config: dict[str, Any] | None = None,
        workdir: Path | None = None,
        start_timeout: float = 30.0,
        verbose: bool = False,
    ) -> None:
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.extra_config = dict(config or {})
        self.start_timeout = start_timeout
        self.verbose = verbose
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="orthanc-"))
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.http = requests.Session()
        self.http.trust_env = False  # never a proxy between us and 127.0.0.1

    # --- addresses ------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    # --- life cycle -----------------------------------------------------------------------
    def configuration(self) -> dict[str, Any]:
        storage = self.workdir / "storage"
        config: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpCompressionEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            # Orthanc 1.10 answers C-FIND in this encoding whatever the query asks for: Latin-1
            # (its default) would drop the letters of a name that Latin-1 cannot spell.
            "DefaultEncoding": "Utf8",
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "DicomModalitiesInDatabase": False,
            "DicomScuTimeout": 10,
            # Close associations to move destinations at once: a test that checks the
            # storage SCP should not find Orthanc's association from the previous test.
            "DicomAssociationCloseDelay": 0,
            "MaximumPduLength": 131072,
            "SynchronousCMove": True,
            "SaveJobs": False,
            "MetricsEnabled": False,
            "OverwriteInstances": True,
            "StableAge": 1,
        }
        config.update(self.extra_config)
        return config

    def start(self) -> "OrthancServer":
        if self.process is not None:
            raise OrthancError("this Orthanc is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.configuration(), indent=2))
        log = self.log_path.open("ab")
        command = [ORTHANC, *(["--verbose"] if self.verbose else []), str(config_path)]
        self.process = subprocess.Popen(
            command,
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OrthancError(f"Orthanc exited at start-up:\n{self.log_tail()}")
            try:
                if self.http.get(f"{self.url}/system", timeout=2).ok and self._dicom_ready():
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.kill()
        raise OrthancError(
            f"Orthanc did not answer within {self.start_timeout} s:\n{self.log_tail()}"
        )

    def _dicom_ready(self) -> bool:
        import socket

        try:
            with socket.create_connection((self.host, self.dicom_port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Orthanc gracefully (SIGTERM), then forcefully if it lingers."""
        terminate(self.process, signal.SIGTERM, timeout)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: the PACS vanishes mid-conversation, as a crashed server would."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        super().__exit__(exc_type, exc, tb)
        self.cleanup()

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # --- REST -----------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        response = self.http.request(method, f"{self.url}{path}", **kwargs)
        if not response.ok:
            raise OrthancError(
                f"{method} {path}: HTTP {response.status_code} {response.text[:300]}"
            )
        return response

    def upload(self, data: bytes | str | Path) -> dict[str, Any]:
        """Store one Part 10 file (bytes or a path) through the REST API; Orthanc's answer
        has the instance's Orthanc ID ("ID") and its "ParentStudy"."""
        body = Path(data).read_bytes() if isinstance(data, str | Path) else data
        answer = self._request(
            "POST", "/instances", data=body, headers={"Content-Type": "application/dicom"}
        ).json()
        if answer.get("Status") not in {"Success", "AlreadyStored"}:
            raise OrthancError(f"Orthanc did not store the instance: {answer}")
        return dict(answer)

    def upload_many(self, items: Iterable[bytes | str | Path]) -> list[dict[str, Any]]:
        return [self.upload(item) for item in items]

    def study_id(self, study_uid: str) -> str:
        """Orthanc's own ID of a study, from its Study Instance UID."""
        matches = self._request("POST", "/tools/lookup", data=study_uid).json()
        for match in matches:
            if match.get("Type") == "Study":
                return str(match["ID"])
        raise OrthancError(f"Orthanc has no study {study_uid}")

    def study_instances(self, study_uid: str) -> dict[str, str]:
        """SOP Instance UID → Orthanc instance ID, for every instance of a study."""
        study = self.study_id(study_uid)
        instances = self._request("GET", f"/studies/{study}/instances").json()
        return {item["MainDicomTags"]["SOPInstanceUID"]: item["ID"] for item in instances}

    def instance_file(self, instance_id: str) -> bytes:
        """The Part 10 file of an instance, as Orthanc stores it."""
        return self._request("GET", f"/instances/{instance_id}/file").content

    def study_files(self, study_uid: str) -> dict[str, bytes]:
        """SOP Instance UID → Part 10 file as stored, for every instance of a study."""
        return {
            sop: self.instance_file(orthanc_id)
            for sop, orthanc_id in self.study_instances(study_uid).items()
        }

    def delete_study(self, study_uid: str) -> None:
        self._request("DELETE", f"/studies/{self.study_id(study_uid)}")

    def statistics(self) -> dict[str, Any]:
        return dict(self._request("GET", "/statistics").json())


def main() -> None:
    """Run an Orthanc by hand: `python -m tests.support.orthanc [PORTAL_AE PORTAL_PORT]`."""
    import sys

    modalities = {}
    if len(sys.argv) == 3:
        modalities["portal"] = (sys.argv[1], "127.0.0.1", int(sys.argv[2]))
    with OrthancServer(modalities=modalities) as orthanc:
        print(f"Orthanc {orthanc.aet} DICOM 127.0.0.1:{orthanc.dicom_port}, HTTP {orthanc.url}")
        print(f"DICOMweb {orthanc.dicomweb_url}; log {orthanc.log_path}; Ctrl-C stops it")
        try:
            while orthanc.is_running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
