"""Races that could lose a study, played with real concurrent processes.

- A share made while `purge` deletes that study's copy: either the purge sees the share and
  keeps the copy, or the share sees the copy gone and queues its retrieval. Never a share whose
  study is gone with nothing to bring it back.
- A PACS push racing the portal's own retrieval of the same study: whichever ends last, the
  pushed study stays in the local archive and `purge` keeps it.

Each interleaving is forced rather than hoped for: the test holds a PostgreSQL lock that one
process needs, waits until that process is blocked on it (pg_stat_activity, each process named
by PGAPPNAME), starts the other, then lets go.
"""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.utils import timezone

from accounts.models import Share
from studies import imports, retrieval, services
from studies.demo import synthetic
from studies.dimse.storescp import StorageServer
from studies.models import Instance, PacsNode, RetrievalJob, Study
from studies.store import store_dir
from tests.conftest import MODALITY_AE, PacsStudies, scp_port, wait_until
from tests.support.orthanc import OrthancServer
from tests.support.worker import database_url

pytestmark = pytest.mark.django_db(transaction=True)
# The purge races are forced with PostgreSQL's locks (SQLite serialises every write anyway);
# CI runs the suite on PostgreSQL (.ci/run).
postgresql_only = pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")),
    reason="the interleaving is forced with PostgreSQL's locks",
)


def manage(name: str, *args: str, workdir: Path) -> "subprocess.Popen[str]":
    """`manage.py …` in a process of its own, on the test's database and store; its database
    connection is named `name` (PGAPPNAME) so that the test can see what it waits for."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PORTAL_", "CELERY_")) and key != "DATABASE_URL"
    }
    env.update(
        {
            "DATABASE_URL": database_url(),
            "PGAPPNAME": name,
            "PORTAL_DEBUG": "true",
            "PORTAL_STORE_DIR": str(store_dir()),
            "PORTAL_STORE_MIN_FREE_MB": "0",
            "PORTAL_BROKER_DIR": str(workdir / "broker"),
            "PORTAL_AE_TITLE": str(django_settings.DICOM_AE_TITLE),
        }
    )
    return subprocess.Popen(
        [sys.executable, "manage.py", *args],
        cwd=django_settings.BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: "subprocess.Popen[str]", timeout: float = 120) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, out + err
    return out


def waiting_on_a_lock(name: str) -> bool:
    """Whether the process named `name` is blocked on a lock, right now."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = %s AND wait_event_type = 'Lock'",
            [name],
        )
        return bool(cursor.fetchone()[0])


def blocked_or_done(name: str, process: "subprocess.Popen[str]") -> Callable[[], bool]:
    return lambda: process.poll() is not None or waiting_on_a_lock(name)


@contextmanager
def held(*statements: str) -> Iterator[None]:
    """Run `statements` in a transaction of a connection of its own, and hold the locks they
    take until the block ends."""
    with (
        psycopg.connect(database_url(), application_name="the test") as holder,
        holder.transaction(),
    ):
        for statement in statements:
            holder.execute(statement)
        yield


def stored_copy(tmp_path: Path, name: str) -> str:
    """A study in the store that a retrieval brought two days ago and no share needs: what
    `purge` deletes."""
    datasets = synthetic.make_study(
        patient_name=f"{name}^Race", patient_id=name, modalities=(("CT", 3),), rows=8, columns=8
    )
    imports.dicom_import(synthetic.write_study(datasets, tmp_path / name))
    uid = str(datasets[0].StudyInstanceUID)
    Study.objects.filter(study_instance_uid=uid).update(retrieved_copy=True, archived=False)
    RetrievalJob.objects.create(
        study_instance_uid=uid,
        method="move",
        status=RetrievalJob.Status.DONE,
        finished_at=timezone.now() - timedelta(hours=48),
    )
    return uid


@pytest.fixture
def pacs_node() -> PacsNode:
    # Nothing is retrieved in these tests: the node is only where a share would retrieve from.
    return services.pacs_node_create(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)


def share_create(*uids: str, workdir: Path) -> "subprocess.Popen[str]":
    return manage(
        "share",
        "share", "create", *uids, "--pacs", "pacs", "--patient-email", "alice@example.org",
        "--json",
        workdir=workdir,
    )  # fmt: skip


# --- A share made while `purge` deletes the study's copy ------------------------------------


@postgresql_only
def test_a_share_made_while_the_purge_deletes_the_copy_queues_its_retrieval(
    tmp_path: Path, pacs_node: PacsNode
) -> None:
    """The purge has checked that no live share needs the copy and is deleting it; a share is
    made at that moment, of a new study with that copy as its prior. It must not count on the
    copy it saw: it waits for the purge, finds the study gone and queues its retrieval.

    (A prior: a share's row points at its current study, and that foreign key alone would make
    the share wait for the purge; nothing points at a prior but its UID.)"""
    uid = stored_copy(tmp_path, "PURGED")
    current = "1.2.826.0.1.3680043.8.498.424242"
    first = Instance.objects.filter(series__study__study_instance_uid=uid).order_by("pk")[0]
    # The purge deletes the instance rows first: holding one keeps it in the middle of its
    # deletion, the study's row locked and its check done.
    with held(f"SELECT 1 FROM studies_instance WHERE id = {int(first.pk)} FOR UPDATE"):  # noqa: S608
        purge = manage("purge", "purge", "--json", workdir=tmp_path)
        wait_until(blocked_or_done("purge", purge), timeout=60)
        assert purge.poll() is None, "the purge did not reach the deletion"
        sharing = share_create(current, uid, workdir=tmp_path)
        # The share waits for the purge to end (or, without a lock, ends on its own).
        wait_until(blocked_or_done("share", sharing), timeout=60)
    assert json.loads(finished(purge))["studies"] == [uid]
    created = json.loads(finished(sharing))

    assert not Study.objects.filter(study_instance_uid=uid).exists()
    share = Share.objects.get(pk=created["id"])
    assert share.revoked_at is None
    # The share will get its study: a retrieval is queued for it.
    assert RetrievalJob.objects.filter(
        study_instance_uid=uid, pacs=pacs_node, status=RetrievalJob.Status.QUEUED
    ).exists()


@postgresql_only
def test_a_purge_that_comes_while_a_share_is_made_keeps_the_copy(
    tmp_path: Path, pacs_node: PacsNode
) -> None:
    """A share is being made (its transaction not yet committed) when the purge comes: the
    purge waits for it, sees the share and keeps the copy; no retrieval is needed."""
    uid = stored_copy(tmp_path, "KEPT")
    # Writing the share's list of studies is the share's last step: holding that table keeps
    # the share's transaction open, its study's row locked.
    with held("LOCK TABLE accounts_sharedstudy IN SHARE MODE"):
        sharing = share_create(uid, workdir=tmp_path)
        wait_until(blocked_or_done("share", sharing), timeout=60)
        assert sharing.poll() is None, "the share did not reach its last step"
        purge = manage("purge", "purge", "--json", workdir=tmp_path)
        wait_until(blocked_or_done("purge", purge), timeout=60)
    created = json.loads(finished(sharing))
    assert json.loads(finished(purge))["studies"] == []

    assert Instance.objects.filter(series__study__study_instance_uid=uid).count() == 3
    assert len(list((store_dir() / uid).rglob("*.dcm"))) == 3
    assert created["status"] != "pending"
    assert not RetrievalJob.objects.filter(pacs=pacs_node).exists()


# --- A PACS push racing the portal's own retrieval ----------------------------------------


def push(storage_scp: StorageServer, folder: Path) -> "subprocess.Popen[str]":
    """storescu from the modality, as a process of its own."""
    return subprocess.Popen(
        [
            "storescu", "+sd", "-aet", MODALITY_AE, "-aec", storage_scp.ae_title,
            "127.0.0.1", str(scp_port(storage_scp)), str(folder),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def forget(uid: str) -> None:
    """Remove a study from the portal (rows and files), as if it had never come."""
    Study.objects.filter(study_instance_uid=uid).delete()
    shutil.rmtree(store_dir() / uid, ignore_errors=True)


def assert_in_the_archive(uid: str, count: int, workdir: Path) -> None:
    study = Study.objects.get(study_instance_uid=uid)
    assert study.archived and not study.retrieved_copy
    assert (
        json.loads(finished(manage("purge", "purge", "--json", workdir=workdir)))["studies"] == []
    )
    assert Instance.objects.filter(series__study=study).count() == count


def test_a_push_that_ends_before_our_retrieval_keeps_the_study_in_the_archive(
    tmp_path: Path,
    storage_scp: StorageServer,
    modality_node: PacsNode,
    orthanc: OrthancServer,
    orthanc_node: PacsNode,
    pacs_studies: PacsStudies,
) -> None:
    """The retrieval was asked for first; the modality pushes the same study, and its
    association ends before the retrieval does. The retrieval's end must not turn the pushed
    study into a copy that `purge` deletes."""
    study = pacs_studies.utf8
    folder = tmp_path / "push"
    folder.mkdir()
    for number, data in enumerate(study.files.values()):
        (folder / f"{number}.dcm").write_bytes(data)
    forget(study.uid)
    job = retrieval.retrieval_job_create(node=orthanc_node, study_uid=study.uid)

    pushed = push(storage_scp, folder)
    assert pushed.wait(60) == 0, pushed.communicate()
    wait_until(lambda: Study.objects.filter(study_instance_uid=study.uid, archived=True).exists())
    # The worker's run of the job, in a process of its own, ends after the push.
    out = finished(manage("retrieve", "retrieve", "orthanc", study.uid, "--wait", workdir=tmp_path))
    job.refresh_from_db()
    assert job.status == RetrievalJob.Status.DONE, out

    assert_in_the_archive(study.uid, study.instance_count, tmp_path)


def test_a_push_and_our_retrieval_at_once_keep_the_study_in_the_archive(
    tmp_path: Path,
    storage_scp: StorageServer,
    modality_node: PacsNode,
    orthanc: OrthancServer,
    orthanc_node: PacsNode,
    pacs_studies: PacsStudies,
) -> None:
    """The push and the retrieval run at the same time, in processes of their own, a few
    times over: whichever ends last, the study stays in the archive."""
    study = pacs_studies.utf8  # uncompressed: storescu sends it as it is
    folder = tmp_path / "push"
    folder.mkdir()
    for number, data in enumerate(study.files.values()):
        (folder / f"{number}.dcm").write_bytes(data)
    for _round in range(3):
        forget(study.uid)
        retrieval.retrieval_job_create(node=orthanc_node, study_uid=study.uid)
        retrieving = manage(
            "retrieve", "retrieve", "orthanc", study.uid, "--wait", workdir=tmp_path
        )
        pushed = push(storage_scp, folder)
        assert pushed.wait(60) == 0, pushed.communicate()
        finished(retrieving)
        # The push's association ends (and marks the study) a moment after storescu exits.
        wait_until(
            lambda: Study.objects.filter(study_instance_uid=study.uid, archived=True).exists()
        )
        assert_in_the_archive(study.uid, study.instance_count, tmp_path)
