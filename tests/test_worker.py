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
from pytest_django.fixtures import Settings

from studies import services
from studies.models import Instance, PacsNode, RetrievalJob
from studies.tasks import retrieve_study
from tests.support import free_port
from tests.support.orthanc import OrthancServer
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
    job = services.retrieval_job_create(node=node, study_uid="1.2.826.0.1.3680043.8.498.4242")
    failures_before = finished_runs(worker, "failed")

    with worker.producer_app():
        services.retrieval_job_enqueue(job)

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
    job = services.retrieval_job_create(node=orthanc_node, study_uid=study.uid)
    assert job.method == PacsNode.Retrieve.GET

    with worker.producer_app():
        services.retrieval_job_enqueue(job)
    job = wait_for_job(job, lambda j: j.is_finished, worker)

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
