"""A retrieval job's life: who runs it, when another worker may take it over, when it is given
up. (The real worker, killed in the middle of a job, is in test_worker.)"""

import socket
import threading
import time
from datetime import datetime, timedelta

import pytest
from django.utils import timezone
from pytest_django.fixtures import Settings

from studies import retrieval, services
from studies.dimse import pacs
from studies.models import PacsNode, RetrievalJob
from tests.support import free_port

pytestmark = pytest.mark.django_db

STUDY_UID = "1.2.826.0.1.3680043.8.498.20251128"
LEASE = 60


@pytest.fixture
def node(settings: Settings) -> PacsNode:
    """A PACS that is not there: a run that really asks it fails with "cannot reach"."""
    settings.RETRIEVAL_LEASE = LEASE
    return services.pacs_node_create(
        name="down", ae_title="DOWN", host="127.0.0.1", port=free_port()
    )


@pytest.fixture
def pacs_must_not_be_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the PACS was asked")

    monkeypatch.setattr(pacs, "move_study", refuse)


def job_with(node: PacsNode, **fields: object) -> RetrievalJob:
    job = retrieval.retrieval_job_create(node=node, study_uid=STUDY_UID)
    RetrievalJob.objects.filter(pk=job.pk).update(**fields)
    job.refresh_from_db()
    return job


def seconds_ago(seconds: float):  # type: ignore[no-untyped-def]
    return timezone.now() - timedelta(seconds=seconds)


def test_a_job_another_worker_runs_within_its_lease_is_handed_back_as_it_is(
    node: PacsNode, pacs_must_not_be_asked: None
) -> None:
    job = job_with(node, status=RetrievalJob.Status.RUNNING, started_at=seconds_ago(30), attempts=1)

    asked_again = retrieval.retrieval_job_create(node=node, study_uid=STUDY_UID)
    ran = retrieval.retrieval_job_run(job.pk)

    assert asked_again.pk == job.pk
    assert asked_again.status == RetrievalJob.Status.RUNNING
    assert (ran.status, ran.attempts, ran.started_at) == ("running", 1, job.started_at)


def test_a_running_job_past_its_lease_is_queued_again_when_the_study_is_asked_for(
    node: PacsNode,
) -> None:
    job = job_with(
        node, status=RetrievalJob.Status.RUNNING, started_at=seconds_ago(LEASE + 1), attempts=1
    )

    asked_again = retrieval.retrieval_job_create(node=node, study_uid=STUDY_UID)

    assert asked_again.pk == job.pk
    assert asked_again.status == RetrievalJob.Status.QUEUED
    assert asked_again.error == "The worker retrieving this study stopped; it is queued again."
    assert RetrievalJob.objects.count() == 1


def test_a_long_job_that_reports_progress_keeps_its_lease(
    node: PacsNode, pacs_must_not_be_asked: None
) -> None:
    # Started long ago, but its worker reported progress a moment ago: alive.
    job = job_with(
        node,
        status=RetrievalJob.Status.RUNNING,
        started_at=seconds_ago(LEASE * 10),
        lease_until=timezone.now() + timedelta(seconds=LEASE - 5),
        attempts=1,
    )

    asked_again = retrieval.retrieval_job_create(node=node, study_uid=STUDY_UID)
    ran = retrieval.retrieval_job_run(job.pk)

    assert asked_again.status == RetrievalJob.Status.RUNNING
    assert (ran.status, ran.attempts, ran.started_at) == ("running", 1, job.started_at)
    assert LEASE - 10 < retrieval.retrieval_job_lease_left(ran) <= LEASE - 5


def test_a_job_whose_worker_fell_silent_is_taken_over_once_its_lease_ran_out(
    node: PacsNode, settings: Settings
) -> None:
    settings.RETRIEVAL_MAX_RETRIES = 1
    job = job_with(
        node,
        status=RetrievalJob.Status.RUNNING,
        started_at=seconds_ago(LEASE * 10),
        lease_until=seconds_ago(1),
        attempts=1,
    )

    ran = retrieval.retrieval_job_run(job.pk)

    assert ran.attempts == 2
    assert ran.error.startswith("cannot reach DOWN@")


def test_a_running_job_past_its_lease_is_taken_over_by_the_next_run(
    node: PacsNode, settings: Settings
) -> None:
    settings.RETRIEVAL_MAX_RETRIES = 1
    job = job_with(
        node, status=RetrievalJob.Status.RUNNING, started_at=seconds_ago(LEASE + 1), attempts=1
    )

    ran = retrieval.retrieval_job_run(job.pk)

    # This run really went to the PACS, as a second attempt.
    assert ran.attempts == 2
    assert ran.started_at is not None and job.started_at is not None
    assert ran.started_at > job.started_at
    assert ran.status == RetrievalJob.Status.FAILED
    assert ran.error.startswith(f"cannot reach DOWN@127.0.0.1:{node.port}")


@pytest.mark.parametrize("status", [RetrievalJob.Status.RUNNING, RetrievalJob.Status.QUEUED])
def test_a_job_whose_attempts_are_used_up_is_given_up_before_it_runs(
    status: str, node: PacsNode, settings: Settings, pacs_must_not_be_asked: None
) -> None:
    """A job that kills its worker each time never reaches the end of an attempt; its message
    comes back after each death (acks_late, reject_on_worker_lost). The count of attempts,
    checked before each run, ends that."""
    settings.RETRIEVAL_MAX_RETRIES = 2
    job = job_with(node, status=status, started_at=seconds_ago(LEASE + 1), attempts=3)

    ran = retrieval.retrieval_job_run(job.pk)

    assert ran.status == RetrievalJob.Status.FAILED
    assert ran.error == (
        "Gave up after 3 attempts: the last one did not finish (the worker running it stopped)."
    )
    assert ran.attempts == 3
    assert ran.finished_at is not None
    # Given up is finished: a later delivery of its message leaves it alone.
    assert retrieval.retrieval_job_run(job.pk).finished_at == ran.finished_at


def test_a_finished_job_is_never_run_again(node: PacsNode, pacs_must_not_be_asked: None) -> None:
    for status in (RetrievalJob.Status.DONE, RetrievalJob.Status.FAILED):
        job = job_with(node, status=status, started_at=seconds_ago(LEASE * 10), attempts=1)
        ran = retrieval.retrieval_job_run(job.pk)
        assert (ran.status, ran.attempts, ran.started_at) == (status, 1, job.started_at)
        job.delete()


@pytest.mark.django_db(transaction=True)
def test_a_pacs_slow_to_answer_does_not_cost_its_worker_the_job(settings: Settings) -> None:
    """The PACS accepts the connection and says nothing for longer than the lease: the worker
    is alive all the same, and its lease is renewed meanwhile."""
    settings.RETRIEVAL_LEASE = 0.6  # renewed every 0.2 s
    settings.DICOM_CONNECT_TIMEOUT = 1.5
    with socket.create_server(("127.0.0.1", 0)) as silent:
        node = services.pacs_node_create(
            name="silent", ae_title="SILENT", host="127.0.0.1", port=silent.getsockname()[1]
        )
        job = retrieval.retrieval_job_create(node=node, study_uid=STUDY_UID)
        leases: list[datetime | None] = []

        def watch() -> None:
            while len(leases) < 6:
                time.sleep(0.2)
                leases.append(RetrievalJob.objects.get(pk=job.pk).lease_until)

        watcher = threading.Thread(target=watch)
        watcher.start()
        ran = retrieval.retrieval_job_run(job.pk)
        watcher.join()

    assert ran.status == RetrievalJob.Status.FAILED  # the PACS never answered
    assert ran.started_at is not None
    renewed = {lease for lease in leases if lease is not None}
    assert len(renewed) >= 3  # moved on while the PACS kept silent
    assert max(renewed) > ran.started_at + timedelta(seconds=1.0)
