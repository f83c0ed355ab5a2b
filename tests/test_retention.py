"""Scheduled retention: Celery beat runs `purge` (a real worker runs the task), every deletion
and every share that ended is an audit event, the store's size cap deletes the oldest
unneeded copies first and never what a live share needs, and staff re-arm a share whose study
was purged (retrieved again from the real Orthanc)."""

import logging
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.utils import timezone, translation

from accounts.models import AuditEvent, Share
from accounts.selectors import share_status
from studies import dicom, retention, retrieval, services, tasks
from studies.models import Instance, PacsNode, RetrievalJob, Study
from tests.conftest import PacsStudies, assert_store_consistent
from tests.support.access import make_share
from tests.support.worker import CeleryWorker
from tests.test_purge import files_of, purge, retrieved, stored_study

# --- audit of what the purge does ----------------------------------------------------------


@pytest.mark.django_db
def test_each_deletion_and_each_ended_share_is_an_audit_event(
    tmp_path: Path, settings: Any
) -> None:
    expired, revoked, live = (stored_study(tmp_path, n) for n in ("EXPIRED", "REVOKED", "LIVE"))
    for uid in (expired, revoked, live):
        retrieved(uid)
    ended = make_share(expired).share
    Share.objects.filter(pk=ended.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    gone = make_share(revoked).share
    Share.objects.filter(pk=gone.pk).update(revoked_at=timezone.now())
    make_share(live)
    size = sum(
        Instance.objects.filter(series__study__study_instance_uid=expired).values_list(
            "size", flat=True
        )
    )

    report = purge()

    assert set(report["studies"]) == {expired, revoked}
    purged = {
        e.detail["study"]: e.detail
        for e in AuditEvent.objects.filter(action=AuditEvent.Action.STUDY_PURGED)
    }
    assert set(purged) == {expired, revoked}
    assert purged[expired] == {
        "study": expired,
        "instances": 2,
        "bytes": size,
        "reason": "unneeded",
    }
    # The expired share is recorded as ended, once; the revoked one had its own event.
    (end,) = AuditEvent.objects.filter(action=AuditEvent.Action.SHARE_EXPIRED)
    assert end.share_id == ended.pk and end.detail == {"reason": "expired"}
    purge()
    assert AuditEvent.objects.filter(action=AuditEvent.Action.SHARE_EXPIRED).count() == 1
    assert AuditEvent.objects.filter(action=AuditEvent.Action.STUDY_PURGED).count() == 2
    call_command("audit", "verify", stdout=StringIO())


@pytest.mark.django_db
def test_a_dry_run_records_nothing(tmp_path: Path) -> None:
    uid = stored_study(tmp_path, "DRY")
    retrieved(uid)
    assert purge("--dry-run")["studies"] == [uid]
    assert not AuditEvent.objects.exists()


# --- the store's cap ------------------------------------------------------------------------


def study_bytes(uid: str) -> int:
    return sum(
        Instance.objects.filter(series__study__study_instance_uid=uid).values_list(
            "size", flat=True
        )
    )


def age(uid: str, days: int) -> None:
    Study.objects.filter(study_instance_uid=uid).update(
        created_at=timezone.now() - timedelta(days=days)
    )


@pytest.mark.django_db
def test_over_its_cap_the_store_loses_the_oldest_unneeded_copies_first(
    tmp_path: Path, settings: Any
) -> None:
    settings.PURGE_GRACE_HOURS = 24
    oldest, older, newest, needed = (
        stored_study(tmp_path, n) for n in ("OLDEST", "OLDER", "NEWEST", "NEEDED")
    )
    archive = stored_study(tmp_path, "ARCHIVE")  # imported: never a copy
    for days, uid in ((9, oldest), (6, older), (3, newest), (12, needed)):
        retrieved(uid, hours_ago=2)  # all within the grace hours: without a cap, all stay
        age(uid, days)
    age(archive, 20)
    make_share(needed)
    sizes = {uid: study_bytes(uid) for uid in (oldest, older, newest, needed, archive)}
    total = sum(sizes.values())
    assert purge()["studies"] == []

    # Just under what is there without the oldest two: they go, the newest stays.
    settings.STORE_MAX_BYTES = total - sizes[oldest] - sizes[older]
    report = purge()

    assert report["studies"] == [oldest, older]
    assert report["studies_over_cap"] == [oldest, older]
    assert report["over_cap_bytes"] == 0
    assert report["store_bytes"] == settings.STORE_MAX_BYTES
    assert set(Study.objects.values_list("study_instance_uid", flat=True)) == {
        newest,
        needed,
        archive,
    }
    assert files_of(oldest, settings) == [] and files_of(newest, settings)
    reasons = AuditEvent.objects.filter(action=AuditEvent.Action.STUDY_PURGED).values_list(
        "detail__reason", flat=True
    )
    assert list(reasons) == ["store_cap", "store_cap"]


@pytest.mark.django_db
def test_a_copy_a_live_share_needs_stays_even_over_the_cap(
    tmp_path: Path, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    needed, spare = stored_study(tmp_path, "NEEDED"), stored_study(tmp_path, "SPARE")
    for uid in (needed, spare):
        retrieved(uid, hours_ago=1)
    make_share(needed)
    settings.STORE_MAX_BYTES = 1

    with caplog.at_level(logging.ERROR, logger="studies.retention"):
        report = purge()

    assert report["studies"] == [spare]
    assert report["over_cap_bytes"] == study_bytes(needed) - 1
    assert Study.objects.filter(study_instance_uid=needed).exists()
    assert len(files_of(needed, settings)) == 2
    assert "over its cap" in caplog.text
    alert = AuditEvent.objects.get(action=AuditEvent.Action.STORE_OVER_CAP)
    assert alert.detail == {"store_bytes": study_bytes(needed), "cap_bytes": 1}
    out = StringIO()
    call_command("purge", stdout=out)
    assert "over its cap" in out.getvalue()


@pytest.mark.django_db
def test_without_a_cap_recent_copies_stay(tmp_path: Path, settings: Any) -> None:
    settings.STORE_MAX_BYTES = 0
    uid = stored_study(tmp_path, "RECENT")
    retrieved(uid, hours_ago=1)
    assert purge()["studies"] == []


# --- Celery beat and a real worker -------------------------------------------------------------


def test_beat_schedules_purge_and_the_audit_prune_as_tasks_the_workers_know(
    settings: Any,
) -> None:
    from portal.celery import app

    app.loader.import_default_modules()
    schedule = settings.CELERY_BEAT_SCHEDULE
    assert schedule["purge"]["task"] == "studies.tasks.purge"
    assert schedule["purge"]["schedule"] == timedelta(minutes=60)
    assert schedule["audit-prune"]["task"] == "accounts.tasks.audit_prune"
    for entry in schedule.values():
        assert entry["task"] in app.tasks
    assert app.conf.beat_schedule == schedule


@pytest.fixture(scope="module")
def worker(
    django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CeleryWorker]:
    with CeleryWorker(workdir=tmp_path_factory.mktemp("retention-worker")) as running:
        yield running


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_runs_the_scheduled_purge(
    worker: CeleryWorker, tmp_path: Path, settings: Any
) -> None:
    from tests.conftest import wait_until

    settings.STORE_DIR = worker.store_dir  # the worker deletes from its own store
    gone, kept = stored_study(tmp_path, "GONE"), stored_study(tmp_path, "KEPT")
    for uid in (gone, kept):
        retrieved(uid)
    make_share(kept)
    expired = make_share(gone).share
    Share.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(days=1))

    with worker.producer_app():
        tasks.purge.delay()

    try:
        wait_until(
            lambda: AuditEvent.objects.filter(action=AuditEvent.Action.SHARE_EXPIRED).exists(),
            timeout=60,
        )
    except AssertionError:
        raise AssertionError(worker.log_tail()) from None
    assert not Study.objects.filter(study_instance_uid=gone).exists()
    assert files_of(gone, settings) == []
    assert len(files_of(kept, settings)) == 2
    assert AuditEvent.objects.get(action=AuditEvent.Action.STUDY_PURGED).detail["study"] == gone
    assert "Task studies.tasks.purge[" in worker.log()


def data_set(part10: bytes) -> bytes:
    return part10[dicom.dataset_offset(part10) :]


# --- re-arming a share whose study was purged --------------------------------------------------


@pytest.mark.dicom
@pytest.mark.django_db(transaction=True)
def test_staff_rearm_a_live_share_whose_study_copy_is_gone(
    orthanc_node: PacsNode,
    pacs_studies: PacsStudies,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    study = pacs_studies.latin1
    queued: list[RetrievalJob] = []
    # The jobs are run here, by the same service the worker's task calls.
    monkeypatch.setattr(tasks, "retrieval_job_enqueue", queued.append)
    shared = services.study_share(
        study_instance_uid=study.uid,
        node=orthanc_node,
        recipient="patient",
        channel="sms",
        contact="+33612345642",
    )
    share = shared.created.share
    assert retrieval.retrieval_job_run(queued.pop().pk).status == RetrievalJob.Status.DONE
    assert Instance.objects.filter(series__study__study_instance_uid=study.uid).count() == 7

    # The share expires; a day later the purge deletes its copy.
    Share.objects.filter(pk=share.pk).update(expires_at=timezone.now() - timedelta(hours=1))
    RetrievalJob.objects.update(finished_at=timezone.now() - timedelta(days=2))
    assert retention.store_purge().studies == [study.uid]
    assert files_of(study.uid, settings) == []
    share.refresh_from_db()
    with translation.override("en"), pytest.raises(ValidationError) as info:
        services.share_rearm(share=share)
    assert "share the study again" in info.value.messages[0]
    assert queued == []

    # A live share without its copy: what a purge racing the share's creation leaves, or a
    # store restored from an older backup. Its patient would see "being prepared" for ever.
    # Re-armed, it retrieves its study again from the node it came from.
    Share.objects.filter(pk=share.pk).update(expires_at=timezone.now() + timedelta(days=7))
    out = StringIO()
    call_command("share", "rearm", str(share.pk), stdout=out)
    (job,) = queued
    assert f"Retrieval job {job.pk} queued from orthanc (" in out.getvalue()
    assert retrieval.retrieval_job_run(job.pk).status == RetrievalJob.Status.DONE

    stored = {
        i.sop_instance_uid: data_set((Path(settings.STORE_DIR) / i.file_path).read_bytes())
        for i in Instance.objects.filter(series__study__study_instance_uid=study.uid)
    }
    # Byte for byte the data sets the PACS holds (the file meta header is the receiver's).
    assert stored == {uid: data_set(part10) for uid, part10 in study.files.items()}
    assert_store_consistent()
    share.refresh_from_db()
    assert share_status(share) == "active"
    event = AuditEvent.objects.get(action=AuditEvent.Action.SHARE_REARMED)
    assert event.share_id == share.pk and event.detail == {"studies": [study.uid], "jobs": [job.pk]}

    # With everything in the store, there is nothing to do.
    out = StringIO()
    call_command("share", "rearm", str(share.pk), stdout=out)
    assert "nothing to do" in out.getvalue()
    assert len(queued) == 1


@pytest.mark.django_db
def test_rearm_refuses_a_study_with_no_known_node_and_queues_nothing() -> None:
    from django.core.management import CommandError

    share = make_share("1.2.826.0.1.3680043.8.498.7777").share
    translation.activate("en")  # whatever a test before left active
    with pytest.raises(CommandError, match="No PACS node is known"):
        call_command("share", "rearm", str(share.pk))
    with pytest.raises(CommandError, match="No PACS node named 'nowhere'"):
        call_command("share", "rearm", str(share.pk), "--pacs", "nowhere")
    assert not RetrievalJob.objects.exists()
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.SHARE_REARMED).exists()


@pytest.mark.parametrize(
    ("name", "value", "check_id"),
    [
        ("AUDIT_RETENTION_DAYS", 0, "accounts.E030"),
        ("STORE_MAX_BYTES", -1, "studies.E010"),
        ("PURGE_INTERVAL_MINUTES", 0, "studies.E011"),
    ],
)
def test_bad_retention_settings_fail_at_start_up(
    settings: Any, name: str, value: int, check_id: str
) -> None:
    from django.core.checks import run_checks

    def ids() -> set[str]:
        return {message.id for message in run_checks() if message.id}

    assert check_id not in ids()
    setattr(settings, name, value)
    assert check_id in ids()
