"""Reads of the studies domain."""

from django.db.models import Q, QuerySet

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


def study_uids_of_patient(text: str) -> QuerySet[Study, str]:
    """The Study Instance UIDs of the studies in the index whose patient ID is `text`, or
    whose patient's name holds each of its words (DUPONT^Marie for "marie dupont")."""
    words = text.replace("^", " ").split()
    if not words:
        return Study.objects.none().values_list("study_instance_uid", flat=True)
    by_name = Q()
    for word in words:
        by_name &= Q(patient_name__icontains=word)
    return Study.objects.filter(Q(patient_id=text.strip()) | by_name).values_list(
        "study_instance_uid", flat=True
    )
