"""Attacks on the staff workspace found in its security review, each played by mallory (who
holds a stolen session, a sharer's password, or only a link she mails to staff) against alice
(a sharer) and carol (an administrator)."""

import time
from typing import Any

import pytest
from axes.models import AccessAttempt
from django.test import Client
from django.urls import reverse

from accounts.audit import csv_cell, csv_lines
from accounts.models import AuditEvent, Share, User
from tests.support.access import make_share, make_study
from tests.support.staff import admin_user, staff_client

pytestmark = pytest.mark.django_db

STALE = time.time() - 3600  # a second factor proved an hour ago


@pytest.fixture
def alice() -> User:
    return User.objects.create_user("alice", "alice@example.org", "x" * 20, role="sharer")


class TestTheTotpDeviceAdmin:
    def test_it_is_not_on_the_admin_site(self) -> None:
        # An admin session (stolen, or past its re-authentication) would read every staff
        # member's key there, or add and remove devices without an audit event.
        carol = admin_user("carol")
        client = staff_client(carol)
        assert client.get("/admin/").status_code == 200
        assert client.get("/admin/otp_totp/totpdevice/").status_code == 404
        assert client.get("/admin/otp_totp/totpdevice/1/change/").status_code == 404


class TestResendingTheLink:
    def test_it_needs_the_second_factor_again(self, alice: User) -> None:
        make_study()
        share = make_share().share
        token_hash = share.token_hash
        client = staff_client(alice, second_factor_at=STALE)
        response = client.post(reverse("staff:share_resend", args=[share.pk]))
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("staff:reauth"))
        share.refresh_from_db()
        # The patient's link still works, and no new one was made or shown.
        assert share.token_hash == token_hash
        assert not AuditEvent.objects.filter(action=AuditEvent.Action.SHARE_REGENERATED).exists()


class TestStaffPagesInCaches:
    @pytest.mark.parametrize("name", ["staff:home", "staff:shares", "staff:security"])
    def test_no_staff_page_is_kept_by_the_browser(self, alice: User, name: str) -> None:
        response = staff_client(alice).get(reverse(name))
        assert response.status_code == 200
        assert "no-store" in response["Cache-Control"]


class TestTheSignInBudget:
    def test_a_flood_of_sign_ins_from_one_address_gets_429(self, settings: Any) -> None:
        # Past the lockout each attempt still costs an audit event: the flood is cut before.
        settings.RECIPIENT_REQUESTS_PER_MINUTE = 3  # below axes' 5: the budget answers first
        settings.TRUSTED_PROXIES = ["127.0.0.1"]
        if time.time() % 60 > 50:
            time.sleep(61 - time.time() % 60)  # the whole test within one minute's budget
        login = reverse("staff:login")
        for _ in range(3):
            response = Client().post(
                login,
                {"username": "alice", "password": "guess"},
                HTTP_X_FORWARDED_FOR="203.0.113.9",
            )
            assert response.status_code != 429
        events = AuditEvent.objects.count()
        response = Client().post(
            login, {"username": "alice", "password": "guess"}, HTTP_X_FORWARDED_FOR="203.0.113.9"
        )
        assert response.status_code == 429
        # Cut before the password step: neither axes nor the audit trail saw it.
        assert AuditEvent.objects.count() == events
        assert AccessAttempt.objects.get().failures_since_start == 3
        # Another address still reaches the sign-in.
        assert Client().get(login, HTTP_X_FORWARDED_FOR="198.51.100.9").status_code == 200


class TestCrossSiteLinks:
    def test_a_mailed_search_link_does_not_search_in_alices_name(self, alice: User) -> None:
        client = staff_client(alice)
        response = client.get(
            reverse("staff:home"), {"patient_name": "VIP"}, HTTP_SEC_FETCH_SITE="cross-site"
        )
        assert response.status_code == 302
        assert response["Location"] == reverse("staff:home")
        assert not AuditEvent.objects.filter(action=AuditEvent.Action.STUDY_SEARCH).exists()
        # The landing page itself opens (no loop), and so does the sign-in.
        assert (
            client.get(reverse("staff:home"), HTTP_SEC_FETCH_SITE="cross-site").status_code == 200
        )
        login = f"{reverse('staff:login')}?next=/staff/"
        assert Client().get(login, HTTP_SEC_FETCH_SITE="cross-site").status_code == 200

    def test_the_same_search_from_the_workspace_runs(self, alice: User) -> None:
        response = staff_client(alice).get(
            reverse("staff:home"), {"patient_name": "VIP"}, HTTP_SEC_FETCH_SITE="same-origin"
        )
        assert response.status_code == 200
        assert AuditEvent.objects.filter(action=AuditEvent.Action.STUDY_SEARCH).count() == 1


class TestMessagesStayServerSide:
    def test_a_patient_id_in_a_message_never_reaches_a_cookie(self, alice: User) -> None:
        make_study(patient_id="PID-42")
        make_share()
        client = staff_client(alice)
        response = client.post(reverse("staff:shares_revoke_patient"), {"patient_id": "PID-42"})
        assert response.status_code in (200, 302)
        assert Share.objects.filter(revoked_at__isnull=False).exists()
        for cookie in response.cookies.values():
            assert "PID-42" not in cookie.value
        assert "messages" not in response.cookies
        # The message is still told, from the session.
        page = client.get(response["Location"]) if response.status_code == 302 else response
        assert "PID-42" in page.content.decode()


class TestCsvInjection:
    def test_a_formula_after_a_separator_is_quoted_away(self) -> None:
        # A User-Agent the attacker chose, opened in a spreadsheet that splits on ";".
        assert csv_cell("Mozilla/5.0;=1+1;-2+3;@SUM(1+1)") == ("Mozilla/5.0;'=1+1;'-2+3;'@SUM(1+1)")
        assert csv_cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
        assert csv_cell("well-formed, text") == "well-formed, text"

    def test_every_cell_is_quoted(self) -> None:
        event = AuditEvent(action=AuditEvent.Action.STAFF_LOGIN_FAILED, user_agent="x;=1+1")
        header, line = list(csv_lines([event]))[:2]
        assert header.startswith('"') and line.startswith('"')
        assert '"x;\'=1+1"' in line


class TestTheWorkspaceAddress:
    def test_an_auditor_is_sent_to_the_audit_log_and_searches_nothing(self) -> None:
        bob = User.objects.create_user("bob", "bob@example.org", "x" * 20, role="auditor")
        client = staff_client(bob)
        response = client.get(reverse("staff:home"), {"patient_id": "PID-1"})
        assert response.status_code == 302
        assert response["Location"] == reverse("staff:audit")
        assert not AuditEvent.objects.filter(action=AuditEvent.Action.STUDY_SEARCH).exists()
        # The search itself stays the sharers' (the share form, for one, is refused).
        assert client.get(reverse("staff:share_new"), {"study": "1.2.3"}).status_code == 403
