"""The staff audit log (/staff/audit/): auditors and administrators read and filter the trail
and export it as CSV (the writer of `manage.py audit export`); the export is itself audited.

alice is an auditor, bob an administrator, charlie a sharer (no access), dave a sharer whose
actions alice looks into. mallory sends a formula as her browser's name, hoping that an
auditor opens the export in a spreadsheet.
"""

import csv
import io
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
from django.test import Client
from django.utils import timezone
from django_otp import DEVICE_ID_SESSION_KEY
from django_otp.plugins.otp_totp.models import TOTPDevice
from playwright.sync_api import Browser, Page, expect

from accounts import audit as audit_trail
from accounts import services as account_services
from accounts.models import AuditEvent, Share, User
from accounts.staff import SECOND_FACTOR_AT
from tests.support.access import OTHER_STUDY_UID, STUDY_UID, make_share, make_study
from tests.support.browser import PHONE, assert_accessible, assert_fits_the_screen
from tests.support.staff import staff_client
from tests.test_access_bruteforce import captcha_passes, post_code, wrong_code_for  # noqa: F401
from tests.test_recipient_browser import browser  # noqa: F401

MALLORY_BROWSER = "=cmd|' /C calc'!A0"
AUDIT = "/staff/audit/"
EXPORT = "/staff/audit/export.csv"


def user(username: str, role: str) -> User:
    return User.objects.create_user(username, f"{username}@example.org", "x" * 20, role=role)


@pytest.fixture
def alice(db: Any) -> User:
    return user("alice", User.Role.AUDITOR)


@pytest.fixture
def trail(db: Any, captcha_passes: None) -> dict[str, Share]:  # noqa: F811
    """Two patients' shares, by dave; one opened by mallory's "browser"."""
    dave = user("dave", User.Role.SHARER)
    make_study(STUDY_UID, patient_name="DUPONT^Marie", patient_id="PAT-DUPONT")
    make_study(OTHER_STUDY_UID, patient_name="MARTIN^Paul", patient_id="PAT-MARTIN")
    dupont_share = make_share(STUDY_UID, created_by=dave)
    dupont = dupont_share.share
    martin = make_share(OTHER_STUDY_UID).share
    # mallory types a wrong code at dupont's share: recorded with her "browser".
    post_code(
        Client(), wrong_code_for(dupont_share), "198.51.100.9", HTTP_USER_AGENT=MALLORY_BROWSER
    )
    account_services.audit(AuditEvent.Action.VIEW, share=martin, study=OTHER_STUDY_UID)
    account_services.share_revoke(share=dupont, by=dave)
    return {"dupont": dupont, "martin": martin}


def ids_on_page(html: str) -> int:
    return html.count("<tr>") - 1  # the header row


class TestAccess:
    def test_it_shows_the_log_to_an_auditor(self, alice: User, trail: dict[str, Share]) -> None:
        response = staff_client(alice).get(AUDIT)
        assert response.status_code == 200
        html = response.content.decode()
        assert "Audit log" in html
        assert 'aria-current="page"' in html
        assert ids_on_page(html) == AuditEvent.objects.count()
        assert "no-store" in response["Cache-Control"]

    def test_what_a_visitor_sent_is_shown_as_text(self, alice: User) -> None:
        """mallory's browser name and a detail she chose are HTML she hopes an auditor's
        browser runs."""
        account_services.audit_trail.event_append(
            action=AuditEvent.Action.LINK_FAILED,
            user_agent="<script>alert('ua')</script>",
            detail={"reason": "<img src=x onerror=alert(1)>"},
        )
        html = staff_client(alice).get(AUDIT).content.decode()
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert(&#x27;ua&#x27;)&lt;/script&gt;" in html
        assert "&lt;img src=x onerror=alert(1)&gt;" in html

    def test_an_administrator_sees_it_too(self, db: Any) -> None:
        bob = user("bob", User.Role.ADMIN)
        assert staff_client(bob).get(AUDIT).status_code == 200

    @pytest.mark.parametrize("url", [AUDIT, EXPORT])
    def test_a_sharer_gets_403(self, db: Any, url: str) -> None:
        charlie = user("charlie", User.Role.SHARER)
        assert staff_client(charlie).get(url).status_code == 403
        assert not AuditEvent.objects.filter(action=AuditEvent.Action.AUDIT_EXPORTED).exists()

    @pytest.mark.parametrize("url", [AUDIT, EXPORT])
    def test_without_a_session_it_is_the_login_page(self, db: Any, url: str) -> None:
        response = Client().get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/staff/login/")

    def test_a_password_without_a_second_factor_is_not_enough(self, alice: User) -> None:
        session = SessionStore()
        session[SESSION_KEY] = str(alice.pk)
        session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
        session[HASH_SESSION_KEY] = alice.get_session_auth_hash()
        session.create()  # signed in with a password, no second factor verified
        client = Client()
        client.cookies[django_settings.SESSION_COOKIE_NAME] = str(session.session_key)
        response = client.get(AUDIT)
        assert response.status_code == 302 and response["Location"].startswith("/staff/login/")


class TestFilters:
    def get(self, alice: User, **params: Any) -> str:
        response = staff_client(alice).get(AUDIT, params)
        assert response.status_code == 200, response.content[:400]
        return response.content.decode()

    def test_by_patient_name_words_or_id(self, alice: User, trail: dict[str, Share]) -> None:
        dupont = AuditEvent.objects.filter(share=trail["dupont"]).count()
        assert ids_on_page(self.get(alice, patient="marie dupont")) == dupont
        assert ids_on_page(self.get(alice, patient="PAT-DUPONT")) == dupont
        assert "No event matches" in self.get(alice, patient="Nobody")

    def test_by_share(self, alice: User, trail: dict[str, Share]) -> None:
        html = self.get(alice, share=trail["martin"].pk)
        assert ids_on_page(html) == AuditEvent.objects.filter(share=trail["martin"]).count() == 2

    def test_by_staff_user_and_event(self, alice: User, trail: dict[str, Share]) -> None:
        assert ids_on_page(self.get(alice, staff="dave")) == 2  # created, revoked
        html = self.get(alice, staff="dave", action=AuditEvent.Action.SHARE_REVOKED)
        assert ids_on_page(html) == 1 and "Share revoked" in html

    def test_by_dates(self, alice: User, trail: dict[str, Share]) -> None:
        today = timezone.localdate()
        assert ids_on_page(self.get(alice, since=today, until=today)) == AuditEvent.objects.count()
        tomorrow = today + timedelta(days=1)
        assert "No event matches" in self.get(alice, since=tomorrow)
        yesterday = today - timedelta(days=1)
        assert "No event matches" in self.get(alice, until=yesterday)

    @pytest.mark.parametrize(
        "params",
        [
            {"share": "12; DROP TABLE"},
            {"share": "-1"},
            {"since": "2026-13-45"},
            {"action": "not-an-action"},
            {"since": "2026-05-02", "until": "2026-05-01"},
            {"patient": "x" * 65},
        ],
    )
    def test_bad_filters_get_an_error_and_show_nothing(
        self, alice: User, trail: dict[str, Share], params: dict[str, str]
    ) -> None:
        client = staff_client(alice)
        response = client.get(AUDIT, params)
        assert response.status_code == 400
        assert 'class="error"' in response.content.decode()
        assert ids_on_page(response.content.decode()) == -1  # no table at all
        assert client.get(EXPORT, params).status_code == 400
        assert not AuditEvent.objects.filter(action=AuditEvent.Action.AUDIT_EXPORTED).exists()

    def test_it_pages_the_events(self, alice: User) -> None:
        for i in range(60):
            account_services.audit(AuditEvent.Action.RECIPIENTS_OPENED, n=i)
        client = staff_client(alice)
        first = client.get(AUDIT, {"action": "recipients_opened"}).content.decode()
        assert ids_on_page(first) == 50 and "Page 1 of 2" in first
        assert "action=recipients_opened&amp;page=2" in first
        second = client.get(AUDIT, {"action": "recipients_opened", "page": "2"}).content.decode()
        assert ids_on_page(second) == 10
        # The newest first: n 59 on the first page, n 0 on the second.
        assert "n: 59" in first and "n: 0<" in second

    def test_it_speaks_french(self, alice: User, trail: dict[str, Share]) -> None:
        client = staff_client(alice)
        html = client.get(AUDIT, HTTP_ACCEPT_LANGUAGE="fr").content.decode()
        assert "Afficher les événements" in html and "Effacer les filtres" in html


class TestExport:
    def export(self, client: Client, **params: Any) -> list[dict[str, str]]:
        response: Any = client.get(EXPORT, params)
        assert response.status_code == 200
        assert response["Content-Type"] == "text/csv; charset=utf-8"
        assert response["Content-Disposition"].startswith('attachment; filename="audit-')
        assert "no-store" in response["Cache-Control"]
        body = b"".join(response.streaming_content).decode()
        return list(csv.DictReader(io.StringIO(body)))

    def test_it_writes_the_filtered_events_with_the_commands_writer(
        self, alice: User, trail: dict[str, Share]
    ) -> None:
        events = AuditEvent.objects.filter(share=trail["dupont"]).order_by("pk")
        rows = self.export(staff_client(alice), share=trail["dupont"].pk)
        assert [int(r["id"]) for r in rows] == [e.pk for e in events]
        # The same CSV as `audit export` gives for these events.
        out = io.StringIO()
        audit_trail.write_csv(events, out)
        expected = list(csv.DictReader(io.StringIO(out.getvalue())))
        assert rows == expected
        assert rows[0]["action"] == "share_created" and rows[0]["actor"] == "dave"

    def test_formulas_in_cells_are_neutralised(self, alice: User, trail: dict[str, Share]) -> None:
        rows = self.export(staff_client(alice))
        (wrong_code,) = [r for r in rows if r["action"] == AuditEvent.Action.CODE_FAILED]
        assert wrong_code["user_agent"] == "'" + MALLORY_BROWSER
        for row in rows:
            for cell in row.values():
                assert not cell.startswith(("=", "+", "-", "@")), cell

    @pytest.mark.parametrize("text", ["=1+1", "+33 6", "-2", "@SUM(A1)", "\tx", "safe"])
    def test_the_cell_rule(self, text: str) -> None:
        expected = text if text == "safe" else "'" + text
        assert audit_trail.csv_cell(text) == expected

    def test_the_export_is_itself_audited_without_the_patients_name(
        self, alice: User, trail: dict[str, Share]
    ) -> None:
        rows = self.export(staff_client(alice), patient="Marie Dupont")
        event = AuditEvent.objects.get(action=AuditEvent.Action.AUDIT_EXPORTED)
        assert event.actor == alice
        assert event.detail == {
            "format": "csv",
            "events": len(rows),
            "filters": {"patient_studies": [STUDY_UID]},
        }
        assert "Dupont" not in str(event.detail) and "DUPONT" not in str(event.detail)
        assert audit_trail.audit_verify().intact


# --- in a browser: keyboard, phone width, axe-core ---------------------------------------------


@pytest.fixture
def staff_page(browser: Browser, live_server: Any, settings: Any) -> Iterator[Page]:  # noqa: F811
    settings.BASE_URL = live_server.url
    context = browser.new_context(viewport=PHONE, locale="en-GB")
    yield context.new_page()
    context.close()


def sign_in_browser(page: Page, live_server: Any, person: User) -> None:
    """The session the staff login makes (password, then TOTP), put in the browser."""
    device, _created = TOTPDevice.objects.get_or_create(
        user=person, name="test", defaults={"confirmed": True}
    )
    session = SessionStore()
    session[SESSION_KEY] = str(person.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = person.get_session_auth_hash()
    session[DEVICE_ID_SESSION_KEY] = device.persistent_id
    session[SECOND_FACTOR_AT] = int(timezone.now().timestamp())
    session.create()
    page.context.add_cookies(
        [
            {
                "name": django_settings.SESSION_COOKIE_NAME,
                "value": str(session.session_key),
                "url": live_server.url,
            }
        ]
    )


@pytest.mark.django_db(transaction=True)
def test_the_audit_log_on_a_phone_with_the_keyboard_is_wcag_clean(
    staff_page: Page, live_server: Any, tmp_path: Path
) -> None:
    alice = user("alice", User.Role.AUDITOR)
    make_study(STUDY_UID, patient_name="DUPONT^Marie")
    share = make_share(STUDY_UID).share
    for i in range(55):
        account_services.audit(AuditEvent.Action.VIEW, share=share, study=STUDY_UID, n=i)
    sign_in_browser(staff_page, live_server, alice)
    page = staff_page

    page.goto(live_server.url + AUDIT)
    expect(page.get_by_role("heading", name="Audit log")).to_be_visible()
    assert_fits_the_screen(page)
    assert_accessible(page)

    # Keyboard only: to the patient filter, type, submit with Enter.
    page.keyboard.press("Tab")  # skip link
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.name") == "patient":
            break
    else:
        raise AssertionError("the patient filter is not reachable with Tab")
    page.keyboard.type("marie dupont")
    page.keyboard.press("Enter")
    expect(page).to_have_url(
        f"{live_server.url}{AUDIT}?patient=marie+dupont&share=&staff=&action=&since=&until="
    )
    expect(page.get_by_text("56 events")).to_be_visible()
    expect(page.get_by_role("link", name="Older events")).to_be_visible()
    assert_fits_the_screen(page)
    assert_accessible(page)

    # A bad date: the error is announced next to its field, still clean.
    page.goto(live_server.url + AUDIT + "?since=2026-05-02&until=2026-05-01")
    expect(page.get_by_text("The end date is before the start date.")).to_be_visible()
    assert_accessible(page)

    # The export downloads from its link.
    page.goto(live_server.url + AUDIT + "?patient=marie+dupont")
    with page.expect_download() as download:
        page.get_by_role("link", name="Export these events as CSV").click()
    saved = tmp_path / "export.csv"
    download.value.save_as(saved)
    assert len(list(csv.DictReader(saved.open()))) == 56
    assert os.path.getsize(saved) > 0
