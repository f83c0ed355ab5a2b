"""Reads of the studies domain (the staff search is studies.search's)."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from django.db import models
from django.db.models import Case, Count, Exists, OuterRef, Q, QuerySet, Subquery, Value, When
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from accounts.models import Share, SharedStudy, ShareQuerySet
from accounts.selectors import share_locked_q
from studies.models import PacsNode, RetrievalJob, Study


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


def share_studies_lost(share: Share) -> list[str]:
    """The studies of a live share that the store no longer holds and that no job is
    fetching: what "re-arm" (studies.services.share_rearm) would retrieve again."""
    if share.refusal() is not None:
        return []
    fetching = set(
        RetrievalJob.objects.filter(
            study_instance_uid__in=share.study_uids,
            status__in=[RetrievalJob.Status.QUEUED, RetrievalJob.Status.RUNNING],
        ).values_list("study_instance_uid", flat=True)
    )
    return [uid for uid in share.study_uids if uid not in fetching and not study_in_store(uid)]


# --- shares as staff see them ---------------------------------------------------------------


class ShareStatus(models.TextChoices):
    """A share's status in the staff's list: why it can no longer be opened (the values of
    accounts.models.Refusal), else locked, else whether the store holds its studies yet."""

    RETRIEVING = "retrieving", _("Retrieving")
    ACTIVE = "active", _("Active")
    LOCKED = "locked", _("Locked")
    EXPIRED = "expired", _("Expired")
    USED = "used", _("Used (single use)")
    REVOKED = "revoked", _("Revoked")


def _shares_granting(studies: QuerySet[Study]) -> Exists:
    """The condition "the share grants one of these studies", for a filter on shares."""
    uids = studies.values("study_instance_uid")
    return Exists(SharedStudy.objects.filter(share=OuterRef("pk"), study_instance_uid__in=uids))


def _patient_q(term: str) -> Q:
    """A patient ID (exactly, whatever the case) or a name: each word typed must be in it
    (names are stored as DICOM writes them, "DUPONT^Marie")."""
    by_name = Q()
    for word in term.replace("^", " ").split():
        by_name &= Q(patient_name__icontains=word)
    return Q(patient_id__iexact=term) | by_name


def share_list_with_status(
    *, status: str = "", patient: str = "", now: datetime | None = None
) -> ShareQuerySet:
    """Shares, newest first, each with `status` (a ShareStatus value) and the patient's name
    and ID as the index knows them (empty until the first image of the study arrives).

    "retrieving" is a live share one of whose studies the store does not hold yet
    (`StudyQuerySet.in_store`): the same rule as accounts.selectors.share_status's "pending",
    for a whole list at once."""
    now = now or timezone.now()
    in_store = Study.objects.in_store().values("study_instance_uid")
    missing = SharedStudy.objects.filter(share=OuterRef("pk")).exclude(
        study_instance_uid__in=in_store
    )
    current = Study.objects.filter(study_instance_uid=OuterRef("study_instance_uid"))
    shares = (
        Share.objects.with_refusal(now=now)
        .select_related("created_by")
        .annotate(
            status=Case(
                When(refusal_reason__isnull=False, then="refusal_reason"),
                When(share_locked_q(now=now), then=Value(ShareStatus.LOCKED.value)),
                When(Exists(missing), then=Value(ShareStatus.RETRIEVING.value)),
                When(
                    ~Q(study_instance_uid__in=in_store),
                    then=Value(ShareStatus.RETRIEVING.value),
                ),
                default=Value(ShareStatus.ACTIVE.value),
                output_field=models.CharField(),
            ),
            patient_name=Subquery(current.values("patient_name")[:1]),
            patient_id=Subquery(current.values("patient_id")[:1]),
        )
        .order_by("-created_at", "-pk")
    )
    if status:
        shares = shares.filter(status=status)
    patient = patient.strip()
    if patient:
        shares = shares.filter(_shares_granting(Study.objects.filter(_patient_q(patient))))
    return shares


def share_with_status(pk: int) -> Share | None:
    return share_list_with_status().filter(pk=pk).first()


def patient_live_shares(patient_id: str, *, now: datetime | None = None) -> ShareQuerySet:
    """Every live share that grants a study of this patient (the Patient ID as the index holds
    it, exactly), whichever node the study came from, newest first. A share whose study has
    not begun to arrive yet is not known to be this patient's: the index has no row for it."""
    patient_id = patient_id.strip()
    if not patient_id:
        return Share.objects.none()
    studies = Study.objects.filter(patient_id=patient_id)
    return share_list_with_status(now=now).live(now=now).filter(_shares_granting(studies))


# --- PACS nodes ---------------------------------------------------------------------------


def pacs_node_list() -> QuerySet[PacsNode]:
    unfinished = [RetrievalJob.Status.QUEUED, RetrievalJob.Status.RUNNING]
    return PacsNode.objects.annotate(
        jobs_unfinished=models.Count("jobs", filter=Q(jobs__status__in=unfinished))
    ).order_by("name")


def pacs_node_jobs_unfinished(node: PacsNode) -> int:
    """Retrieval jobs of this node queued or running."""
    return RetrievalJob.objects.filter(
        pacs=node, status__in=[RetrievalJob.Status.QUEUED, RetrievalJob.Status.RUNNING]
    ).count()


def live_shares_of_unknown_patient(*, now: datetime | None = None) -> ShareQuerySet:
    """Live shares one of whose studies has no row in the index yet (not a single image has
    arrived): whose patient they are, the portal cannot tell. Listed beside a revocation by
    patient, which cannot include them."""
    indexed = Study.objects.values("study_instance_uid")
    unknown = SharedStudy.objects.filter(share=OuterRef("pk")).exclude(
        study_instance_uid__in=indexed
    )
    return share_list_with_status(now=now).live(now=now).filter(Exists(unknown))


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
