"""Retention: the purge of what no one needs any more.

A study a retrieval brought into the store for a share is a copy (`Study.retrieved_copy`): the
PACS keeps the original. Once no live share needs it (each of its shares expired, was revoked
or used up), nothing is retrieving it, and its last retrieval ended more than
PURGE_GRACE_HOURS ago, `purge` deletes its files and index rows. Everything else (pushed to the
storage SCP, imported from a CD) is the local archive: the purge leaves it alone.
"""

import logging
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet, Sum
from django.utils import timezone

from accounts import selectors as access
from accounts import services as shares
from studies import dicom
from studies.models import Instance, RetrievalJob, Study
from studies.store import INCOMING, STALE_INCOMING_SECONDS, store_dir, sweep_incoming

logger = logging.getLogger(__name__)


@dataclass
class PurgeReport:
    codes_released: int = 0
    studies: list[str] = field(default_factory=list)  # Study Instance UIDs deleted
    instances: int = 0
    bytes: int = 0
    temporary_files: int = 0


def studies_unneeded(*, now: datetime | None = None) -> QuerySet[Study]:
    """Retrieved copies that no live share needs and no retrieval is about to."""
    now = now or timezone.now()
    recent = Q(status__in=[RetrievalJob.Status.QUEUED, RetrievalJob.Status.RUNNING]) | Q(
        finished_at__gt=now - timedelta(hours=settings.PURGE_GRACE_HOURS)
    )
    busy = RetrievalJob.objects.filter(recent).values("study_instance_uid")
    # By UID, not by the share's study link: a share made before its study arrived has none.
    needed = access.shared_study_uids_live(now=now)
    return (
        Study.objects.disposable()
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
        count, size = instances.count(), instances.aggregate(total=Sum("size"))["total"] or 0
        if not dry_run and not _study_purge(study.pk, now=now):
            continue
        report.studies.append(study.study_instance_uid)
        report.instances += count
        report.bytes += size
    if not dry_run:
        report.codes_released = shares.shares_release_dead_codes(now=now)
        report.temporary_files = sweep_incoming(older_than=STALE_INCOMING_SECONDS)
    return report


def _study_purge(study_id: int, *, now: datetime) -> bool:
    """Delete one study copy, unless a share or a retrieval came for it since it was listed.

    The rows go and the folder is moved aside in one transaction (and moved back if it
    fails): an instance that arrives meanwhile lands in a new folder, never in the one being
    deleted.
    """
    aside: Path | None = None
    folder: Path | None = None
    try:
        with transaction.atomic():
            study = Study.objects.select_for_update().filter(pk=study_id).first()
            if study is None or not studies_unneeded(now=now).filter(pk=study_id).exists():
                return False
            uid = study.study_instance_uid
            study.delete()
            folder = store_dir() / uid
            if dicom.is_valid_uid(uid) and folder.is_dir():
                aside = store_dir() / INCOMING / f"purge-{uid}-{secrets.token_hex(4)}"
                aside.parent.mkdir(parents=True, exist_ok=True)
                folder.rename(aside)
    except BaseException:
        if aside is not None and folder is not None and aside.exists():
            aside.rename(folder)  # the rows are back: so are the files
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    logger.info("purged study %s: no live share needs it", uid)
    return True
