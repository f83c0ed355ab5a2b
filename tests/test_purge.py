"""`purge`: study copies no live share needs go, with their files; everything else stays."""

import json
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.utils import timezone
from pytest_django.fixtures import Settings

from accounts.models import Share
from studies import imports
from studies.demo import synthetic
from studies.models import Instance, RetrievalJob, Study
from tests.support.access import make_share

pytestmark = pytest.mark.django_db


def stored_study(tmp_path: Path, name: str) -> str:
    """A study in the store (files and index), as a retrieval or an import leaves it."""
    datasets = synthetic.make_study(
        patient_name=f"{name}^Test", patient_id=name, modalities=(("CT", 2),), rows=8, columns=8
    )
    imports.dicom_import(synthetic.write_study(datasets, tmp_path / name))
    return str(datasets[0].StudyInstanceUID)


def retrieved(uid: str, *, hours_ago: float = 48, status: str = RetrievalJob.Status.DONE) -> None:
    """As if a retrieval had brought the study (test_retrieval checks that one does)."""
    finished = timezone.now() - timedelta(hours=hours_ago)
    Study.objects.filter(study_instance_uid=uid).update(retrieved_copy=True, archived=False)
    RetrievalJob.objects.create(
        study_instance_uid=uid,
        method="move",
        status=status,
        finished_at=finished if status == RetrievalJob.Status.DONE else None,
    )


def files_of(uid: str, settings: Settings) -> list[Path]:
    return sorted((Path(settings.STORE_DIR) / uid).rglob("*.dcm"))


def purge(*args: str) -> dict:
    out = StringIO()
    call_command("purge", "--json", *args, stdout=out)
    return json.loads(out.getvalue())


def test_it_deletes_copies_whose_shares_all_ended_and_keeps_the_others(
    tmp_path: Path, settings: Settings
) -> None:
    expired, revoked, used, shared, unshared = (
        stored_study(tmp_path, name) for name in ("EXPIRED", "REVOKED", "USED", "SHARED", "NONE")
    )
    for uid in (expired, revoked, used, shared, unshared):
        retrieved(uid)
    make_share(expired)
    Share.objects.filter(study_instance_uid=expired).update(
        expires_at=timezone.now() - timedelta(minutes=1)
    )
    make_share(revoked)
    Share.objects.filter(study_instance_uid=revoked).update(revoked_at=timezone.now())
    make_share(used, single_use=True)
    Share.objects.filter(study_instance_uid=used).update(used_at=timezone.now())
    # Of two shares of one study, one revoked: the live one keeps the study.
    make_share(shared)
    make_share(shared)
    first = Share.objects.filter(study_instance_uid=shared).order_by("pk")[0]
    Share.objects.filter(pk=first.pk).update(revoked_at=timezone.now())
    kept_files = files_of(shared, settings)
    gone = {expired, revoked, used, unshared}
    gone_bytes = sum(
        Instance.objects.filter(series__study__study_instance_uid__in=gone).values_list(
            "size", flat=True
        )
    )

    report = purge()

    assert set(report["studies"]) == gone
    assert report["instances"] == 8
    assert report["bytes"] == gone_bytes > 0
    assert set(Study.objects.values_list("study_instance_uid", flat=True)) == {shared}
    assert not Instance.objects.filter(series__study__study_instance_uid__in=gone).exists()
    for uid in gone:
        assert files_of(uid, settings) == []
    assert files_of(shared, settings) == kept_files
    # The access codes of the dead shares are free for new shares.
    assert report["codes_released"] == 4
    assert not Share.objects.filter(study_instance_uid__in=gone, code_prefix__isnull=False).exists()
    # A second purge finds nothing more to do.
    assert purge()["studies"] == []


def test_it_keeps_the_local_archive_and_studies_being_or_just_retrieved(
    tmp_path: Path, settings: Settings
) -> None:
    settings.PURGE_GRACE_HOURS = 24
    archive, recent, running, queued = (
        stored_study(tmp_path, name) for name in ("ARCHIVE", "RECENT", "RUNNING", "QUEUED")
    )
    retrieved(recent, hours_ago=2)  # staff may be about to share it
    retrieved(running, status=RetrievalJob.Status.RUNNING)
    retrieved(queued, hours_ago=72)
    retrieved(queued, status=RetrievalJob.Status.QUEUED)  # asked for again

    assert purge()["studies"] == []
    assert Study.objects.count() == 4
    assert all(files_of(uid, settings) for uid in (archive, recent, running, queued))


def test_a_dry_run_says_what_would_go_and_deletes_nothing(
    tmp_path: Path, settings: Settings
) -> None:
    uid = stored_study(tmp_path, "DRY")
    retrieved(uid)
    make_share(uid)
    Share.objects.update(expires_at=timezone.now() - timedelta(days=1))

    report = purge("--dry-run")

    assert report["dry_run"] is True
    assert report["studies"] == [uid]
    assert report["instances"] == 2
    assert report["codes_released"] == 0
    assert Study.objects.filter(study_instance_uid=uid).exists()
    assert len(files_of(uid, settings)) == 2
    assert Share.objects.get().code_prefix is not None


def test_it_says_what_it_did_in_words(tmp_path: Path) -> None:
    uid = stored_study(tmp_path, "WORDS")
    retrieved(uid)
    out = StringIO()
    call_command("purge", stdout=out)
    assert "Deleted 1 studies (2 instances" in out.getvalue()
    assert uid in out.getvalue()


def test_it_never_deletes_the_local_archive(tmp_path: Path, settings: Settings) -> None:
    """A study imported from a CD stays, even with a retrieval job for it that failed."""
    uid = stored_study(tmp_path, "CD")
    RetrievalJob.objects.create(
        study_instance_uid=uid,
        method="move",
        status=RetrievalJob.Status.FAILED,
        finished_at=timezone.now() - timedelta(days=3),
    )

    assert purge()["studies"] == []
    assert len(files_of(uid, settings)) == 2


def test_an_import_makes_a_retrieved_copy_part_of_the_archive(
    tmp_path: Path, settings: Settings
) -> None:
    uid = stored_study(tmp_path, "COPY")
    retrieved(uid)
    assert Study.objects.get(study_instance_uid=uid).retrieved_copy

    imports.dicom_import([tmp_path / "COPY"])  # staff import the same study from a CD

    assert not Study.objects.get(study_instance_uid=uid).retrieved_copy
    assert purge()["studies"] == []


def test_it_clears_expired_sessions() -> None:
    from django.contrib.sessions.backends.db import SessionStore
    from django.contrib.sessions.models import Session

    old, current = SessionStore(), SessionStore()
    for store in (old, current):
        store["x"] = 1
        store.save()
    Session.objects.filter(session_key=old.session_key).update(
        expire_date=timezone.now() - timedelta(minutes=1)
    )
    assert purge()["expired_sessions_cleared"] is True
    assert list(Session.objects.values_list("session_key", flat=True)) == [current.session_key]
