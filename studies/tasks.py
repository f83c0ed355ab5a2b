"""Celery tasks. Each is idempotent: a redelivered message (acks_late) repeats no harm.

A task is one more way in: what a job does, and when it is tried again, is studies.retrieval's.
"""

import logging
from typing import Any

from celery import shared_task
from celery.signals import worker_ready
from django.db import transaction

from studies import metadata, retention, retrieval
from studies.models import RetrievalJob
from studies.selectors import retrieval_jobs_unfinished
from studies.store import STALE_INCOMING_SECONDS, journal_replay, sweep_incoming

logger = logging.getLogger(__name__)


@shared_task(bind=True, acks_late=True, max_retries=None)
def retrieve_study(self, job_id: int) -> str:
    job = retrieval.retrieval_job_run(job_id)
    if job.status == RetrievalJob.Status.RUNNING and not self.request.is_eager:
        # Another worker has it. Should that worker die, this message may be all that brings
        # the job back (the file system broker forgets a message once a worker took it):
        # look again when its lease is over. (Run eagerly, in the caller's process, a retry
        # would come at once and again and again: the caller just gets the job as it is.)
        raise self.retry(countdown=int(retrieval.retrieval_job_lease_left(job)) + 1)
    delay = retrieval.retrieval_job_requeue_after_failure(job)
    if delay is not None:
        raise self.retry(countdown=delay)
    if job.status == RetrievalJob.Status.DONE:
        build_study_metadata.delay(job.study_instance_uid)
    return job.status


@shared_task(acks_late=True)
def build_study_metadata(study_instance_uid: str) -> int:
    """The DICOM JSON of a study just stored, so that the first viewer need not wait for it."""
    return metadata.study_metadata_fill(study_instance_uid)


@shared_task(bind=True)
def take_back_retrieval_jobs(self) -> list[int]:
    """Celery beat runs this every few seconds: the jobs whose worker died (their lease ran
    out) are queued again, each with a message on the queue this sweep came from (the
    default queue when it is called directly)."""
    queue = (self.request.delivery_info or {}).get("routing_key")
    job_ids = retrieval.retrieval_jobs_take_back()
    for job_id in job_ids:
        retrieve_study.apply_async((job_id,), queue=queue)
    return job_ids


@shared_task(acks_late=True)
def purge() -> dict[str, Any]:
    """Celery beat's hourly retention run (portal.settings.CELERY_BEAT_SCHEDULE): the same
    service as `manage.py purge`. Running it twice (a redelivered message) deletes nothing
    twice: each deletion re-checks under a row lock."""
    report = retention.retention_run()
    return {
        "studies": len(report.studies),
        "bytes": report.bytes,
        "codes_released": report.codes_released,
        "over_cap_bytes": report.over_cap_bytes,
    }


@shared_task(acks_late=True)
def index_confirmed_instances() -> int:
    """Index what the storage SCP confirmed to a sender but could not index (its database
    was down, the SCP was killed before it wrote the rows): Celery beat runs this regularly
    (settings.CELERY_BEAT_SCHEDULE), so that a confirmed instance always ends in the index.
    Returns how many instances it indexed."""
    return journal_replay().indexed


def retrieval_job_enqueue(job: RetrievalJob) -> None:
    """Have a worker run the job once the current transaction (if any) commits."""
    transaction.on_commit(lambda: retrieve_study.delay(job.pk))


@worker_ready.connect
def resume_unfinished_jobs(sender: Any, **kwargs: Any) -> None:
    """A worker killed in the middle of a job leaves it running, and with the file system
    broker, without a message: each worker that starts sends one for every unfinished job,
    on the queue it consumes. Duplicates are harmless: a job runs once at a time, and one
    that another worker holds is looked at again when its lease is over."""
    # A killed worker also leaves the temporary file of the instance it was writing.
    sweep_incoming(older_than=STALE_INCOMING_SECONDS)
    queues = list(sender.app.amqp.queues.consume_from) or [None]
    for job_id in retrieval_jobs_unfinished():
        logger.info("resuming retrieval job %s", job_id)
        retrieve_study.apply_async((job_id,), queue=queues[0])
