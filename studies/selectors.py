"""Reads of the studies domain (the staff search is studies.search's)."""

from collections.abc import Sequence
from dataclasses import dataclass

from django.db.models import Count

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


@dataclass(frozen=True)
class StudyProgress:
    """How far one study of a share is on its way into the store."""

    study_instance_uid: str
    description: str
    study_date: str
    # ready: in the store, nothing running; queued, running, failed: its latest retrieval
    # job's status; waiting: neither in the store nor asked for (a local study not there yet).
    state: str
    received: int
    expected: int | None
    job: RetrievalJob | None

    @property
    def percent(self) -> int:
        if self.state == "ready":
            return 100
        if not self.expected:
            return 0
        return min(100, round(100 * self.received / self.expected))


def share_progress(study_uids: Sequence[str]) -> list[StudyProgress]:
    """The progress of each study a share grants, in the share's order (current study first).
    A study counts from its latest retrieval job; once the store holds it and no job is
    pending, it is ready."""
    studies = {
        s.study_instance_uid: s
        for s in Study.objects.filter(study_instance_uid__in=study_uids).annotate(
            n_instances=Count("series__instances")
        )
    }
    in_store = set(
        Study.objects.in_store()
        .filter(study_instance_uid__in=study_uids)
        .values_list("study_instance_uid", flat=True)
    )
    latest: dict[str, RetrievalJob] = {}
    jobs = RetrievalJob.objects.filter(study_instance_uid__in=study_uids).select_related("pacs")
    for each in jobs:
        # Jobs come newest first (Meta.ordering): the first of each study is its latest.
        latest.setdefault(each.study_instance_uid, each)
    progress = []
    for uid in study_uids:
        study = studies.get(uid)
        stored = int(getattr(study, "n_instances", 0) or 0)
        job: RetrievalJob | None = latest.get(uid)
        if job is not None and job.status != RetrievalJob.Status.DONE:
            state, received, expected = str(job.status), job.received, job.expected
        elif uid in in_store:
            state, received = "ready", stored
            expected = max(stored, job.expected or 0) if job is not None else stored
        else:
            state, received, expected = "waiting", stored, None
        progress.append(
            StudyProgress(
                study_instance_uid=uid,
                description=study.study_description if study is not None else "",
                study_date=study.study_date if study is not None else "",
                state=state,
                received=received,
                expected=expected,
                job=job,
            )
        )
    return progress
