"""Retention: the purge of what no one needs any more.

A study retrieved from a PACS is a copy, made for a share: the PACS keeps the original. Once
no live share needs it (each of its shares expired, was revoked or used up), nothing is
retrieving it, and its last retrieval ended more than PURGE_GRACE_HOURS ago, `purge` deletes
its files and index rows. Studies that no retrieval job brought (pushed to the storage SCP,
imported from a CD) are the local archive: the purge leaves them alone.
"""

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Q, QuerySet, Sum
from django.utils import timezone

from accounts import selectors as access
from accounts import services as shares
from studies.models import Instance, RetrievalJob, Study
from studies.store import STALE_INCOMING_SECONDS, study_delete, sweep_incoming

logger = logging.getLogger(__name__)


@dataclass
class PurgeReport:
    codes_released: int = 0
    studies: list[str] = field(default_factory=list)  # Study Instance UIDs deleted
    instances: int = 0
    bytes: int = 0
    temporary_files: int = 0


def studies_unneeded(*, now: datetime | None = None) -> QuerySet[Study]:
    """Retrieved studies that no live share needs and no retrieval is about to."""
    now = now or timezone.now()
    retrieved = RetrievalJob.objects.values("study_instance_uid")
    recent = Q(status__in=[RetrievalJob.Status.QUEUED, RetrievalJob.Status.RUNNING]) | Q(
        finished_at__gt=now - timedelta(hours=settings.PURGE_GRACE_HOURS)
    )
    busy = RetrievalJob.objects.filter(recent).values("study_instance_uid")
    # By UID, not by the share's study link: a share made before its study arrived has none.
    needed = access.shares_live(now=now).values("study_instance_uid")
    return (
        Study.objects.filter(study_instance_uid__in=retrieved)
        .exclude(study_instance_uid__in=busy)
        .exclude(study_instance_uid__in=needed)
        .order_by("pk")
    )


def store_purge(*, dry_run: bool = False, now: datetime | None = None) -> PurgeReport:
    """Release the access codes of dead shares, delete the study copies no one needs and the
    temporary files interrupted transfers left behind. With `dry_run`, only say what would go."""
    now = now or timezone.now()
    report = PurgeReport()
    for study in studies_unneeded(now=now):
        instances = Instance.objects.filter(series__study=study)
        report.instances += instances.count()
        report.bytes += instances.aggregate(total=Sum("size"))["total"] or 0
        report.studies.append(study.study_instance_uid)
        if not dry_run:
            study_delete(study)
            logger.info("purged study %s: no live share needs it", study.study_instance_uid)
    if not dry_run:
        report.codes_released = shares.shares_release_dead_codes(now=now)
        report.temporary_files = sweep_incoming(older_than=STALE_INCOMING_SECONDS)
    return report
