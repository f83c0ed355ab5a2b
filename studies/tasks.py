"""Celery tasks. Each is idempotent: a redelivered message (acks_late) repeats no harm."""

import logging

from celery import shared_task
from django.conf import settings

from studies import services
from studies.models import RetrievalJob

logger = logging.getLogger(__name__)


@shared_task(bind=True, acks_late=True, max_retries=None)
def retrieve_study(self, job_id: int) -> str:  # type: ignore[no-untyped-def]
    job = services.retrieval_job_run(job_id)
    if job.status == RetrievalJob.Status.FAILED and job.attempts <= settings.RETRIEVAL_MAX_RETRIES:
        delay = settings.RETRIEVAL_RETRY_BACKOFF * 2 ** (job.attempts - 1)
        RetrievalJob.objects.filter(pk=job.pk).update(
            status=RetrievalJob.Status.QUEUED,
            error=f"{job.error} (attempt {job.attempts}; trying again in {delay} s)",
        )
        raise self.retry(countdown=delay)
    return job.status
