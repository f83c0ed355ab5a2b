"""The radiology desk's whole path in a real browser (headless Chromium through Playwright),
against the real Orthanc test PACS and a real Celery worker: search the PACS, share a study
with a prior, watch both arrive, print the handout and read its QR code back; then the patient
opens that link in a browser of their own, passes the one-time code and sees an image.

Every staff page on the way is checked with axe-core (WCAG 2.1 AA) and on a 375 px screen.
"""

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zxingcpp
from celery import _state as celery_state
from django.conf import settings as django_settings
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, expect

from accounts.models import Share, User
from studies import retrieval, services
from studies.demo import synthetic
from studies.models import PacsNode, RetrievalJob
from tests.support import free_port
from tests.support.access import last_code
from tests.support.browser import assert_accessible
from tests.support.orthanc import OrthancServer
from tests.support.staff import staff_client
from tests.support.worker import CeleryWorker
from tests.test_recipient_browser import browser  # noqa: F401  (the module's Chromium)

pytestmark = [pytest.mark.worker, pytest.mark.dicom]

PATIENT_ID = "STF-BROWSER"


class Studies:
    def __init__(self, current: str, prior: str, current_count: int, prior_count: int) -> None:
        self.current, self.prior = current, prior
        self.current_count, self.prior_count = current_count, prior_count


@pytest.fixture(scope="module")
def patient_studies(orthanc: OrthancServer) -> Studies:
    """A patient of this module's own on the PACS: a recent CT and an older MR."""
    uids, counts = [], []
    for description, date, modalities in (
        ("CT THORAX", "20260410", (("CT", 4),)),
        ("IRM GENOU", "20250102", (("MR", 3),)),
    ):
        datasets = synthetic.make_study(
            patient_name="Bernard^Lucie",
            patient_id=PATIENT_ID,
            modalities=modalities,
            study_description=description,
            study_date=date,
            rows=128,
            columns=128,
        )
        orthanc.upload_many(synthetic.to_bytes(ds) for ds in datasets)
        uids.append(str(datasets[0].StudyInstanceUID))
        counts.append(len(datasets))
    return Studies(uids[0], uids[1], counts[0], counts[1])


@pytest.fixture(scope="module")
def worker(
    django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CeleryWorker]:
    with CeleryWorker(
        workdir=tmp_path_factory.mktemp("staff-worker"),
        env={"PORTAL_DICOM_CONNECT_TIMEOUT": "5", "PORTAL_DICOM_DIMSE_TIMEOUT": "30"},
    ) as running:
        yield running


@contextmanager
def _tasks_to(worker: CeleryWorker) -> Iterator[None]:
    """Tasks sent from any thread of this process (the live server's too, which does not see
    the test thread's current app) go to the worker's queue."""
    with worker.producer_app() as app:
        previous = celery_state.default_app
        celery_state.set_default_app(app)
        try:
            yield
        finally:
            celery_state.set_default_app(previous)


def _watch_csp(page: Page, violations: list[str]) -> None:
    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            violations.append(message.text)

    page.on("console", on_console)


@pytest.fixture
def staff_context(
    browser: Browser,  # noqa: F811
    live_server: Any,
    settings: Any,
    transactional_db: Any,
) -> Iterator[BrowserContext]:
    """A browser signed in as alice, a sharer who has just passed her second factor (the
    session is made as staff sign-in makes it: the sign-in pages are tested on their own)."""
    settings.BASE_URL = live_server.url
    alice = User.objects.create_user("alice", "alice@example.org", "x" * 20, role="sharer")
    session_key = staff_client(alice).cookies[django_settings.SESSION_COOKIE_NAME].value
    context = browser.new_context(viewport={"width": 1100, "height": 900}, locale="en-GB")
    # The search asks the PACS, the share page waits for the worker: on a loaded two-core
    # machine a step may take longer than Playwright's default 5 s without anything wrong.
    context.set_default_timeout(30_000)
    expect.set_options(timeout=30_000)
    context.add_cookies(
        [
            {
                "name": django_settings.SESSION_COOKIE_NAME,
                "value": session_key,
                "url": live_server.url,
            }
        ]
    )
    yield context
    for page in context.pages:
        page.goto("about:blank")
    time.sleep(0.3)
    context.close()


def _fits_a_phone(page: Page) -> None:
    size = page.viewport_size
    page.set_viewport_size({"width": 375, "height": 740})
    try:
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"{page.url} is {width}px wide on a 375px phone"
        assert_accessible(page)
    finally:
        if size:
            page.set_viewport_size(size)


@pytest.mark.django_db(transaction=True)
def test_staff_share_a_pacs_study_with_a_prior_and_the_patient_opens_the_printed_qr_code(
    staff_context: BrowserContext,
    browser: Browser,  # noqa: F811
    live_server: Any,
    settings: Any,
    worker: CeleryWorker,
    orthanc_node: PacsNode,
    patient_studies: Studies,
    sms_dir: Path,
    tmp_path: Path,
) -> None:
    # The worker's store is the portal's: the storage SCP (in this process) writes there what
    # the PACS sends, and the viewer reads it from there.
    settings.STORE_DIR = worker.store_dir
    settings.HOSPITAL_NAME = "Hôpital Saint-Exemple"
    settings.HELPDESK_PHONE = "01 23 45 67 89"
    violations: list[str] = []
    page = staff_context.new_page()
    _watch_csp(page, violations)

    # --- search ---------------------------------------------------------------------------
    page.goto(live_server.url + "/staff/")
    expect(page.get_by_role("heading", name="Search studies")).to_be_visible()
    assert_accessible(page)
    # With the keyboard alone, as on the rest of the way to the share.
    page.get_by_label("Patient ID").focus()
    page.keyboard.type(PATIENT_ID)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="BERNARD Lucie")).to_be_visible()
    rows = page.locator("table.studies tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("CT THORAX")
    expect(rows.first).to_contain_text("orthanc")
    expect(rows.nth(1)).to_contain_text("IRM GENOU")
    expect(page.locator(".source-ok", has_text="orthanc")).to_contain_text("2 studies")
    assert_accessible(page)
    _fits_a_phone(page)

    # --- the share form ---------------------------------------------------------------------
    rows.first.get_by_role("link", name="Share").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Share a study")).to_be_visible()
    assert_accessible(page)
    _fits_a_phone(page)
    page.get_by_label("IRM GENOU").focus()
    page.keyboard.press("Space")
    expect(page.get_by_label("IRM GENOU")).to_be_checked()
    page.keyboard.press("Tab")  # to the recipient's kind: patient, already chosen
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none"), "the focused control shows no focus"
    page.get_by_label("Mobile phone").focus()
    page.keyboard.type("06 12 34 56 42")
    with _tasks_to(worker):
        page.keyboard.press("Enter")  # submits the form
        expect(page.get_by_role("heading", name="Link and access code")).to_be_visible()
    share = Share.objects.get()
    assert share.contact == "+33612345642"
    assert share.study_uids == [patient_studies.current, patient_studies.prior]
    code = page.locator(".secrets .code").inner_text()

    # --- live progress, to 100 %, without reloading the page -------------------------------
    loads: list[str] = []
    page.on("load", lambda loaded: loads.append(loaded.url))
    bars = page.locator("progress")
    expect(bars).to_have_count(2)
    states = page.locator(".study-progress .state")
    expect(states).to_have_text(["Ready", "Ready"], timeout=90_000)
    assert [bars.nth(i).get_attribute("value") for i in range(2)] == ["100", "100"]
    expect(page.locator(".study-progress .counts")).to_have_text(
        [
            f"{patient_studies.current_count} / {patient_studies.current_count}",
            f"{patient_studies.prior_count} / {patient_studies.prior_count}",
        ]
    )
    # The share's status line follows, still without a reload.
    expect(page.locator("#share-status")).to_have_attribute("data-status", "active")
    expect(page.locator("#share-status")).to_have_text("Active")
    assert loads == [], "the page reloaded instead of updating itself"
    assert_accessible(page)
    _fits_a_phone(page)

    # --- the handout, printed -----------------------------------------------------------------
    page.get_by_role("link", name="Print the handout").click()
    expect(page.get_by_role("heading", name="Your images online")).to_be_visible()
    assert_accessible(page)
    page.emulate_media(media="print")
    expect(page.get_by_role("button", name="Print")).to_be_hidden()
    expect(page.locator(".access-code")).to_contain_text(code.split("-")[1])
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True)))
    barcodes = zxingcpp.read_barcodes(shot)
    assert len(barcodes) == 1, "no QR code could be read from the printed handout"
    link = barcodes[0].text
    assert link.startswith(live_server.url + "/s/#")
    assert code not in link
    assert violations == []

    # --- the patient, with the handout's QR code ---------------------------------------------
    patient = browser.new_context(viewport={"width": 375, "height": 740}, locale="en-GB")
    try:
        phone = patient.new_page()
        _watch_csp(phone, violations)
        phone.goto(link)
        expect(phone).to_have_url(live_server.url + "/access/verify")
        phone.get_by_role("button", name="Send me a code").click()
        expect(phone.get_by_text("We have sent you a code")).to_be_visible()
        phone.get_by_label("One-time code").fill(last_code(sms_dir))
        phone.get_by_role("button", name="Confirm").click()
        expect(phone).to_have_url(live_server.url + "/viewer/")
        phone.wait_for_function(
            "() => { const i = document.querySelector('#viewer-pane img');"
            " return i && i.complete && i.naturalWidth > 0; }"
        )
        phone.goto("about:blank")
        time.sleep(0.3)
    finally:
        patient.close()
    assert violations == []


@pytest.mark.django_db(transaction=True)
def test_the_share_page_follows_a_retrieval_as_it_goes_and_words_its_failure(
    staff_context: BrowserContext, live_server: Any
) -> None:
    """The worker's progress, written to the job's row, reaches the page without a reload;
    a failure brings its explanation and the retry button."""
    node = services.pacs_node_create(
        name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port()
    )
    uid = "1.2.826.0.1.3680043.8.498.88001"
    shared = services.study_share(
        study_instance_uid=uid, recipient="patient", channel="sms", contact="+33612345642"
    )
    # Queued as study_share does, without a worker to take it: the test plays the worker.
    job = retrieval.retrieval_job_create(node=node, study_uid=uid)
    violations: list[str] = []
    page = staff_context.new_page()
    _watch_csp(page, violations)
    page.goto(f"{live_server.url}/staff/share/{shared.created.share.pk}/")
    expect(page.locator(".state")).to_have_text("Waiting for its turn")
    loads: list[str] = []
    page.on("load", lambda loaded: loads.append(loaded.url))

    RetrievalJob.objects.filter(pk=job.pk).update(
        status=RetrievalJob.Status.RUNNING, received=3, expected=12
    )
    expect(page.locator(".counts")).to_have_text("3 / 12")
    expect(page.locator(".state")).to_have_text("Arriving")
    expect(page.locator("progress")).to_have_attribute("value", "25")
    assert loads == []

    RetrievalJob.objects.filter(pk=job.pk).update(
        status=RetrievalJob.Status.FAILED,
        error="cannot reach PACS@127.0.0.1: no association",
        error_kind=RetrievalJob.Failure.UNREACHABLE,
    )
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("The portal cannot reach the PACS pacs at PACS (127.0.0.1:")
    expect(alert.get_by_role("button", name="Try again")).to_be_visible()
    assert violations == []
