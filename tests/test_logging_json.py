"""JSON log lines with a request id, from the web request into the Celery task it queued, read
from a real worker's output; and the worker's lines go through the redaction filter (Celery's
own handlers, which it installs unless told otherwise, knew nothing of it)."""

import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.signals import request_finished
from django.http import HttpRequest, HttpResponse
from django.test import Client, RequestFactory

from portal.logs import (
    REQUEST_ID_HEADER,
    RequestIdFilter,
    RequestIdMiddleware,
    request_id,
    request_id_bound,
)
from studies import retrieval, services
from studies.tasks import retrieve_study
from tests.support import free_port
from tests.support.worker import CeleryWorker
from tests.test_settings import python

pytestmark = pytest.mark.worker

STUDY_UID = "1.2.826.0.1.3680043.8.498.7001"


@pytest.fixture(scope="module")
def worker(
    django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CeleryWorker]:
    with CeleryWorker(
        workdir=tmp_path_factory.mktemp("worker"),
        env={"PORTAL_RETRIEVAL_MAX_RETRIES": "0", "PORTAL_DICOM_CONNECT_TIMEOUT": "2"},
    ) as running:
        yield running


def json_records(text: str) -> list[dict[str, Any]]:
    """The worker's log records. (Its start-up banner is printed, not logged: not JSON.)"""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def wait_for_record(
    worker: CeleryWorker, matches: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in json_records(worker.log()):
            if matches(record):
                return record
        time.sleep(0.2)
    raise AssertionError(f"no such line in the worker's log:\n{worker.log_tail()}")


@pytest.mark.django_db(transaction=True)
def test_a_task_logs_with_the_id_of_the_request_that_queued_it(
    worker: CeleryWorker, settings: Any
) -> None:
    """The id nginx gave the request (a trusted proxy's X-Request-ID) is on the response and
    on the line the worker logs when the retrieval that request queued fails."""
    settings.TRUSTED_PROXIES = ["127.0.0.1"]
    node = services.pacs_node_create(
        name="closed", ae_title="NOBODY", host="127.0.0.1", port=free_port()
    )
    job = retrieval.retrieval_job_create(node=node, study_uid=STUDY_UID)
    given = secrets.token_hex(16)

    def view(request: HttpRequest) -> HttpResponse:
        # What a view that queues a retrieval does.
        retrieve_study.delay(job.pk)
        return HttpResponse()

    request = RequestFactory().post(
        "/", REMOTE_ADDR="127.0.0.1", headers={REQUEST_ID_HEADER: given}
    )
    with worker.producer_app():
        response = RequestIdMiddleware(view)(request)

    assert response[REQUEST_ID_HEADER] == given
    failed = wait_for_record(
        worker, lambda r: r["message"].startswith(f"retrieval job {job.pk} failed")
    )
    assert failed["request_id"] == given
    assert failed["level"] == "WARNING" and failed["logger"] == "studies.retrieval"
    # Until the answer is sent (streamed answers are produced after the middleware returns).
    assert request_id.get() == given
    request_finished.send(sender=None)
    assert request_id.get() is None


@pytest.mark.django_db(transaction=True)
def test_a_client_cannot_choose_its_request_id(client: Client, settings: Any) -> None:
    """Only a trusted proxy's id is kept: a client's could be anything (a forged log line)."""
    settings.TRUSTED_PROXIES = ["10.0.0.1"]
    forged = "forged-request-id-0001"

    response = client.get("/healthz", headers={REQUEST_ID_HEADER: forged})

    assert response[REQUEST_ID_HEADER] != forged
    assert len(response[REQUEST_ID_HEADER]) == 32

    trusted = client.get("/healthz", REMOTE_ADDR="10.0.0.1", headers={REQUEST_ID_HEADER: forged})
    assert trusted[REQUEST_ID_HEADER] == forged
    # Even a trusted proxy's id must look like one (it goes into every line).
    bad = client.get(
        "/healthz", REMOTE_ADDR="10.0.0.1", headers={REQUEST_ID_HEADER: 'x" injected\nline'}
    )
    assert bad[REQUEST_ID_HEADER] != 'x" injected\nline'


@pytest.mark.django_db(transaction=True)
def test_the_worker_redacts_a_link_token_from_what_it_logs(worker: CeleryWorker) -> None:
    """An unknown task makes the worker log the whole message body, arguments included: a
    token among them reaches the log as /s/[redacted]."""
    token = secrets.token_urlsafe(32)
    with worker.producer_app() as app, request_id_bound(secrets.token_hex(16)):
        app.send_task("portal.no_such_task", args=[f"/s/{token}"])

    record = wait_for_record(worker, lambda r: "no_such_task" in r["message"])

    assert record["level"] == "ERROR"
    assert "/s/[redacted]" in record["message"]
    assert token not in worker.log()


def test_debug_mode_logs_text_and_production_json(tmp_path: Path) -> None:
    script = "import django; django.setup(); import logging; logging.getLogger('x').warning('hi')"
    production = python(script, {"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"})
    debug = python(
        script, {"PORTAL_DEBUG": "true", "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    )

    line = json.loads(production.stderr.strip().splitlines()[-1])
    assert line["message"] == "hi" and line["logger"] == "x" and line["request_id"] == "-"
    assert debug.stderr.strip().endswith("WARNING x [-] hi")


@pytest.mark.django_db
def test_the_line_django_logs_for_an_error_answer_carries_the_request_id(
    client: Client, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Django logs a 5xx answer after the middleware chain has returned: the id is still
    there."""
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port()}/0"
    caplog.handler.addFilter(RequestIdFilter())

    response = client.get("/healthz")

    assert response.status_code == 503
    logged = [r for r in caplog.records if r.getMessage() == "Service Unavailable: /healthz"]
    assert [r.request_id for r in logged] == [response[REQUEST_ID_HEADER]]  # type: ignore[attr-defined]
