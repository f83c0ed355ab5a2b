"""The services around the portal stop and come back: the PACS in the middle of a C-MOVE, the
Redis broker with jobs queued, the PostgreSQL server under the web processes and workers.
Nothing is lost and nobody needs a manual restart.

Each test runs its own instance of the service it breaks (a private Orthanc, redis-server,
PostgreSQL cluster on free ports): the session's are shared with other tests.
"""

import time
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from pytest_django.fixtures import Settings

from accounts.selectors import share_status
from studies import dicom, retrieval, services, tasks
from studies.demo import synthetic
from studies.dimse.storescp import StorageServer
from studies.models import Instance, PacsNode, RetrievalJob, Study
from tests.conftest import assert_store_consistent, scp_port
from tests.support.access import make_share, share_of, sign_in
from tests.support.orthanc import OrthancServer
from tests.support.proxy import TcpRelay
from tests.support.worker import CeleryWorker

SLICES = 60
# 256 × 256 slices, about 8 MB, paced at 2 MB/s towards the storage SCP: the PACS is stopped
# about a quarter of the way in.
RELAY_RATE = 2 * 1024 * 1024
STOP_AFTER_BYTES = 2 * 1024 * 1024
BACKOFF_SECONDS = 2


def dataset_sha256(part10: bytes) -> str:
    import hashlib

    return hashlib.sha256(part10[dicom.dataset_offset(part10) :]).hexdigest()


def visible_instances(client: Client) -> int:
    """How many instances the recipient's DICOMweb shows (what any viewer would show)."""
    response = client.get("/dicomweb/instances")
    assert response.status_code in {200, 204}, response.status_code
    return len(response.json()) if response.status_code == 200 and response.content else 0


def poll(predicate: Any, *, timeout: float, what: str, log: Any = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s\n{log()}")
        time.sleep(0.1)


@pytest.mark.worker
@pytest.mark.dicom
@pytest.mark.django_db(transaction=True)
def test_a_pacs_that_stops_mid_c_move_fails_the_job_clearly_and_it_completes_once_back(
    settings: Settings,
    tmp_path: Path,
    storage_scp: StorageServer,
    portal_ae_title: str,
    sms_dir: Path,
    client: Client,
) -> None:
    settings.STORE_DIR = tmp_path / "store"
    files = [
        synthetic.to_bytes(ds)
        for ds in synthetic.iter_study(
            patient_name="Stopped^Pacs",
            patient_id="STOPPED",
            modalities=(("CT", SLICES),),
            rows=256,
            columns=256,
        )
    ]
    study_uid = str(dicom.read_header(files[0]).StudyInstanceUID)
    to_scp = TcpRelay("127.0.0.1", scp_port(storage_scp), rate=RELAY_RATE)
    # Its own folder: the PACS comes back with its storage, on the same DICOM port.
    pacs_server = OrthancServer(
        aet="STOPPACS",
        modalities={"portal": (portal_ae_title, "127.0.0.1", to_scp.port)},
        workdir=tmp_path / "orthanc",
    )
    worker = CeleryWorker(
        workdir=tmp_path / "worker",
        env={
            "PORTAL_RETRIEVAL_MAX_RETRIES": "4",
            "PORTAL_RETRIEVAL_RETRY_BACKOFF": str(BACKOFF_SECONDS),
            "PORTAL_DICOM_CONNECT_TIMEOUT": "3",
        },
    )
    with to_scp, pacs_server, worker:
        pacs_server.upload_many(files)
        pacs_copies = pacs_server.study_files(study_uid)
        dicom_port = pacs_server.dicom_port
        node = services.pacs_node_create(
            name="stoppacs",
            ae_title=pacs_server.aet,
            host="127.0.0.1",
            port=dicom_port,
            retrieve_method=PacsNode.Retrieve.MOVE,
        )
        # The patient holds a share of a study the store lacks, and has signed in.
        created = make_share(study_uid)
        sign_in(client, created, sms_dir)
        share = share_of(created)
        job = retrieval.retrieval_job_create(node=node, study_uid=study_uid)
        with worker.producer_app():
            tasks.retrieval_job_enqueue(job)

        assert to_scp.meter.wait_for(STOP_AFTER_BYTES, timeout=60), worker.log_tail()
        pacs_server.kill()  # the PACS goes down hard, mid-transfer

        errors: list[str] = []

        def failed_twice() -> bool:
            job.refresh_from_db()
            if job.error and job.error not in errors:
                errors.append(job.error)
            return job.attempts >= 2 and job.status == RetrievalJob.Status.QUEUED

        poll(failed_twice, timeout=60, what="two failed attempts", log=worker.log_tail)
        # Some of the study arrived: the recipient sees none of it, the share is pending.
        assert Instance.objects.filter(series__study__study_instance_uid=study_uid).exists()
        assert share_status(share) == "pending"
        assert visible_instances(client) == 0

        pacs_server.start()
        assert pacs_server.dicom_port == dicom_port

        def finished() -> bool:
            job.refresh_from_db()
            if job.error and job.error not in errors:
                errors.append(job.error)
            # The recipient never sees part of the study while it is not complete.
            if job.status != RetrievalJob.Status.DONE:
                assert visible_instances(client) in {0, SLICES}
            return job.status in {RetrievalJob.Status.DONE, RetrievalJob.Status.FAILED}

        poll(finished, timeout=90, what="the job's end", log=worker.log_tail)

    assert job.status == RetrievalJob.Status.DONE, (job.error, errors)
    assert job.attempts >= 3
    # Each failure said what went wrong and when the next attempt comes, each wait longer.
    assert f"STOPPACS@127.0.0.1:{dicom_port}" in errors[0], errors
    assert "dropped the association during the C-MOVE" in errors[0], errors
    assert f"(attempt 1; trying again in {BACKOFF_SECONDS} s)" in errors[0], errors
    assert any(
        "cannot reach" in e and f"(attempt 2; trying again in {2 * BACKOFF_SECONDS} s)" in e
        for e in errors
    ), errors
    rows = Instance.objects.filter(series__study__study_instance_uid=study_uid)
    assert sorted(rows.values_list("sop_instance_uid", flat=True)) == sorted(pacs_copies)
    for instance in rows:
        stored = (settings.STORE_DIR / instance.file_path).read_bytes()
        assert dataset_sha256(stored) == dataset_sha256(pacs_copies[instance.sop_instance_uid])
    assert_store_consistent()
    assert share_status(share) == "active"
    assert visible_instances(client) == SLICES
    assert Study.objects.in_store().filter(study_instance_uid=study_uid).exists()
