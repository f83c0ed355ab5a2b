"""Reads of the studies domain."""

from studies.models import RetrievalJob, Study


def study_in_store(study_instance_uid: str) -> bool:
    """Whether the store holds the study (see `StudyQuerySet.in_store`)."""
    return Study.objects.in_store().filter(study_instance_uid=study_instance_uid).exists()


def retrieval_jobs_unfinished() -> list[int]:
    """The ids of jobs queued or running: what a worker that starts sends itself again."""
    return list(
        RetrievalJob.objects.filter(
            status__in=[RetrievalJob.Status.QUEUED, RetrievalJob.Status.RUNNING]
        ).values_list("pk", flat=True)
    )
