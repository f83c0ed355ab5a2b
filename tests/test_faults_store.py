"""The store and the storage SCP when things break: a full disk, an index that refuses rows
after the SCP confirmed the instances, a PACS node added while the SCP runs.

Each test breaks the real thing (a small tmpfs for the store, a database trigger refusing
index rows, a node added to the database) and asserts what the sender, the retrieval job and
the store end up with; nothing confirmed is lost, nothing half-written is kept.
"""

import hashlib
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.db import connection
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from pytest_django.fixtures import Settings

from studies import dicom, retrieval, services, tasks
from studies.demo import synthetic
from studies.dimse.storescp import StorageServer
from studies.models import Instance, PacsNode, RetrievalJob
from studies.store import JOURNAL, journal_replay, store_dir
from tests.conftest import MODALITY_AE, assert_store_consistent, scp_port, wait_until
from tests.support import dcmtk, free_port
from tests.support.orthanc import OrthancServer
from tests.support.worker import CeleryWorker

pytestmark = [pytest.mark.dicom, pytest.mark.django_db(transaction=True)]


def dataset_sha256(data: bytes) -> str:
    return hashlib.sha256(data[dicom.dataset_offset(data) :]).hexdigest()


def write_study(folder: Path, *, slices: int, size: int = 16, name: str = "Store^Fault") -> dict:
    """An uncompressed CT study as files (sent as they are); SOP Instance UID → file bytes."""
    datasets = synthetic.make_study(
        patient_name=name, patient_id=name, modalities=(("CT", slices),), rows=size, columns=size
    )
    paths = synthetic.write_study(datasets, folder)
    return {
        str(ds.SOPInstanceUID): path.read_bytes() for ds, path in zip(datasets, paths, strict=True)
    }


def assert_indexed_as_sent(files: dict[str, bytes]) -> None:
    """Every instance is in the index, and its file holds the data set exactly as sent."""
    instances = {i.sop_instance_uid: i for i in Instance.objects.filter(sop_instance_uid__in=files)}
    assert sorted(instances) == sorted(files)
    for uid, data in files.items():
        stored = (store_dir() / instances[uid].file_path).read_bytes()
        assert stored[dicom.dataset_offset(stored) :] == data[dicom.dataset_offset(data) :]
        assert instances[uid].sha256 == dataset_sha256(data)


def journals() -> list[Path]:
    return sorted((store_dir() / JOURNAL).glob("*.log"))


@contextmanager
def association(
    server: StorageServer, *, calling: str = MODALITY_AE, bind: str = "127.0.0.1"
) -> Iterator[Association]:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1", scp_port(server), ae_title=server.ae_title, bind_address=(bind, 0)
    )
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def send(assoc: Association, path: Path) -> int:
    """C-STORE a file's data set bytes exactly as they are on disk; the status answered."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    assert "Status" in status, "the SCP did not answer the C-STORE"
    return int(status.Status)


# --- A full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(settings: Settings, tmp_path: Path) -> Iterator[Path]:
    """The store on an 8 MiB tmpfs of its own. Mounting needs root, which `make test` has
    (it installs its system packages): a machine where it fails fails this test, loudly."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mount_point)], check=True
    )
    settings.STORE_DIR = mount_point / "store"
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_fails_the_move_clearly_and_the_same_move_completes_once_space_returns(
    small_disk: Path,
    tmp_path: Path,
    storage_scp: StorageServer,
    modality_node: PacsNode,
    orthanc: OrthancServer,
    orthanc_node: PacsNode,
) -> None:
    # 24 slices of 512 KiB: 12 MiB for an 8 MiB disk.
    files = write_study(tmp_path / "ct", slices=24, size=512, name="Full^Disk")
    study_uid = str(dicom.read_header(next(iter(files.values()))).StudyInstanceUID)
    orthanc.upload_many(files.values())

    job = retrieval.retrieval_job_create(node=orthanc_node, study_uid=study_uid)
    job = retrieval.retrieval_job_run(job.pk)

    assert job.status == RetrievalJob.Status.FAILED
    assert job.error.startswith("The portal's disk is full"), job.error
    # What was confirmed is whole and indexed; the instance that did not fit left nothing,
    # no temporary file, no journal.
    assert 0 < Instance.objects.count() < len(files)
    assert_store_consistent()

    # The storage SCP tells a sender so, with the status meant for it (PS3.4 Annex GG.4):
    # "Refused: Out of Resources", worth trying again later.
    another = tmp_path / "another.dcm"
    another.write_bytes(next(iter(write_study(tmp_path / "more", slices=1, size=512).values())))
    with association(storage_scp) as assoc:
        assert send(assoc, another) & 0xFF00 == 0xA700
    assert_store_consistent()

    # Space comes back: the same move completes, every instance as the PACS holds it.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    job = retrieval.retrieval_job_create(node=orthanc_node, study_uid=study_uid)
    job = retrieval.retrieval_job_run(job.pk)

    assert job.status == RetrievalJob.Status.DONE, job.error
    assert_indexed_as_sent(files)
    assert_store_consistent()


# --- Instances confirmed, then refused by the index -----------------------------------------


@pytest.fixture
def index_refuses_rows() -> Iterator[None]:
    """A trigger that makes the database refuse every instance row, as a database failing
    under the SCP would; dropped at the end of the test (or earlier by `index_takes_rows`)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "CREATE FUNCTION refuse_instances() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'the index is unavailable'; END $$"
            )
            cursor.execute(
                "CREATE TRIGGER refuse_instances BEFORE INSERT OR UPDATE ON studies_instance "
                "FOR EACH ROW EXECUTE FUNCTION refuse_instances()"
            )
        else:
            for event in ("INSERT", "UPDATE"):
                cursor.execute(
                    f"CREATE TRIGGER refuse_instances_{event} BEFORE {event} ON studies_instance "
                    "BEGIN SELECT RAISE(ABORT, 'the index is unavailable'); END"
                )
    try:
        yield
    finally:
        index_takes_rows()


def index_takes_rows() -> None:
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("DROP TRIGGER IF EXISTS refuse_instances ON studies_instance")
            cursor.execute("DROP FUNCTION IF EXISTS refuse_instances()")
        else:
            for event in ("INSERT", "UPDATE"):
                cursor.execute(f"DROP TRIGGER IF EXISTS refuse_instances_{event}")


def push_while_the_index_refuses(server: StorageServer, folder: Path) -> None:
    """storescu sends the folder; the SCP confirms each instance, the index refuses them."""
    result = dcmtk.storescu(
        "127.0.0.1", scp_port(server), [folder], aet=MODALITY_AE, aec=server.ae_title,
        extra=["+sd", "+r", "-v"],
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert output.count("Received Store Response (Success)") == len(list(folder.rglob("*.dcm")))
    # The association ends a moment after storescu: then its journal is left for the replay.
    wait_until(lambda: len(journals()) == 1 and not server._running())
    assert Instance.objects.count() == 0


def test_confirmed_instances_the_index_refused_are_indexed_when_the_scp_starts_again(
    tmp_path: Path, storage_scp: StorageServer, modality_node: PacsNode, index_refuses_rows: None
) -> None:
    files = write_study(tmp_path / "push", slices=4)
    push_while_the_index_refuses(storage_scp, tmp_path / "push")

    index_takes_rows()
    restarted = StorageServer(ae_title=storage_scp.ae_title, host="127.0.0.1", port=free_port())
    restarted.start()
    restarted.stop()

    assert_indexed_as_sent(files)
    assert journals() == []
    assert_store_consistent()


def test_the_worker_indexes_them_on_its_regular_sweep(
    tmp_path: Path,
    settings: Settings,
    storage_scp: StorageServer,
    modality_node: PacsNode,
    index_refuses_rows: None,
) -> None:
    assert settings.CELERY_BEAT_SCHEDULE["index-confirmed-instances"]["task"] == (
        tasks.index_confirmed_instances.name
    )
    with CeleryWorker(workdir=tmp_path / "worker") as worker:
        settings.STORE_DIR = worker.store_dir  # the SCP in this process, the worker: one store
        files = write_study(tmp_path / "push", slices=3)
        push_while_the_index_refuses(storage_scp, tmp_path / "push")

        index_takes_rows()
        with worker.producer_app():
            tasks.index_confirmed_instances.delay()  # what beat sends
        wait_until(lambda: Instance.objects.count() == len(files), timeout=60)

    assert_indexed_as_sent(files)
    wait_until(lambda: journals() == [])
    assert_store_consistent()


def test_a_replay_leaves_the_journal_of_a_running_association_alone(
    tmp_path: Path, storage_scp: StorageServer, modality_node: PacsNode, index_refuses_rows: None
) -> None:
    files = write_study(tmp_path / "push", slices=1)
    path = next((tmp_path / "push").rglob("*.dcm"))
    with association(storage_scp) as assoc:
        assert send(assoc, path) == 0x0000
        # The SCP tried to index it (the sender paused) and the index refused.
        wait_until(lambda: any(
            getattr(t, "association", None) and t.association.index_worker.orphans  # type: ignore[attr-defined]
            for t in storage_scp._running()
        ))  # fmt: skip
        index_takes_rows()
        # The association still holds its journal: a replay now must not take it (it would
        # race the association's own writes).
        assert journal_replay().journals == 0
        assert Instance.objects.count() == 0
    wait_until(lambda: not storage_scp._running())

    assert journal_replay().indexed == 1
    assert_indexed_as_sent(files)
    assert_store_consistent()


# --- Another study's instance, without an index lookup per slice ----------------------------


def test_a_later_association_cannot_move_an_instance_into_another_study(
    tmp_path: Path, storage_scp: StorageServer, modality_node: PacsNode
) -> None:
    """The SCP no longer asks the index about every slice: the index write itself refuses an
    instance whose UID another study holds, and its file goes. The stored one stays."""
    ds = synthetic.make_study(patient_name="First^Owner", patient_id="F", modalities=(("CT", 1),))[
        0
    ]
    original = tmp_path / "original.dcm"
    original.write_bytes(synthetic.to_bytes(ds))
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.123456789"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.123456790"
    ds.PatientName = "Someone^Else"
    impostor = tmp_path / "impostor.dcm"
    impostor.write_bytes(synthetic.to_bytes(ds))
    with association(storage_scp) as assoc:
        assert send(assoc, original) == 0x0000
    wait_until(lambda: not storage_scp._running())
    with association(storage_scp) as assoc:
        send(assoc, impostor)
    wait_until(lambda: not storage_scp._running())

    instance = Instance.objects.select_related("series__study").get()
    assert instance.series.study.patient_name == "First^Owner"
    assert instance.sha256 == dataset_sha256(original.read_bytes())
    assert_store_consistent()


def test_a_series_of_another_study_is_not_joined(
    tmp_path: Path, storage_scp: StorageServer, modality_node: PacsNode
) -> None:
    """A new instance that names another study's series (and its own study) would be filed in
    that series, and so show in that study: it is refused."""
    first, second = synthetic.make_study(
        patient_name="First^Owner", patient_id="F", modalities=(("CT", 2),)
    )
    stored = tmp_path / "stored.dcm"
    stored.write_bytes(synthetic.to_bytes(first))
    second.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.987654321"
    second.PatientName = "Someone^Else"
    intruder = tmp_path / "intruder.dcm"
    intruder.write_bytes(synthetic.to_bytes(second))
    with association(storage_scp) as assoc:
        assert send(assoc, stored) == 0x0000
    wait_until(lambda: not storage_scp._running())
    with association(storage_scp) as assoc:
        send(assoc, intruder)
    wait_until(lambda: not storage_scp._running())

    assert list(Instance.objects.values_list("sop_instance_uid", flat=True)) == [
        str(first.SOPInstanceUID)
    ]
    assert_store_consistent()


# --- A PACS node added while the SCP runs ----------------------------------------------------


@pytest.fixture
def scp(portal_ae_title: str) -> Iterator[StorageServer]:
    """A storage SCP with the production refresh of its node list (every 10 s)."""
    server = StorageServer(ae_title=portal_ae_title, host="127.0.0.1", port=free_port())
    server.start()
    yield server
    server.stop()


def test_a_node_added_while_the_scp_runs_is_accepted_at_once(
    tmp_path: Path, scp: StorageServer, modality_node: PacsNode
) -> None:
    echoed = dcmtk.echoscu("127.0.0.1", scp_port(scp), aet=MODALITY_AE, aec=scp.ae_title)
    assert echoed.returncode == 0, echoed.stdout + echoed.stderr  # the list is read now

    services.pacs_node_create(name="newcomer", ae_title="NEWCOMER", host="127.0.0.1", port=104)
    files = write_study(tmp_path / "push", slices=2)
    result = dcmtk.storescu(
        "127.0.0.1", scp_port(scp), [tmp_path / "push"], aet="NEWCOMER", aec=scp.ae_title,
        extra=["+sd", "+r"],
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: Instance.objects.count() == len(files))
    assert_indexed_as_sent(files)


def test_a_node_added_at_a_new_address_is_accepted_at_once(
    tmp_path: Path, scp: StorageServer, modality_node: PacsNode
) -> None:
    """127.0.0.3 is no node's address when the SCP reads its list: a connection from there
    is dropped before any association, until a node lives there."""
    with association(scp) as assoc:
        assert assoc.is_established  # the list is read now
    with association(scp, calling="ELSEWHERE", bind="127.0.0.3") as assoc:
        assert not assoc.is_established

    services.pacs_node_create(name="elsewhere", ae_title="ELSEWHERE", host="127.0.0.3", port=104)
    # Unknown callers have the list read at most once a second, and the accept loop never
    # waits for a reading: the attempt just refused holds the next one back that long (the
    # rate limit, not the ten-second refresh).
    time.sleep(scp.nodes.unknown_reload_seconds)
    files = write_study(tmp_path / "push", slices=1)
    path = next((tmp_path / "push").rglob("*.dcm"))
    with association(scp, calling="ELSEWHERE", bind="127.0.0.3") as assoc:
        assert assoc.is_established
        assert send(assoc, path) == 0x0000
    wait_until(lambda: Instance.objects.count() == 1)
    assert_indexed_as_sent(files)


def test_unknown_callers_hammering_cost_at_most_one_reading_a_second(
    scp: StorageServer, modality_node: PacsNode
) -> None:
    """An attacker (or a misconfigured PACS) calling again and again with an unknown AE title,
    or from an unknown address, makes the SCP read its node list at most once a second."""
    with association(scp) as assoc:
        assert assoc.is_established
    loads, started = scp.nodes.loads, time.monotonic()
    for attempt in range(30):
        calling, bind = ("STRANGER", "127.0.0.1") if attempt % 2 else ("MODALITY", "127.0.0.4")
        with association(scp, calling=calling, bind=bind) as assoc:
            assert not assoc.is_established
    elapsed = time.monotonic() - started
    assert scp.nodes.loads - loads <= int(elapsed / scp.nodes.unknown_reload_seconds) + 1
    # A known node is still served meanwhile.
    with association(scp) as assoc:
        assert assoc.is_established
