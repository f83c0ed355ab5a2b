"""The services around the portal stop and come back: the PACS in the middle of a C-MOVE, the
Redis broker with jobs queued, the PostgreSQL server under the web processes and workers.
Nothing is lost and nobody needs a manual restart.

Each test runs its own instance of the service it breaks (a private Orthanc, redis-server,
PostgreSQL cluster on free ports): the session's are shared with other tests.
"""

import hashlib
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import requests
from django.conf import settings as django_settings
from django.test import Client
from pytest_django.fixtures import Settings

from accounts.selectors import share_status
from studies import dicom, retrieval, services, tasks
from studies.demo import synthetic
from studies.dimse.storescp import StorageServer
from studies.models import Instance, PacsNode, RetrievalJob, Study
from tests.conftest import assert_store_consistent, scp_port
from tests.support.access import make_share, share_of, sign_in
from tests.support.gunicorn import PortalServer
from tests.support.orthanc import OrthancServer
from tests.support.postgres_cluster import PostgresCluster
from tests.support.proxy import TcpRelay
from tests.support.redis_server import RedisServer
from tests.support.worker import CeleryWorker

if TYPE_CHECKING:
    from tests.conftest import PacsStudies

SLICES = 60
# 256 × 256 slices, about 8 MB, paced at 2 MB/s towards the storage SCP: the PACS is stopped
# about a quarter of the way in.
RELAY_RATE = 2 * 1024 * 1024
STOP_AFTER_BYTES = 2 * 1024 * 1024
BACKOFF_SECONDS = 2


def dataset_sha256(part10: bytes) -> str:
    return hashlib.sha256(part10[dicom.dataset_offset(part10) :]).hexdigest()


def visible_instances(client: Client) -> int:
    """How many instances the recipient's DICOMweb shows (what any viewer would show)."""
    response = client.get("/dicomweb/instances")
    assert response.status_code in {200, 204}, response.status_code
    return len(response.json()) if response.status_code == 200 and response.content else 0


def poll(predicate: Any, *, timeout: float, what: str, log: Any = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s\n{log()}")
        time.sleep(0.1)


@pytest.mark.worker
@pytest.mark.dicom
@pytest.mark.django_db(transaction=True)
def test_a_pacs_that_stops_mid_c_move_fails_the_job_clearly_and_it_completes_once_back(
    settings: Settings,
    tmp_path: Path,
    storage_scp: StorageServer,
    portal_ae_title: str,
    sms_dir: Path,
    client: Client,
) -> None:
    settings.STORE_DIR = tmp_path / "store"
    files = [
        synthetic.to_bytes(ds)
        for ds in synthetic.iter_study(
            patient_name="Stopped^Pacs",
            patient_id="STOPPED",
            modalities=(("CT", SLICES),),
            rows=256,
            columns=256,
        )
    ]
    study_uid = str(dicom.read_header(files[0]).StudyInstanceUID)
    to_scp = TcpRelay("127.0.0.1", scp_port(storage_scp), rate=RELAY_RATE)
    # Its own folder: the PACS comes back with its storage, on the same DICOM port.
    pacs_server = OrthancServer(
        aet="STOPPACS",
        modalities={"portal": (portal_ae_title, "127.0.0.1", to_scp.port)},
        workdir=tmp_path / "orthanc",
    )
    worker = CeleryWorker(
        workdir=tmp_path / "worker",
        env={
            "PORTAL_RETRIEVAL_MAX_RETRIES": "4",
            "PORTAL_RETRIEVAL_RETRY_BACKOFF": str(BACKOFF_SECONDS),
            "PORTAL_DICOM_CONNECT_TIMEOUT": "3",
        },
    )
    with to_scp, pacs_server, worker:
        pacs_server.upload_many(files)
        pacs_copies = pacs_server.study_files(study_uid)
        dicom_port = pacs_server.dicom_port
        node = services.pacs_node_create(
            name="stoppacs",
            ae_title=pacs_server.aet,
            host="127.0.0.1",
            port=dicom_port,
            retrieve_method=PacsNode.Retrieve.MOVE,
        )
        # The patient holds a share of a study the store lacks, and has signed in.
        created = make_share(study_uid)
        sign_in(client, created, sms_dir)
        share = share_of(created)
        job = retrieval.retrieval_job_create(node=node, study_uid=study_uid)
        with worker.producer_app():
            tasks.retrieval_job_enqueue(job)

        assert to_scp.meter.wait_for(STOP_AFTER_BYTES, timeout=60), worker.log_tail()
        pacs_server.kill()  # the PACS goes down hard, mid-transfer

        errors: list[str] = []

        def failed_twice() -> bool:
            job.refresh_from_db()
            if job.error and job.error not in errors:
                errors.append(job.error)
            return job.attempts >= 2 and job.status == RetrievalJob.Status.QUEUED

        poll(failed_twice, timeout=60, what="two failed attempts", log=worker.log_tail)
        # Some of the study arrived: the recipient sees none of it, the share is pending.
        assert Instance.objects.filter(series__study__study_instance_uid=study_uid).exists()
        assert share_status(share) == "pending"
        assert visible_instances(client) == 0

        pacs_server.start()
        assert pacs_server.dicom_port == dicom_port

        def finished() -> bool:
            job.refresh_from_db()
            if job.error and job.error not in errors:
                errors.append(job.error)
            # The recipient never sees part of the study while it is not complete.
            if job.status != RetrievalJob.Status.DONE:
                assert visible_instances(client) in {0, SLICES}
            return job.status in {RetrievalJob.Status.DONE, RetrievalJob.Status.FAILED}

        poll(finished, timeout=90, what="the job's end", log=worker.log_tail)

    assert job.status == RetrievalJob.Status.DONE, (job.error, errors)
    assert job.attempts >= 3
    # Each failure said what went wrong and when the next attempt comes, each wait longer.
    assert f"STOPPACS@127.0.0.1:{dicom_port}" in errors[0], errors
    assert "dropped the association during the C-MOVE" in errors[0], errors
    assert f"(attempt 1; trying again in {BACKOFF_SECONDS} s)" in errors[0], errors
    assert any(
        "cannot reach" in e and f"(attempt 2; trying again in {2 * BACKOFF_SECONDS} s)" in e
        for e in errors
    ), errors
    rows = Instance.objects.filter(series__study__study_instance_uid=study_uid)
    assert sorted(rows.values_list("sop_instance_uid", flat=True)) == sorted(pacs_copies)
    for instance in rows:
        stored = (settings.STORE_DIR / instance.file_path).read_bytes()
        assert dataset_sha256(stored) == dataset_sha256(pacs_copies[instance.sop_instance_uid])
    assert_store_consistent()
    assert share_status(share) == "active"
    assert visible_instances(client) == SLICES
    assert Study.objects.in_store().filter(study_instance_uid=study_uid).exists()


# --- Redis, the broker, restarts with jobs queued ---------------------------------------------


def task_received(worker: CeleryWorker, task_id: str) -> bool:
    return f"retrieve_study[{task_id}] received" in worker.log()


@pytest.mark.worker
@pytest.mark.dicom
@pytest.mark.django_db(transaction=True)
def test_queued_jobs_survive_a_redis_crash_and_the_worker_rides_through_another(
    settings: Settings,
    tmp_path: Path,
    orthanc: OrthancServer,
    pacs_studies: "PacsStudies",
    orthanc_node: PacsNode,
) -> None:
    """Redis as production runs it (append-only file, fsync at every write): killed with jobs
    queued and no worker up, it comes back with every message; killed again under a running
    worker, the worker reconnects by itself and takes the next job."""
    settings.STORE_DIR = tmp_path / "store"
    studies = [pacs_studies.latin1, pacs_studies.utf8]
    with RedisServer(workdir=tmp_path / "redis") as broker:
        worker = CeleryWorker(workdir=tmp_path / "worker")
        worker.broker_url, worker.transport_options = broker.url, {}
        jobs = [retrieval.retrieval_job_create(node=orthanc_node, study_uid=s.uid) for s in studies]
        with worker.producer_app():
            sent = [tasks.retrieve_study.delay(job.pk).id for job in jobs]
        assert broker.client().llen(worker.queue) == len(jobs)

        broker.kill()  # SIGKILL: no save at shutdown
        broker.start()
        assert broker.client().llen(worker.queue) == len(jobs), broker.log()

        with worker:
            for job in jobs:
                wait_for_end(job, worker)
            # The messages that came through the crash ran (not only the worker's own
            # start-up resumption of unfinished jobs).
            assert all(task_received(worker, task_id) for task_id in sent), worker.log_tail()

            broker.kill()
            broker.start()
            again = retrieval.retrieval_job_create(node=orthanc_node, study_uid=studies[0].uid)
            with worker.producer_app():
                tasks.retrieve_study.delay(again.pk)
            wait_for_end(again, worker)

    for study in studies:
        rows = Instance.objects.filter(series__study__study_instance_uid=study.uid)
        assert sorted(rows.values_list("sop_instance_uid", flat=True)) == sorted(study.files)
    assert_store_consistent()


def wait_for_end(job: RetrievalJob, worker: CeleryWorker, timeout: float = 90) -> None:
    def ended() -> bool:
        job.refresh_from_db()
        return job.status in {RetrievalJob.Status.DONE, RetrievalJob.Status.FAILED}

    poll(ended, timeout=timeout, what=f"the end of job {job.pk}", log=worker.log_tail)
    assert job.status == RetrievalJob.Status.DONE, job.error


# --- PostgreSQL restarts under the web processes and the workers ------------------------------


def metadata_runs(worker: CeleryWorker) -> tuple[int, int]:
    """How many build_study_metadata tasks succeeded and failed in the worker's log."""
    lines = [line for line in worker.log().splitlines() if "build_study_metadata[" in line]
    return (
        sum(" succeeded in " in line for line in lines),
        sum(" raised unexpected" in line for line in lines),
    )


def database_health(response: requests.Response) -> tuple[int, object]:
    """/healthz's status and what it says of the database."""
    return response.status_code, response.json().get("database")


# A retrieval that outlives the restart: the PACS never answers, for this long.
SILENT_PACS_SECONDS = 8
SHORT_LEASE = 3


@pytest.mark.worker
def test_web_processes_and_workers_recover_when_postgresql_restarts(tmp_path: Path) -> None:
    """Persistent connections (as production may keep them: PORTAL_DB_CONN_MAX_AGE) are
    health-checked before reuse: the first request and the first task after a restart of the
    database server succeed, with no restart of gunicorn or the worker. A retrieval running
    across the restart keeps renewing its lease (its worker lives) and records its outcome."""
    with PostgresCluster() as database, socket.create_server(("127.0.0.1", 0)) as silent:
        database.create_database()
        env = {
            "DATABASE_URL": database.url,
            "PORTAL_DB_CONN_MAX_AGE": "600",
            "PORTAL_RETRIEVAL_LEASE": str(SHORT_LEASE),
            "PORTAL_RETRIEVAL_MAX_RETRIES": "0",
            "PORTAL_DICOM_CONNECT_TIMEOUT": str(SILENT_PACS_SECONDS),
        }
        worker = CeleryWorker(workdir=tmp_path / "worker", env=env)

        def manage(*arguments: str) -> str:
            result = subprocess.run(
                [sys.executable, "manage.py", *arguments],
                cwd=django_settings.BASE_DIR,
                env=worker.environment(),
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            return result.stdout

        job_id = 0

        def job_row() -> tuple[Any, ...]:
            with psycopg.connect(database.url.replace("postgres://", "postgresql://")) as db:
                row = db.execute(
                    "SELECT status, attempts, lease_until, error, now() "
                    "FROM studies_retrievaljob WHERE id = %s",
                    (job_id,),
                ).fetchone()
            assert row is not None
            return tuple(row)

        manage("migrate", "--noinput")
        http = requests.Session()
        http.trust_env = False
        with PortalServer(workdir=tmp_path / "web", workers=1, env=env) as web, worker:
            for _ in range(2):  # the second request reuses the first one's connection
                assert database_health(http.get(f"{web.url}/healthz", timeout=10)) == (200, "ok")
            with worker.producer_app():
                tasks.build_study_metadata.delay("1.2.826.0.1.3680043.8.498.77")
            poll(
                lambda: metadata_runs(worker) == (1, 0),
                timeout=30,
                what="a task",
                log=worker.log_tail,
            )
            # Created once the worker is up (a worker that starts takes every queued job).
            job_id = int(
                manage(
                    "shell",
                    "-c",
                    "from studies import retrieval, services; "
                    "node = services.pacs_node_create(name='silent', ae_title='SILENT', "
                    f"host='127.0.0.1', port={silent.getsockname()[1]}); "
                    "print(retrieval.retrieval_job_create(node=node, "
                    "study_uid='1.2.826.0.1.3680043.8.498.79').pk)",
                ).split()[-1]
            )
            with worker.producer_app():
                tasks.retrieve_study.delay(job_id)
            poll(lambda: job_row()[0] == "running", timeout=30, what="the job's start")

            database.restart()
            restarted_at = job_row()[4]

            response = http.get(f"{web.url}/healthz", timeout=10)
            assert database_health(response) == (200, "ok"), response.text
            poll(
                lambda: job_row()[0] != "running",
                timeout=SILENT_PACS_SECONDS + 30,
                what="the job's end",
                log=worker.log_tail,
            )
            status, attempts, lease_until, error, _ = job_row()
            # The outcome was recorded by the attempt that ran across the restart, and no
            # other attempt took over: its lease went on being renewed after the restart.
            assert (status, attempts) == ("failed", 1), (error, worker.log_tail())
            assert "cannot reach SILENT@127.0.0.1" in error
            assert lease_until > restarted_at + timedelta(seconds=SHORT_LEASE + 1)

            with worker.producer_app():
                tasks.build_study_metadata.delay("1.2.826.0.1.3680043.8.498.78")
            poll(
                lambda: sum(metadata_runs(worker)) == 2,
                timeout=30,
                what="the task after the restart",
                log=worker.log_tail,
            )
            assert metadata_runs(worker) == (2, 0), worker.log_tail()
