"""Retention: the purge of what no one needs any more.

A study a retrieval brought into the store for a share is a copy (`Study.retrieved_copy`): the
PACS keeps the original. Once no live share needs it (each of its shares expired, was revoked
or used up), nothing is retrieving it, and its last retrieval ended more than
PURGE_GRACE_HOURS ago, `purge` deletes its files and index rows. Everything else (pushed to the
storage SCP, imported from a CD) is the local archive: the purge leaves it alone.

With a cap on the store's size (settings.STORE_MAX_BYTES), the purge then deletes unneeded
copies still within their grace hours too, oldest first, until the store is under the cap. A
copy a live share needs is never deleted: the store stays over its cap and the purge says so
(an error in the log, an audit event). Each deletion is an audit event. Celery beat runs the
purge (studies.tasks.purge); so may cron, through `manage.py purge`.
"""

import logging
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import import_module
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet, Sum
from django.utils import timezone

from accounts import selectors as access
from accounts import services as shares
from accounts.models import AuditEvent
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
    # Studies deleted to bring the store under its cap (also in `studies`).
    studies_over_cap: list[str] = field(default_factory=list)
    # Bytes of instances in the store afterwards, and by how much it is still over its cap.
    store_bytes: int = 0
    over_cap_bytes: int = 0
    expired_sessions_cleared: bool = False


def studies_unneeded(*, now: datetime | None = None, grace: bool = True) -> QuerySet[Study]:
    """Retrieved copies that no live share needs and no retrieval is about to; oldest first.
    Without `grace`, also those retrieved within PURGE_GRACE_HOURS (for the store's cap)."""
    now = now or timezone.now()
    recent = Q(status__in=[RetrievalJob.Status.QUEUED, RetrievalJob.Status.RUNNING])
    if grace:
        recent |= Q(finished_at__gt=now - timedelta(hours=settings.PURGE_GRACE_HOURS))
    busy = RetrievalJob.objects.filter(recent).values("study_instance_uid")
    # By UID, not by the share's study link: a share made before its study arrived has none.
    needed = access.shared_study_uids_live(now=now)
    return (
        Study.objects.filter(retrieved_copy=True)
        .exclude(study_instance_uid__in=busy)
        .exclude(study_instance_uid__in=needed)
        .order_by("created_at", "pk")
    )


def store_purge(*, dry_run: bool = False, now: datetime | None = None) -> PurgeReport:
    """Release the access codes of dead shares, delete the study copies no one needs and the
    temporary files interrupted transfers left behind. With `dry_run`, only say what would go."""
    now = now or timezone.now()
    report = PurgeReport()
    for study in studies_unneeded(now=now):
        _purge_one(study, report, now=now, dry_run=dry_run, grace=True)
    report.store_bytes = _store_bytes()
    if dry_run:
        # What is already listed as going no longer counts against the cap.
        report.store_bytes -= report.bytes
    cap = settings.STORE_MAX_BYTES
    if cap and report.store_bytes > cap:
        for study in studies_unneeded(now=now, grace=False).exclude(
            study_instance_uid__in=report.studies
        ):
            if report.store_bytes <= cap:
                break
            size = _purge_one(study, report, now=now, dry_run=dry_run, grace=False)
            if size is not None:
                report.studies_over_cap.append(study.study_instance_uid)
                report.store_bytes -= size
        report.over_cap_bytes = max(0, report.store_bytes - cap)
        if report.over_cap_bytes and not dry_run:
            # Only what live shares need (and the local archive) is left: never deleted.
            logger.error(
                "the store holds %d bytes, over its cap of %d: what is left is needed by live "
                "shares or is the local archive",
                report.store_bytes,
                cap,
            )
            shares.audit(
                AuditEvent.Action.STORE_OVER_CAP,
                store_bytes=report.store_bytes,
                cap_bytes=cap,
            )
    if not dry_run:
        report.codes_released = shares.shares_release_dead_codes(now=now)
        report.temporary_files = sweep_incoming(older_than=STALE_INCOMING_SECONDS)
    return report


def retention_run(*, dry_run: bool = False) -> PurgeReport:
    """The scheduled retention work (the `purge` command and the beat task): `store_purge`,
    then the sessions past their expiry (Django's clearsessions): each visitor who ever got
    one (a recipient, a member of staff) left a row."""
    report = store_purge(dry_run=dry_run)
    if not dry_run:
        import_module(settings.SESSION_ENGINE).SessionStore.clear_expired()
        report.expired_sessions_cleared = True
    return report


def _store_bytes() -> int:
    return int(Instance.objects.aggregate(total=Sum("size"))["total"] or 0)


def _purge_one(
    study: Study, report: PurgeReport, *, now: datetime, dry_run: bool, grace: bool
) -> int | None:
    """Delete one study copy (or, dry, only count it) into the report; its size in bytes, or
    None if it stayed."""
    instances = Instance.objects.filter(series__study=study)
    count, size = instances.count(), int(instances.aggregate(total=Sum("size"))["total"] or 0)
    reason = "unneeded" if grace else "store_cap"
    if not dry_run and not _study_purge(
        study.pk, now=now, grace=grace, reason=reason, instances=count, size=size
    ):
        return None
    report.studies.append(study.study_instance_uid)
    report.instances += count
    report.bytes += size
    return size


def _study_purge(
    study_id: int,
    *,
    now: datetime,
    grace: bool = True,
    reason: str = "unneeded",
    instances: int = 0,
    size: int = 0,
) -> bool:
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
            if (
                study is None
                or not studies_unneeded(now=now, grace=grace).filter(pk=study_id).exists()
            ):
                return False
            uid = study.study_instance_uid
            study.delete()
            # In the same transaction: the deletion and its record commit together.
            shares.audit(
                AuditEvent.Action.STUDY_PURGED,
                study=uid,
                instances=instances,
                bytes=size,
                reason=reason,
            )
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
    logger.info("purged study %s: no live share needs it (%s)", uid, reason)
    return True
