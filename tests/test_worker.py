"""Retrieval jobs run by a real Celery worker (a subprocess) through a real broker.

The worker shares the test database (hence transactional tests: it only sees committed rows)
and has a store of its own that the tests point STORE_DIR at.
"""

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from django.db.models import QuerySet
from pytest_django.fixtures import Settings

from studies import dicom, retrieval, services, tasks
from studies.demo import synthetic
from studies.models import Instance, PacsNode, RetrievalJob, Series, Study
from studies.tasks import retrieve_study
from tests.conftest import store_problems
from tests.support import free_port
from tests.support.orthanc import OrthancServer
from tests.support.proxy import Meter, TcpRelay
from tests.support.worker import CeleryWorker

if TYPE_CHECKING:
    from tests.conftest import PacsStudies

pytestmark = pytest.mark.worker

# What the worker is given: one retry after the first failure, one second of backoff.
MAX_RETRIES = 1
BACKOFF_SECONDS = 1


@pytest.fixture(scope="module")
def worker(
    django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CeleryWorker]:
    with CeleryWorker(
        workdir=tmp_path_factory.mktemp("worker"),
        env={
            "PORTAL_RETRIEVAL_MAX_RETRIES": str(MAX_RETRIES),
            "PORTAL_RETRIEVAL_RETRY_BACKOFF": str(BACKOFF_SECONDS),
            "PORTAL_DICOM_CONNECT_TIMEOUT": "5",
            "PORTAL_DICOM_DIMSE_TIMEOUT": "30",
            "PORTAL_DICOM_NETWORK_TIMEOUT": "30",
        },
    ) as running:
        yield running


def wait_for_job(
    job: RetrievalJob, condition: Callable[[RetrievalJob], bool], worker: CeleryWorker
) -> RetrievalJob:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if condition(job):
            return job
        time.sleep(0.2)
    raise AssertionError(
        f"job {job.pk} is {job.status} after {job.attempts} attempts ({job.error!r});\n"
        f"worker log:\n{worker.log_tail()}"
    )


def finished(job: RetrievalJob) -> bool:
    return job.status in {RetrievalJob.Status.DONE, RetrievalJob.Status.FAILED}


def finished_runs(worker: CeleryWorker, outcome: str) -> int:
    """How many times the worker's retrieve_study returned `outcome` (Celery logs each)."""
    pattern = rf"Task studies\.tasks\.retrieve_study\[[^\]]+\] succeeded in [0-9.]+s: '{outcome}'"
    return len(re.findall(pattern, worker.log()))


def wait_for_runs(worker: CeleryWorker, outcome: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while finished_runs(worker, outcome) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the worker did not finish the task:\n{worker.log_tail()}")
        time.sleep(0.2)


def dataset_sha256(part10: bytes) -> str:
    """SHA-256 of a Part 10 file's data set: what follows its file meta group."""
    group_length = int.from_bytes(part10[140:144], "little")
    return hashlib.sha256(part10[144 + group_length :]).hexdigest()


@pytest.mark.django_db(transaction=True)
def test_it_retries_an_unreachable_pacs_then_fails_the_job_with_a_clear_error(
    worker: CeleryWorker, settings: Settings
) -> None:
    closed_port = free_port()
    node = services.pacs_node_create(
        name="closed", ae_title="CLOSEDPACS", host="127.0.0.1", port=closed_port
    )
    job = retrieval.retrieval_job_create(node=node, study_uid="1.2.826.0.1.3680043.8.498.4242")
    failures_before = finished_runs(worker, "failed")

    with worker.producer_app():
        tasks.retrieval_job_enqueue(job)

    # The task returns (rather than retrying) only once it has given up.
    wait_for_runs(worker, "failed", failures_before + 1)
    job.refresh_from_db()
    assert job.status == RetrievalJob.Status.FAILED
    assert job.attempts == MAX_RETRIES + 1
    assert job.error == (
        f"cannot reach CLOSEDPACS@127.0.0.1:{closed_port}: "
        "no association (connection refused or timed out)"
    )
    assert job.finished_at is not None
    assert job.received == 0
    assert f"retry: Retry in {BACKOFF_SECONDS}s" in worker.log()
    # CI gives REDIS_URL: the broker must then really be Redis, not the file system fallback.
    broker = "redis://" if os.environ.get("REDIS_URL") else "filesystem://"
    assert f"Connected to {broker}" in worker.log()


@pytest.mark.dicom
@pytest.mark.django_db(transaction=True)
def test_it_retrieves_a_study_by_c_get_in_the_worker_and_a_second_run_changes_nothing(
    worker: CeleryWorker,
    settings: Settings,
    orthanc: OrthancServer,
    pacs_studies: "PacsStudies",
    orthanc_node: PacsNode,
) -> None:
    settings.STORE_DIR = worker.store_dir
    PacsNode.objects.filter(pk=orthanc_node.pk).update(retrieve_method=PacsNode.Retrieve.GET)
    orthanc_node.refresh_from_db()
    study = pacs_studies.latin1
    pacs_copies = orthanc.study_files(study.uid)
    job = retrieval.retrieval_job_create(node=orthanc_node, study_uid=study.uid)
    assert job.method == PacsNode.Retrieve.GET

    with worker.producer_app():
        tasks.retrieval_job_enqueue(job)
    job = wait_for_job(job, finished, worker)

    assert job.status == RetrievalJob.Status.DONE, job.error
    assert job.attempts == 1
    assert job.received == job.expected == len(pacs_copies)
    assert job.failed == 0
    instances = {
        i.sop_instance_uid: i
        for i in Instance.objects.filter(series__study__study_instance_uid=study.uid)
    }
    assert set(instances) == set(pacs_copies)
    for sop_uid, pacs_copy in pacs_copies.items():
        stored = (Path(worker.store_dir) / instances[sop_uid].file_path).read_bytes()
        assert dataset_sha256(stored) == dataset_sha256(pacs_copy) == instances[sop_uid].sha256

    # The same message delivered again (a redelivery after a lost ack) must be harmless.
    before = _snapshot(job, worker.store_dir)
    done_runs = finished_runs(worker, "done")
    with worker.producer_app():
        retrieve_study.delay(job.pk)
    wait_for_runs(worker, "done", done_runs + 1)
    assert _snapshot(job, worker.store_dir) == before

    # A first attempt that failed after part of the study had arrived, queued again by the
    # task: the second attempt brings the rest, and what the first brought stays as it was.
    def rows() -> QuerySet[Instance]:
        return Instance.objects.filter(series__study__study_instance_uid=study.uid)

    lost = sorted(rows().values_list("sop_instance_uid", flat=True))[:3]
    for instance in rows().filter(sop_instance_uid__in=lost):
        (Path(worker.store_dir) / instance.file_path).unlink()
    rows().filter(sop_instance_uid__in=lost).delete()
    kept = {i.sop_instance_uid: _row(i) for i in rows()}
    kept_bytes = {
        uid: (Path(worker.store_dir) / str(row[2])).read_bytes() for uid, row in kept.items()
    }
    RetrievalJob.objects.filter(pk=job.pk).update(
        status=RetrievalJob.Status.QUEUED,
        error="the PACS dropped the association (attempt 1; trying again in 1 s)",
    )
    with worker.producer_app():
        retrieve_study.delay(job.pk)
    job = wait_for_job(job, finished, worker)

    assert job.status == RetrievalJob.Status.DONE, job.error
    assert job.attempts == 2
    assert rows().count() == len(pacs_copies)
    assert Series.objects.count() == len(study.series)
    assert Study.objects.count() == 1
    for uid, row in kept.items():
        assert _row(rows().get(sop_instance_uid=uid)) == row
        assert (Path(worker.store_dir) / str(row[2])).read_bytes() == kept_bytes[uid]
    assert set(rows().values_list("sop_instance_uid", flat=True)) == set(pacs_copies)
    for instance in rows():
        stored = (Path(worker.store_dir) / instance.file_path).read_bytes()
        pacs_sha256 = dataset_sha256(pacs_copies[instance.sop_instance_uid])
        assert dataset_sha256(stored) == instance.sha256 == pacs_sha256


def _row(instance: Instance) -> tuple[object, ...]:
    return (instance.pk, instance.sha256, instance.file_path, instance.size, instance.created_at)


def _snapshot(job: RetrievalJob, store: Path) -> tuple[object, ...]:
    job.refresh_from_db()
    rows = sorted(
        Instance.objects.filter(
            series__study__study_instance_uid=job.study_instance_uid
        ).values_list("pk", "sop_instance_uid", "sha256", "size", "file_path", "created_at")
    )
    files = sorted(
        (str(path.relative_to(store)), path.stat().st_mtime_ns, path.stat().st_ino)
        for path in store.rglob("*")
        if path.is_file()
    )
    return (
        job.status,
        job.attempts,
        job.received,
        job.expected,
        job.started_at,
        job.finished_at,
        rows,
        files,
    )


# --- A worker killed in the middle of a retrieval -------------------------------------------

LEASE_SECONDS = 3
KILL_STUDY_SLICES = 24
# The pace of the link between the worker and the PACS: the study takes about 3 s to cross
# it, and the worker dies about 2 MB in.
KILL_RELAY_RATE = 4 * 1024 * 1024
KILL_AFTER_BYTES = 2 * 1024 * 1024


@pytest.mark.dicom
@pytest.mark.django_db(transaction=True)
def test_a_job_whose_worker_is_killed_mid_retrieval_is_taken_over_and_finished(
    settings: Settings, tmp_path: Path
) -> None:
    """SIGKILL: no clean-up, no acknowledgement, the job left "running". Once its lease is over
    the next worker takes it over and finishes it, the first attempt's instances not indexed
    twice. (Redis hands the message out again after its visibility timeout; the file system
    broker lost it, but a worker sends one for each unfinished job as it starts.)"""
    files = [
        synthetic.to_bytes(ds)
        for ds in synthetic.iter_study(
            patient_name="Killed^Worker",
            patient_id="KILLED",
            modalities=(("CT", KILL_STUDY_SLICES),),
            rows=512,
            columns=512,
        )
    ]
    study_uid = str(dicom.read_header(files[0]).StudyInstanceUID)
    environment = {
        "PORTAL_RETRIEVAL_MAX_RETRIES": "1",
        "PORTAL_RETRIEVAL_RETRY_BACKOFF": "1",
        "PORTAL_RETRIEVAL_LEASE": str(LEASE_SECONDS),
        "PORTAL_DICOM_CONNECT_TIMEOUT": "5",
        "PORTAL_DICOM_DIMSE_TIMEOUT": "30",
        "PORTAL_DICOM_NETWORK_TIMEOUT": "30",
    }
    meter = Meter()
    portal = (str(settings.DICOM_AE_TITLE), "127.0.0.1", free_port())
    with OrthancServer(aet="KILLPACS", modalities={"portal": portal}) as orthanc:
        orthanc.upload_many(files)
        pacs_copies = orthanc.study_files(study_uid)
        with TcpRelay("127.0.0.1", orthanc.dicom_port, rate=KILL_RELAY_RATE, meter=meter) as link:
            node = services.pacs_node_create(
                name="killpacs",
                ae_title=orthanc.aet,
                host="127.0.0.1",
                port=link.port,
                retrieve_method=PacsNode.Retrieve.GET,
            )
            job = retrieval.retrieval_job_create(node=node, study_uid=study_uid)
            first = CeleryWorker(workdir=tmp_path / "worker", env=environment).start()
            settings.STORE_DIR = first.store_dir
            try:
                with first.producer_app():
                    tasks.retrieval_job_enqueue(job)
                assert meter.wait_for(KILL_AFTER_BYTES, timeout=60), first.log_tail()
                assert first.process is not None
                first.process.kill()
                first.process.wait()
            finally:
                first.stop()
            job.refresh_from_db()
            assert job.status == RetrievalJob.Status.RUNNING
            assert job.attempts == 1
            arrived_before = Instance.objects.count()
            assert arrived_before < KILL_STUDY_SLICES

            second = CeleryWorker(workdir=tmp_path / "worker", env=environment)
            second.queue = first.queue
            with second:
                job = wait_for_job(job, finished, second)

    assert job.status == RetrievalJob.Status.DONE, job.error
    assert job.attempts == 2
    assert job.received == job.expected == KILL_STUDY_SLICES
    rows = Instance.objects.filter(series__study__study_instance_uid=study_uid)
    assert sorted(rows.values_list("sop_instance_uid", flat=True)) == sorted(pacs_copies)
    for instance in rows:
        stored = (Path(first.store_dir) / instance.file_path).read_bytes()
        pacs_sha256 = dataset_sha256(pacs_copies[instance.sop_instance_uid])
        assert dataset_sha256(stored) == instance.sha256 == pacs_sha256
    # What the killed worker was writing never reached a real name in the store.
    assert [p for p in store_problems() if not p.startswith("left over: .incoming/")] == []
