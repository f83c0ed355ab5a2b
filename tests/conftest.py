"""Fixtures shared by the whole suite.

The DICOM backbone: one Orthanc per test session, loaded with synthetic studies, and one portal
storage SCP (the real `studies.dimse.storescp.StorageServer`, in this process) that Orthanc knows
as a C-MOVE destination. Orthanc reads its configuration once, so the SCP's port is chosen first.

Tests that let the storage SCP write (C-MOVE, storescu) need
`@pytest.mark.django_db(transaction=True)`: the SCP's threads have their own database
connections and only see committed rows.
"""

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import translation
from pydicom.uid import JPEGLSLossless

from studies import services
from studies.demo import synthetic
from studies.dimse.storescp import StorageServer
from studies.models import PacsNode
from tests.support import free_port
from tests.support.orthanc import OrthancServer

# Fixtures of the recipient-access tests (shares, one-time codes); their helpers are imported
# by name from the module.
pytest_plugins = ["tests.support.access"]

# Who the tests' dcmtk peers claim to be when they send to the portal's storage SCP.
MODALITY_AE = "MODALITY"


@pytest.fixture(scope="session")
def django_db_modify_db_settings(
    django_db_modify_db_settings_parallel_suffix: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each test run gets a test database of its own, so that two runs at once (two
    developers on one machine, a run beside the benchmark) never create, flush or drop each
    other's. SQLite's is a file (never in memory: the storage SCP's threads and the worker
    process open their own connections to it)."""
    database = settings.DATABASES["default"]
    test = database.setdefault("TEST", {})
    if database["ENGINE"] == "django.db.backends.sqlite3":
        test["NAME"] = str(tmp_path_factory.getbasetemp() / "test.sqlite3")
    else:
        test["NAME"] = f"test_{database['NAME']}_{os.getpid()}"


@pytest.fixture(autouse=True)
def default_language() -> Iterator[None]:
    """Each test starts in the default language: a request in French through the test client
    leaves French active in this thread (LocaleMiddleware activates, nothing deactivates), and
    a later test's messages would be French."""
    translation.activate(settings.LANGUAGE_CODE)
    yield
    translation.activate(settings.LANGUAGE_CODE)


@pytest.fixture(autouse=True)
def portal_settings(settings, tmp_path: Path):
    """Every test gets its own store, no retry delays and short network waits."""
    settings.STORE_DIR = tmp_path / "store"
    # The floor of free space is tested on its own; elsewhere a nearly full build disk must
    # not make every store fail.
    settings.STORE_MIN_FREE_BYTES = 0
    settings.RETRIEVAL_MAX_RETRIES = 0
    settings.RETRIEVAL_RETRY_BACKOFF = 0
    settings.DICOM_CONNECT_TIMEOUT = 5.0
    settings.DICOM_DIMSE_TIMEOUT = 30.0
    settings.DICOM_NETWORK_TIMEOUT = 30.0
    settings.DICOMWEB_TIMEOUT = 30.0
    return settings


@dataclass
class SyntheticStudy:
    """A study as it was loaded into the PACS."""

    uid: str
    patient_name: str
    patient_id: str
    charset: str
    # SOP Instance UID → the Part 10 file uploaded to Orthanc.
    files: dict[str, bytes] = field(default_factory=dict)
    # Series Instance UID → (modality, number of instances, transfer syntax UID).
    series: dict[str, tuple[str, int, str]] = field(default_factory=dict)

    @property
    def instance_count(self) -> int:
        return len(self.files)


def synthetic_study(
    *,
    patient_name: str,
    patient_id: str,
    charset: str,
    modalities: tuple[tuple[str, int], ...],
    compress_series: int | None = None,
    rows: int = 64,
    columns: int = 64,
) -> SyntheticStudy:
    datasets = synthetic.make_study(
        patient_name=patient_name,
        patient_id=patient_id,
        charset=charset,
        modalities=modalities,
        compress_series=compress_series,
        compression=JPEGLSLossless,
        rows=rows,
        columns=columns,
    )
    study = SyntheticStudy(
        uid=str(datasets[0].StudyInstanceUID),
        patient_name=patient_name,
        patient_id=patient_id,
        charset=charset,
    )
    for ds in datasets:
        study.files[str(ds.SOPInstanceUID)] = synthetic.to_bytes(ds)
        uid = str(ds.SeriesInstanceUID)
        modality, count, syntax = study.series.get(
            uid, (str(ds.Modality), 0, str(ds.file_meta.TransferSyntaxUID))
        )
        study.series[uid] = (modality, count + 1, syntax)
    return study


@dataclass
class PacsStudies:
    # CT + MR (the MR series in JPEG-LS lossless), Specific Character Set ISO_IR 100.
    latin1: SyntheticStudy
    # CT + MR, ISO_IR 192, a name Latin-1 cannot encode.
    utf8: SyntheticStudy


@pytest.fixture(scope="session")
def portal_ae_title() -> str:
    return str(settings.DICOM_AE_TITLE)


@pytest.fixture(scope="session")
def storage_scp(portal_ae_title: str) -> Iterator[StorageServer]:
    """The portal's storage SCP, listening on 127.0.0.1 for the whole session."""
    server = StorageServer(ae_title=portal_ae_title, host="127.0.0.1", port=free_port())
    # Tests add and remove nodes all the time: read them at every association.
    server.nodes.refresh_seconds = 0
    server.start(block=False)
    yield server
    server.stop()


def scp_port(server: StorageServer) -> int:
    return int(server.address[1])


@pytest.fixture(scope="session")
def orthanc(storage_scp: StorageServer, portal_ae_title: str) -> Iterator[OrthancServer]:
    """The PACS: it knows the portal's storage SCP as a move destination, and it refuses
    associations addressed to another AE title than its own."""
    server = OrthancServer(
        aet="ORTHANC",
        modalities={"portal": (portal_ae_title, "127.0.0.1", scp_port(storage_scp))},
        config={"DicomCheckCalledAet": True},
    )
    with server:
        yield server


@pytest.fixture(scope="session")
def pacs_studies(orthanc: OrthancServer) -> PacsStudies:
    studies = PacsStudies(
        latin1=synthetic_study(
            patient_name="Müller^Hélène",
            patient_id="PAT-LATIN1",
            charset="ISO_IR 100",
            modalities=(("CT", 4), ("MR", 3)),
            compress_series=1,
        ),
        utf8=synthetic_study(
            patient_name="Łukasiewicz^Zoë^Ærøe",
            patient_id="PAT-UTF8",
            charset="ISO_IR 192",
            modalities=(("CT", 3), ("MR", 2)),
        ),
    )
    for study in (studies.latin1, studies.utf8):
        orthanc.upload_many(study.files.values())
    return studies


@pytest.fixture
def orthanc_node(orthanc: OrthancServer) -> PacsNode:
    """The Orthanc PACS as a configured node (C-MOVE; tests switch the method as they need).
    Needs a database mark on the test."""
    return services.pacs_node_create(
        name="orthanc",
        ae_title=orthanc.aet,
        host=orthanc.host,
        port=orthanc.dicom_port,
        dicomweb_url=orthanc.dicomweb_url,
        retrieve_method=PacsNode.Retrieve.MOVE,
    )


@pytest.fixture
def modality_node() -> PacsNode:
    """A modality on 127.0.0.1 allowed to push to the storage SCP as MODALITY_AE."""
    return services.pacs_node_create(
        name="modality", ae_title=MODALITY_AE, host="127.0.0.1", port=104
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll until `predicate()` holds: for what another thread or process finishes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached within {timeout} s")


def store_problems() -> list[str]:
    """Where the store and its index disagree: temporary files left behind, indexed files
    missing or differing from the index (size, data set SHA-256), files nobody indexed."""
    import hashlib

    from studies import dicom
    from studies.models import Instance
    from studies.store import store_dir

    root = store_dir()
    files = {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()
    problems = [f"left over: {p.relative_to(root)}" for p in sorted(files) if p.suffix != ".dcm"]
    indexed = set()
    for instance in Instance.objects.all():
        path = root / instance.file_path
        indexed.add(path)
        if not path.is_file():
            problems.append(f"indexed but missing: {instance.file_path}")
            continue
        data = path.read_bytes()
        if len(data) != instance.size:
            problems.append(f"size differs from the index: {instance.file_path}")
        elif hashlib.sha256(data[dicom.dataset_offset(data) :]).hexdigest() != instance.sha256:
            problems.append(f"content differs from the index: {instance.file_path}")
    problems += [
        f"not indexed: {p.relative_to(root)}" for p in sorted(files - indexed) if p.suffix == ".dcm"
    ]
    return problems


def assert_store_consistent(timeout: float = 10.0) -> None:
    """The store and its index agree, at once or within `timeout` seconds: the storage SCP
    may still be finishing (indexing, cleaning up) what a peer sent just before."""
    deadline = time.monotonic() + timeout
    while (problems := store_problems()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert problems == [], problems
