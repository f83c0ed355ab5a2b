"""Two nodes behind one load balancer: two gunicorn servers and two Celery workers on this
machine, sharing one PostgreSQL database (the test database), one Redis (cache and broker)
and one store folder, as several machines would share them.

What one node learns, the other knows at once: a lockout earned on node 1 holds on node 2; a
share created on node 1 is opened on node 2 and the session it gives is good on node 1; an
emergency close made on node 1 closes node 2 at once; retrieval jobs queued by anyone are
taken by whichever worker is free.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from django.conf import settings as django_settings
from pytest_django.fixtures import Settings

from accounts import credentials
from accounts.models import AuditEvent
from studies import retrieval, tasks
from studies.demo import synthetic
from studies.models import PacsNode, RetrievalJob, Study
from tests.conftest import assert_store_consistent, synthetic_study
from tests.support.access import last_code, make_share, make_study
from tests.support.gunicorn import PortalServer
from tests.support.orthanc import OrthancServer
from tests.support.worker import CeleryWorker

if TYPE_CHECKING:
    from tests.conftest import PacsStudies

pytestmark = [
    pytest.mark.worker,
    pytest.mark.skipif(
        not os.environ.get("REDIS_URL")
        or not os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")),
        reason="several nodes share PostgreSQL and Redis (DATABASE_URL, REDIS_URL)",
    ),
]

BASE_DIR = Path(__file__).resolve().parent.parent
PHONE = "+33612345601"


@dataclass
class Cluster:
    nodes: tuple[PortalServer, PortalServer]
    workers: tuple[CeleryWorker, CeleryWorker]
    store_dir: Path

    def manage(self, node: PortalServer, *args: str) -> dict[str, object]:
        """A management command run on `node` (its environment), printing one JSON object."""
        done = subprocess.run(
            [sys.executable, "manage.py", *args, "--json"],
            cwd=BASE_DIR,
            env=node.environment(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        result: dict[str, object] = json.loads(done.stdout)
        return result


@pytest.fixture(scope="module")
def cluster(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    shared = tmp_path_factory.mktemp("cluster")
    store_dir = shared / "store"
    common = {
        "PORTAL_STORE_DIR": str(store_dir),
        # One Redis for every node, under one key prefix: the nodes of one portal.
        "PORTAL_CACHE_KEY_PREFIX": f"portal-test-{uuid.uuid4().hex[:12]}",
        # Behind the load balancer: the client is the address it forwards.
        "PORTAL_TRUSTED_PROXIES": "127.0.0.1",
    }
    queue = f"portal-test-{uuid.uuid4().hex[:12]}"
    worker_env = {
        "PORTAL_STORE_DIR": str(store_dir),
        "PORTAL_DICOM_CONNECT_TIMEOUT": "5",
        "PORTAL_DICOM_DIMSE_TIMEOUT": "30",
        "PORTAL_DICOM_NETWORK_TIMEOUT": "30",
    }
    nodes = (
        PortalServer(workdir=shared / "node1", env=common),
        PortalServer(workdir=shared / "node2", env=common),
    )
    workers = (
        CeleryWorker(workdir=shared / "worker1", env=worker_env, queue=queue, name="node1"),
        CeleryWorker(workdir=shared / "worker2", env=worker_env, queue=queue, name="node2"),
    )
    started: list[PortalServer | CeleryWorker] = []
    try:
        for service in (*nodes, *workers):
            service.start()
            started.append(service)
        yield Cluster(nodes=nodes, workers=workers, store_dir=store_dir)
    finally:
        for service in reversed(started):
            service.stop()


@pytest.fixture(autouse=True)
def empty_store(cluster: Cluster) -> Iterator[None]:
    """Each test starts from an empty store, as from an empty database (transactional tests
    flush it after each)."""
    yield
    shutil.rmtree(cluster.store_dir, ignore_errors=True)


def _client(address: str) -> requests.Session:
    """A browser at `address`, as the load balancer forwards it."""
    session = requests.Session()
    session.trust_env = False
    session.headers["X-Forwarded-For"] = address
    return session


def _csrf(session: requests.Session, node: PortalServer) -> str:
    """The CSRF token of an /access/ form on `node` (the cookie's value, which the form holds
    too)."""
    response = session.get(node.url + "/access/", timeout=10)
    assert response.status_code == 200, response.status_code
    return str(session.cookies["csrftoken"])


def _form_csrf(response: requests.Response) -> str:
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', response.text)
    assert match, f"no form on {response.url} (HTTP {response.status_code})"
    return match.group(1)


def _post_code(session: requests.Session, node: PortalServer, csrf: str, code: str) -> int:
    data = {"code": code, "captcha_0": "x", "captcha_1": "PASSED", "csrfmiddlewaretoken": csrf}
    response = session.post(node.url + "/access/", data=data, allow_redirects=False, timeout=30)
    return response.status_code


def _codes_checked() -> int:
    """Codes that reached the hash check and failed (a refusal unchecked says "locked-out")."""
    failed = AuditEvent.objects.filter(action=AuditEvent.Action.CODE_FAILED)
    return failed.exclude(detail__reason="locked-out").count()


def _random_code() -> str:
    return credentials.format_code(credentials.new_prefix() + "0" * 12)


# --- lockout -----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_holds_a_lockout_earned_on_one_node_on_the_other(cluster: Cluster) -> None:
    """Mallory guesses codes on node 1 until she is locked out; node 2 locks her out too,
    while Alice, at another address, still reaches the form there."""
    node1, node2 = cluster.nodes
    mallory = _client("203.0.113.91")
    csrf = _csrf(mallory, node1)
    statuses: list[int] = []
    while 429 not in statuses and len(statuses) < 10:
        statuses.append(_post_code(mallory, node1, csrf, _random_code()))
    assert statuses[-1] == 429 and len(statuses) <= 6, statuses

    # Another attempt from her address on the other node: refused before any check.
    checked = _codes_checked()
    assert _post_code(mallory, node2, csrf, _random_code()) == 429
    assert _codes_checked() == checked
    # Alice, elsewhere, is not locked out by Mallory.
    alice = _client("198.51.100.91")
    assert _post_code(alice, node2, _csrf(alice, node2), _random_code()) == 200


@pytest.mark.django_db(transaction=True)
def test_it_holds_a_share_lockout_earned_on_one_node_on_the_other(cluster: Cluster) -> None:
    """Guesses at one share's code from many addresses on node 1 lock that share: node 2
    refuses even its right code, from an address that never failed."""
    node1, node2 = cluster.nodes
    make_study()
    created = make_share()
    right = created.access_code.replace("-", "")
    statuses: list[int] = []
    for attempt in range(10):
        # The prefix (which share) kept, the secret wrong.
        wrong = right[:4] + ("1" if right[-1] == "0" else "0") * 12
        guesser = _client(f"198.51.100.{100 + attempt}")
        statuses.append(_post_code(guesser, node1, _csrf(guesser, node1), wrong))
        if statuses[-1] == 429:
            break
    assert statuses[-1] == 429 and len(statuses) <= 6, statuses

    alice = _client("192.0.2.91")
    assert _post_code(alice, node2, _csrf(alice, node2), created.access_code) == 429


# --- sessions and shares ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_serves_on_one_node_a_share_created_on_the_other(
    cluster: Cluster, settings: Settings, tmp_path: Path
) -> None:
    """Staff import a study and share it on node 1; the patient opens the link and confirms
    the one-time code on node 2, then the load balancer sends her to node 1: the session and
    the study's files are there."""
    settings.STORE_DIR = cluster.store_dir
    node1, node2 = cluster.nodes
    datasets = synthetic.make_study(
        patient_name="Scale^Out", patient_id="SCALE-1", modalities=(("CT", 3),)
    )
    synthetic.write_study(datasets, tmp_path / "cd")
    study_uid = str(datasets[0].StudyInstanceUID)
    series_uid = str(datasets[0].SeriesInstanceUID)
    sop_uid = str(datasets[0].SOPInstanceUID)
    imported = subprocess.run(
        [sys.executable, "manage.py", "import_dicom", str(tmp_path / "cd")],
        cwd=BASE_DIR,
        env=node1.environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    created = cluster.manage(node1, "share", "create", study_uid, "--patient-phone", PHONE)
    assert str(created["url"]).startswith(node1.url + "/s/#")
    token = str(created["url"]).split("#", 1)[1]

    patient = _client("198.51.100.92")
    csrf = _csrf(patient, node2)
    opened = patient.post(
        node2.url + "/s/",
        {"token": token, "csrfmiddlewaretoken": csrf},
        allow_redirects=False,
        timeout=10,
    )
    assert opened.status_code == 302 and opened.headers["Location"] == "/access/verify"
    page = patient.get(node2.url + "/access/verify", timeout=10)
    sent = patient.post(
        node2.url + "/access/verify",
        {"action": "send", "csrfmiddlewaretoken": _form_csrf(page)},
        allow_redirects=False,
        timeout=10,
    )
    assert sent.status_code in (200, 302)
    # Node 2 sent the one-time code (its SMS folder); node 1 sent nothing.
    otp = last_code(node2.sms_dir)
    assert not list(node1.sms_dir.glob("*.json"))
    page = patient.get(node2.url + "/access/verify", timeout=10)
    confirmed = patient.post(
        node2.url + "/access/verify",
        {"otp": otp, "csrfmiddlewaretoken": _form_csrf(page)},
        allow_redirects=False,
        timeout=10,
    )
    assert confirmed.status_code == 302 and confirmed.headers["Location"] == "/viewer/"

    # The same session cookie, now on node 1.
    viewer = patient.get(node1.url + "/viewer/", allow_redirects=False, timeout=10)
    assert viewer.status_code == 200 and study_uid in viewer.text
    frame = patient.get(
        f"{node1.url}/dicomweb/studies/{study_uid}/series/{series_uid}"
        f"/instances/{sop_uid}/frames/1/rendered",
        headers={"Accept": "image/jpeg"},
        timeout=30,
    )
    assert frame.status_code == 200 and frame.content[:3] == b"\xff\xd8\xff"
    # Another visitor without the session gets nothing from either node.
    stranger = _client("198.51.100.93")
    for node in cluster.nodes:
        response = stranger.get(node.url + "/viewer/", allow_redirects=False, timeout=10)
        assert response.status_code == 302 and response.headers["Location"] == "/access/"
    # Both nodes served this patient: each access log says so.
    assert '"POST /access/verify HTTP/1.1" 302' in node2.logs()
    assert '"GET /viewer/ HTTP/1.1" 200' in node1.logs()


# --- emergency close ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_emergency_close_on_one_node_closes_both_at_once(cluster: Cluster) -> None:
    """The close is read from the database on every request, never remembered by a process:
    the next request on node 2 after `recipients close` on node 1 is refused."""
    node1, node2 = cluster.nodes
    visitor = _client("198.51.100.94")
    for node in cluster.nodes:
        assert visitor.get(node.url + "/access/", timeout=10).status_code == 200
    closed = cluster.manage(node1, "recipients", "close", "--message", "Back at 14:00")
    assert closed["closed"] is True
    # At once: no wait between the close and these requests.
    for node in (node2, node1):
        for _request in range(4):  # several requests, so that each gunicorn worker answers
            response = visitor.get(node.url + "/access/", timeout=10)
            assert response.status_code == 503, node.url
            assert response.headers["Retry-After"] == str(
                django_settings.RECIPIENTS_CLOSED_RETRY_AFTER
            )
            assert "Back at 14:00" in response.text
        assert visitor.get(node.url + "/healthz", timeout=10).status_code == 200
    assert cluster.manage(node2, "recipients", "open")["closed"] is False
    for node in cluster.nodes:
        assert visitor.get(node.url + "/access/", timeout=10).status_code == 200


# --- retrievals --------------------------------------------------------------------------------


@pytest.mark.dicom
@pytest.mark.django_db(transaction=True)
def test_it_spreads_retrievals_across_both_workers(
    cluster: Cluster,
    settings: Settings,
    orthanc: OrthancServer,
    pacs_studies: "PacsStudies",
    orthanc_node: PacsNode,
) -> None:
    """Six studies asked for at once on one queue: both workers take jobs, every job ends
    done, and the shared store holds each study once, consistent with the index."""
    settings.STORE_DIR = cluster.store_dir
    extra = [
        synthetic_study(
            patient_name=f"Scale^Out{n}",
            patient_id=f"SCALE-{n}",
            charset="ISO_IR 192",
            modalities=(("CT", 4),),
        )
        for n in range(4)
    ]
    for study in extra:
        orthanc.upload_many(study.files.values())
    try:
        uids = [pacs_studies.latin1.uid, pacs_studies.utf8.uid, *(s.uid for s in extra)]
        jobs = [retrieval.retrieval_job_create(node=orthanc_node, study_uid=uid) for uid in uids]
        with cluster.workers[0].producer_app():
            for job in jobs:
                tasks.retrieval_job_enqueue(job)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            statuses = set(
                RetrievalJob.objects.filter(pk__in=[j.pk for j in jobs]).values_list(
                    "status", flat=True
                )
            )
            if statuses <= {RetrievalJob.Status.DONE, RetrievalJob.Status.FAILED}:
                break
            time.sleep(0.2)
        logs = [worker.log() for worker in cluster.workers]
        assert statuses == {RetrievalJob.Status.DONE}, (statuses, *logs)
    finally:
        for study in extra:
            orthanc.delete_study(study.uid)

    done = re.compile(
        r"Task studies\.tasks\.retrieve_study\[[^\]]+\] succeeded in [0-9.]+s: 'done'"
    )
    taken = [len(done.findall(log)) for log in logs]
    # Each worker, under its own name, took jobs; together, every one exactly once.
    assert all(n >= 1 for n in taken) and sum(taken) == len(jobs), taken
    for worker in cluster.workers:
        assert f"{worker.hostname} ready." in worker.log()
    assert Study.objects.in_store().count() == len(uids)
    assert_store_consistent()
