"""Retrieval when things go wrong: a PACS that does not answer, refuses, lacks the study, dies
in the middle of a transfer, or a store whose disk fills up. Each ends in a failed job with an
error a person can act on, and leaves the store and its index in agreement."""

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import DatabaseError, connection

from studies import retrieval, services
from studies.demo import synthetic
from studies.dimse import pacs
from studies.dimse.storescp import StorageServer
from studies.models import Instance, PacsNode, RetrievalJob, Study
from tests.conftest import PacsStudies, assert_store_consistent, scp_port, store_problems
from tests.support import free_port
from tests.support.orthanc import OrthancServer
from tests.support.proxy import Meter, TcpRelay

pytestmark = [pytest.mark.dicom, pytest.mark.django_db(transaction=True)]

METHODS = [PacsNode.Retrieve.MOVE, PacsNode.Retrieve.GET, PacsNode.Retrieve.WADO]


def retrieve(node: PacsNode, method: str, study_uid: str) -> RetrievalJob:
    node.retrieve_method = method
    node.save(update_fields=["retrieve_method"])
    job = retrieval.retrieval_job_create(node=node, study_uid=study_uid)
    return retrieval.retrieval_job_run(job.pk)


def assert_failed(job: RetrievalJob, *phrases: str) -> None:
    assert job.status == RetrievalJob.Status.FAILED
    assert job.finished_at is not None
    for phrase in phrases:
        assert phrase in job.error, job.error


@pytest.mark.parametrize("method", METHODS)
def test_it_fails_clearly_when_the_pacs_does_not_answer(
    method: str, pacs_studies: PacsStudies
) -> None:
    closed = free_port()
    node = services.pacs_node_create(
        name="down",
        ae_title="DOWN",
        host="127.0.0.1",
        port=closed,
        dicomweb_url=f"http://127.0.0.1:{closed}/dicom-web",
    )

    job = retrieve(node, method, pacs_studies.latin1.uid)

    assert_failed(job, "cannot reach")
    assert job.attempts == 1
    assert Study.objects.count() == 0
    assert_store_consistent()


@pytest.mark.parametrize("method", [PacsNode.Retrieve.MOVE, PacsNode.Retrieve.GET])
def test_it_fails_clearly_when_the_pacs_rejects_the_association(
    method: str, orthanc: OrthancServer, pacs_studies: PacsStudies, orthanc_node: PacsNode
) -> None:
    # The test Orthanc checks the called AE title: a node configured with the wrong one is
    # refused at association time.
    orthanc_node.ae_title = "NOT_ORTHANC"
    orthanc_node.save()

    job = retrieve(orthanc_node, method, pacs_studies.latin1.uid)

    assert_failed(
        job, "NOT_ORTHANC@", "rejected the association", "its AE title is not 'NOT_ORTHANC'"
    )
    assert Study.objects.count() == 0
    assert_store_consistent()


def test_it_fails_clearly_when_the_pacs_does_not_know_the_portal(
    settings, pacs_studies: PacsStudies, orthanc_node: PacsNode
) -> None:
    # The portal calls itself by an AE title Orthanc has never heard of: Orthanc refuses to
    # move the study there.
    settings.DICOM_AE_TITLE = "STRANGER"

    job = retrieve(orthanc_node, PacsNode.Retrieve.MOVE, pacs_studies.latin1.uid)

    assert_failed(job, "closed the association", "STRANGER")
    assert Study.objects.count() == 0


@pytest.mark.parametrize("method", METHODS)
def test_it_fails_clearly_for_a_study_the_pacs_does_not_have(
    method: str, orthanc: OrthancServer, orthanc_node: PacsNode
) -> None:
    job = retrieve(orthanc_node, method, "1.2.826.0.1.3680043.8.498.1")

    # Which PACS, which study: enough to check the UID or ask the PACS's administrator.
    where = (
        "orthanc" if method == PacsNode.Retrieve.WADO else f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    )
    assert job.error == f"{where} does not have study 1.2.826.0.1.3680043.8.498.1"
    assert_failed(job)
    assert Study.objects.count() == 0
    assert_store_consistent()


# --- A PACS that dies in the middle of a transfer -------------------------------------------

LARGE_STUDY_SLICES = 60


@pytest.fixture(scope="module")
def large_study_files() -> list[bytes]:
    """A 60-slice 512×512 CT (about 30 MB): more than socket buffers hold, so that a PACS
    killed after a few slices cannot have sent the rest already."""
    return [
        synthetic.to_bytes(ds)
        for ds in synthetic.iter_study(
            patient_name="Large^Study",
            patient_id="LARGE",
            modalities=(("CT", LARGE_STUDY_SLICES),),
            rows=512,
            columns=512,
        )
    ]


# The relays' pace: a 60-slice CT takes about two seconds, and the PACS dies a quarter of
# a second in.
RELAY_RATE = 16 * 1024 * 1024
KILL_AFTER_BYTES = 4 * 1024 * 1024
EXPECTED_ERRORS: dict[str, list[str]] = {
    PacsNode.Retrieve.MOVE: ["DYING@", "dropped the association during the C-MOVE"],
    PacsNode.Retrieve.GET: ["DYING@", "dropped the association during the C-GET"],
    PacsNode.Retrieve.WADO: ["the transfer from http://127.0.0.1:", "broke off after"],
}


@pytest.mark.parametrize("method", METHODS)
def test_it_keeps_nothing_half_written_when_the_pacs_dies_mid_retrieval(
    method: str,
    storage_scp: StorageServer,
    portal_ae_title: str,
    large_study_files: list[bytes],
) -> None:
    # Every connection between the portal and this PACS goes through a relay that paces the
    # transfer and counts it; once a few megabytes have passed, the PACS is killed (SIGKILL).
    meter = Meter()
    to_scp = TcpRelay("127.0.0.1", scp_port(storage_scp), rate=RELAY_RATE, meter=meter)
    dying = OrthancServer(
        aet="DYING", modalities={"portal": (portal_ae_title, "127.0.0.1", to_scp.port)}
    )
    to_dicom = TcpRelay("127.0.0.1", dying.dicom_port, rate=RELAY_RATE, meter=meter)
    to_http = TcpRelay("127.0.0.1", dying.http_port, rate=RELAY_RATE, meter=meter)
    with to_scp, to_dicom, to_http, dying:
        answers = dying.upload_many(large_study_files)
        study_uid = dying.http.get(f"{dying.url}/studies/{answers[0]['ParentStudy']}").json()[
            "MainDicomTags"
        ]["StudyInstanceUID"]
        node = services.pacs_node_create(
            name="dying",
            ae_title=dying.aet,
            host="127.0.0.1",
            port=to_dicom.port,
            dicomweb_url=f"http://127.0.0.1:{to_http.port}/dicom-web",
        )

        finished, killed_mid_transfer = threading.Event(), threading.Event()

        def kill_when_due() -> None:
            if meter.wait_for(KILL_AFTER_BYTES, timeout=60) and not finished.is_set():
                dying.kill()
                killed_mid_transfer.set()

        killer = threading.Thread(target=kill_when_due)
        killer.start()
        try:
            job = retrieve(node, method, study_uid)
        finally:
            finished.set()
            meter.add(KILL_AFTER_BYTES)  # release the killer whatever happened
            killer.join()

    assert killed_mid_transfer.is_set()
    assert_failed(job, *EXPECTED_ERRORS[method])
    # Whatever arrived whole is kept, indexed and correct; the instance in flight left nothing.
    assert_store_consistent()
    assert 0 < Instance.objects.count() < LARGE_STUDY_SLICES


# --- A full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(settings, tmp_path: Path) -> Iterator[Path]:
    """The store on a 32 KiB file system: room for a few small instances, not a study."""
    if os.geteuid() != 0:
        # An environment limit, not a missing feature: `make test` runs as root in CI (it
        # installs its system packages), so there this test always runs.
        pytest.skip("mounting a small file system needs root")
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32k,mode=0700", "tmpfs", str(mount_point)],
        check=True,
    )
    settings.STORE_DIR = mount_point / "store"
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize("method", METHODS)
def test_it_fails_without_damage_when_the_disk_is_full(
    method: str, small_disk: Path, pacs_studies: PacsStudies, orthanc_node: PacsNode
) -> None:
    study = pacs_studies.latin1

    job = retrieve(orthanc_node, method, study.uid)

    assert_failed(job)
    if method == PacsNode.Retrieve.WADO:
        assert "disk is full" in job.error, job.error
    elif method == PacsNode.Retrieve.GET:
        # Each C-STORE the store could not take was answered "out of resources".
        assert job.failed >= 1
        assert "could not be retrieved" in job.error, job.error
    else:
        # Orthanc ends a C-MOVE whose sub-operation failed with a failure of its own.
        assert "C-MOVE" in job.error, job.error
    assert Instance.objects.count() < study.instance_count
    assert_store_consistent()


# --- An index that fails after the storage SCP has answered ---------------------------------


def test_it_fails_the_job_when_the_index_loses_what_the_scp_accepted(
    settings,
    orthanc: OrthancServer,
    orthanc_node: PacsNode,
    pacs_studies: PacsStudies,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The storage SCP answers a C-STORE once the file is in place and writes index rows in
    batches; a database that refuses those rows must not end in a job reported done."""
    import studies.dimse.storescp

    def refuse(instances: list[Instance]) -> set[str]:
        raise DatabaseError("the database is read-only")

    monkeypatch.setattr(studies.dimse.storescp, "upsert_instances", refuse)
    settings.RETRIEVAL_INDEX_WAIT = 1.0
    study = pacs_studies.utf8

    job = retrieve(orthanc_node, PacsNode.Retrieve.MOVE, study.uid)

    assert_failed(
        job, f"The PACS sent {study.instance_count} instances but only 0 are in the index"
    )
    # The job waited for the index before it gave up.
    assert job.started_at and job.finished_at
    assert (job.finished_at - job.started_at).total_seconds() >= 1.0
    assert Instance.objects.count() == 0
    # The files the SCP confirmed to the PACS stay (the SCP never deletes what it confirmed),
    # listed in its journal for a later replay (test_faults_store); nothing else is in the
    # store, nothing half-written.
    problems = store_problems()
    assert len(problems) == study.instance_count + 1
    assert problems[0].startswith("left over: .journal/"), problems
    assert all(p.startswith(f"not indexed: {study.uid}/") for p in problems[1:]), problems


def test_it_waits_for_index_rows_that_come_after_the_pacs_final_answer(
    orthanc: OrthancServer,
    orthanc_node: PacsNode,
    pacs_studies: PacsStudies,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PS3.4 lets a PACS send its final C-MOVE answer before the storage SCP has written its
    last index rows: the job waits for them rather than fail a complete retrieval."""
    import studies.dimse.storescp

    real_upsert = studies.dimse.storescp.upsert_instances
    writers: list[threading.Thread] = []

    def late(instances: list[Instance]) -> set[str]:
        def write() -> None:
            time.sleep(1.5)
            try:
                real_upsert(instances)
            finally:
                connection.close()

        writers.append(threading.Thread(target=write))
        writers[-1].start()
        return {instance.sop_instance_uid for instance in instances}

    monkeypatch.setattr(studies.dimse.storescp, "upsert_instances", late)
    study = pacs_studies.latin1
    try:
        job = retrieve(orthanc_node, PacsNode.Retrieve.MOVE, study.uid)
    finally:
        for writer in writers:
            writer.join()

    assert writers, "the storage SCP wrote no index rows"
    assert job.status == RetrievalJob.Status.DONE, job.error
    assert job.received == study.instance_count
    assert Instance.objects.filter(series__study__study_instance_uid=study.uid).count() == (
        study.instance_count
    )
    assert_store_consistent()


# --- Errors nobody planned for --------------------------------------------------------------


@pytest.mark.parametrize("method", [PacsNode.Retrieve.MOVE, PacsNode.Retrieve.GET])
def test_an_unexpected_error_fails_the_job_instead_of_leaving_it_running(
    method: str,
    pacs_studies: PacsStudies,
    orthanc_node: PacsNode,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise DatabaseError("server closed the connection unexpectedly")

    monkeypatch.setattr(
        pacs, "move_study" if method == PacsNode.Retrieve.MOVE else "get_study", broken
    )

    job = retrieve(orthanc_node, method, pacs_studies.latin1.uid)

    assert_failed(
        job,
        "unexpected error",
        "DatabaseError: server closed the connection unexpectedly",
        "the worker's log has the details",
    )
    assert job.attempts == 1
    # The log has the traceback, for whoever fixes it.
    logged = [r for r in caplog.records if r.levelname == "ERROR" and r.exc_info]
    assert logged and f"retrieval job {job.pk}" in logged[0].getMessage()
