"""A Celery worker dies (SIGKILL) in the middle of a C-MOVE retrieval: with the default settings
the job comes back within two minutes and ends with every instance exactly once.

The worker holds its job under a lease it renews while it lives (60 s, renewed every 15 s by
default); once the lease is over, the job is taken over by a worker that starts (it sends a
message for every unfinished job) or by the beat sweep (`take_back_retrieval_jobs`) when other
workers live on. The PACS here sends to the test's storage SCP through a paced relay, so that
the worker dies while instances are still arriving.
"""

import hashlib
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from django.utils import timezone
from pytest_django.fixtures import Settings

from studies import dicom, retrieval, services, tasks
from studies.demo import synthetic
from studies.dimse.storescp import StorageServer
from studies.models import Instance, PacsNode, RetrievalJob, Study
from tests.conftest import assert_store_consistent, scp_port
from tests.support.orthanc import OrthancServer
from tests.support.proxy import TcpRelay
from tests.support.worker import CeleryWorker

if TYPE_CHECKING:
    from tests.conftest import PacsStudies

pytestmark = [pytest.mark.worker, pytest.mark.dicom, pytest.mark.django_db(transaction=True)]

SLICES = 300
# 128 × 128 16-bit slices: about 10 MB for the study, paced at 2 MB/s on its way to the storage
# SCP, so that the worker is killed a few seconds before the transfer ends.
RELAY_RATE = 2 * 1024 * 1024
KILL_AFTER_BYTES = 3 * 1024 * 1024
# What the issue promises the desk: a job whose worker died is finished within two minutes.
RECOVERY_SECONDS = 120


def dataset_sha256(part10: bytes) -> str:
    """SHA-256 of a Part 10 file's data set: the storage SCP writes its own file meta group."""
    return hashlib.sha256(part10[dicom.dataset_offset(part10) :]).hexdigest()


def wait_for(job: RetrievalJob, worker: CeleryWorker, *, deadline: float) -> RetrievalJob:
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.status in {RetrievalJob.Status.DONE, RetrievalJob.Status.FAILED}:
            return job
        time.sleep(0.2)
    raise AssertionError(
        f"job {job.pk} is {job.status} after {job.attempts} attempts ({job.error!r}), "
        f"{job.received}/{job.expected} received;\nworker log:\n{worker.log_tail()}"
    )


def assert_every_instance_once(study_uid: str, pacs_copies: dict[str, bytes], store: Path) -> None:
    rows = Instance.objects.filter(series__study__study_instance_uid=study_uid)
    uids = list(rows.values_list("sop_instance_uid", flat=True))
    assert len(uids) == len(set(uids)) == SLICES
    assert set(uids) == set(pacs_copies)
    assert Study.objects.filter(study_instance_uid=study_uid).count() == 1
    for instance in rows:
        stored = (store / instance.file_path).read_bytes()
        assert dataset_sha256(stored) == instance.sha256
        assert dataset_sha256(stored) == dataset_sha256(pacs_copies[instance.sop_instance_uid])
    assert_store_consistent()


@pytest.fixture(scope="module")
def big_study() -> list[bytes]:
    return [
        synthetic.to_bytes(ds)
        for ds in synthetic.iter_study(
            patient_name="Killed^Worker",
            patient_id="KILLED-300",
            modalities=(("CT", SLICES),),
            rows=128,
            columns=128,
        )
    ]


def test_a_worker_killed_mid_c_move_loses_nothing_and_its_job_ends_within_two_minutes(
    settings: Settings,
    tmp_path: Path,
    storage_scp: StorageServer,
    portal_ae_title: str,
    big_study: list[bytes],
) -> None:
    settings.STORE_DIR = tmp_path / "store"
    study_uid = str(dicom.read_header(big_study[0]).StudyInstanceUID)
    to_scp = TcpRelay("127.0.0.1", scp_port(storage_scp), rate=RELAY_RATE)
    pacs_server = OrthancServer(
        aet="MOVEPACS", modalities={"portal": (portal_ae_title, "127.0.0.1", to_scp.port)}
    )
    with to_scp, pacs_server:
        pacs_server.upload_many(big_study)
        pacs_copies = pacs_server.study_files(study_uid)
        node = services.pacs_node_create(
            name="movepacs",
            ae_title=pacs_server.aet,
            host="127.0.0.1",
            port=pacs_server.dicom_port,
            retrieve_method=PacsNode.Retrieve.MOVE,
        )
        job = retrieval.retrieval_job_create(node=node, study_uid=study_uid)

        # The default settings: no lease, retry or timeout given to the workers.
        first = CeleryWorker(workdir=tmp_path / "worker").start()
        try:
            with first.producer_app():
                tasks.retrieval_job_enqueue(job)
            # About a third of the study has crossed the relay to the storage SCP.
            assert to_scp.meter.wait_for(KILL_AFTER_BYTES, timeout=60), first.log_tail()
            assert first.process is not None
            first.process.kill()  # SIGKILL: no clean-up, no acknowledgement
            first.process.wait()
            killed_at = time.monotonic()
        finally:
            first.stop()
        job.refresh_from_db()
        assert job.status == RetrievalJob.Status.RUNNING
        assert job.attempts == 1
        assert job.received < SLICES
        # Until its retrieval ends, the study is not in the store: a share of it stays pending.
        assert not Study.objects.in_store().filter(study_instance_uid=study_uid).exists()

        second = CeleryWorker(workdir=tmp_path / "worker")
        second.queue = first.queue
        with second:
            job = wait_for(job, second, deadline=killed_at + RECOVERY_SECONDS)

        assert job.status == RetrievalJob.Status.DONE, job.error
        assert job.attempts == 2
        assert job.received == job.expected == SLICES
        assert_every_instance_once(study_uid, pacs_copies, settings.STORE_DIR)
        assert Study.objects.in_store().filter(study_instance_uid=study_uid).exists()


def test_the_beat_sweep_hands_a_dead_workers_job_to_a_live_worker(
    settings: Settings,
    tmp_path: Path,
    orthanc: OrthancServer,
    pacs_studies: "PacsStudies",
    orthanc_node: PacsNode,
) -> None:
    """Several workers: the others do not restart when one dies, and the broker's own
    redelivery waits hours. The sweep that beat runs every quarter of a lease sends the job to
    a live worker once its lease is over."""
    settings.STORE_DIR = tmp_path / "store"
    study = pacs_studies.latin1
    with CeleryWorker(workdir=tmp_path / "worker") as live:
        # What a worker killed a lease ago leaves: its job running, its lease over, and no
        # message for it anywhere (the live worker started before the job did).
        dead = retrieval.retrieval_job_create(node=orthanc_node, study_uid=study.uid)
        lease_over = timezone.now() - timedelta(seconds=1)
        RetrievalJob.objects.filter(pk=dead.pk).update(
            status=RetrievalJob.Status.RUNNING,
            attempts=1,
            started_at=lease_over - timedelta(seconds=settings.RETRIEVAL_LEASE),
            lease_until=lease_over,
        )
        # A job whose worker lives (its lease runs on) is left alone.
        held = retrieval.retrieval_job_create(node=orthanc_node, study_uid=pacs_studies.utf8.uid)
        RetrievalJob.objects.filter(pk=held.pk).update(
            status=RetrievalJob.Status.RUNNING,
            attempts=1,
            started_at=timezone.now(),
            lease_until=timezone.now() + timedelta(minutes=5),
        )

        with live.producer_app():
            # What beat sends, run as a worker would run it.
            taken = tasks.take_back_retrieval_jobs.apply().get()
            again = tasks.take_back_retrieval_jobs.apply().get()
        assert taken == [dead.pk]
        assert again == []  # one sweep takes a job back, not every one after it
        job = wait_for(dead, live, deadline=time.monotonic() + 60)

    assert job.status == RetrievalJob.Status.DONE, job.error
    assert job.attempts == 2
    rows = Instance.objects.filter(series__study__study_instance_uid=study.uid)
    assert sorted(rows.values_list("sop_instance_uid", flat=True)) == sorted(study.files)
    held.refresh_from_db()
    assert (held.status, held.attempts) == (RetrievalJob.Status.RUNNING, 1)


def test_beat_runs_the_sweep_every_quarter_of_a_lease(settings: Settings) -> None:
    from portal.celery import app

    entry = app.conf.beat_schedule["take-back-retrieval-jobs"]
    assert entry["task"] == tasks.take_back_retrieval_jobs.name
    assert entry["schedule"] <= settings.RETRIEVAL_LEASE / 4
    assert settings.RETRIEVAL_LEASE == 60
