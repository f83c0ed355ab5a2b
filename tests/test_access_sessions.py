"""Recipient sessions: fixation, binding to one share (IDOR), time limits, logs and headers."""

import logging
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.sessions.backends.db import SessionStore
from django.http import Http404
from django.test import Client, RequestFactory

from accounts import access
from accounts.models import AuditEvent
from tests.access_fixtures import *  # noqa: F403
from tests.access_fixtures import (
    OTHER_STUDY_UID,
    last_code,
    link_path,
    make_share,
    make_study,
    open_link,
    sign_in,
)

pytestmark = pytest.mark.django_db

BASE_DIR = Path(__file__).resolve().parent.parent


def session_key(client: Client) -> str | None:
    cookie = client.cookies.get(django_settings.SESSION_COOKIE_NAME)
    return cookie.value if cookie else None


class TestSessionFixation:
    def test_the_session_key_changes_at_every_step(self, share, sms_dir):  # type: ignore[no-untyped-def]
        # An attacker plants a session of their own in the victim's browser.
        planted = SessionStore()
        planted["planted"] = True
        planted.create()
        client = Client()
        client.cookies[django_settings.SESSION_COOKIE_NAME] = str(planted.session_key)

        open_link(client, share)
        after_link = session_key(client)
        assert after_link and after_link != planted.session_key
        assert not SessionStore().exists(str(planted.session_key))
        assert "planted" not in client.session

        client.post("/access/verify", {"action": "send"})
        client.post("/access/verify", {"otp": last_code(sms_dir)})
        after_otp = session_key(client)
        assert after_otp and after_otp not in {after_link, planted.session_key}
        assert not SessionStore().exists(after_link)
        assert client.get("/viewer/").status_code == 200

    def test_the_code_step_rotates_the_key_too(self, share):  # type: ignore[no-untyped-def]
        client = Client()
        before = SessionStore()
        before.create()
        client.cookies[django_settings.SESSION_COOKIE_NAME] = str(before.session_key)
        client.post("/access/", {"code": share.access_code})
        assert session_key(client) != before.session_key
        assert client.session[access.STAGE] == access.PENDING


class TestBoundToOneShare:
    @pytest.fixture
    def two_shares(self, study, sms_dir):  # type: ignore[no-untyped-def]
        make_study(OTHER_STUDY_UID, patient_name="MARTIN^Paul", description="MR GENOU")
        a = make_share(contact="+33611111111")
        b = make_share(OTHER_STUDY_UID, contact="+33622222222")
        return a, b

    def test_the_viewer_shows_only_the_sessions_study(self, two_shares, sms_dir):  # type: ignore[no-untyped-def]
        a, _b = two_shares
        client = Client()
        sign_in(client, a, sms_dir)
        page = client.get("/viewer/").content.decode()
        assert "CT THORAX" in page and "Marie DUPONT" in page
        assert "MR GENOU" not in page and "MARTIN" not in page

    def test_the_history_lists_only_the_sessions_share(self, two_shares, sms_dir):  # type: ignore[no-untyped-def]
        a, b = two_shares
        open_link(Client(), b, REMOTE_ADDR="198.51.100.222")
        client = Client()
        sign_in(client, a, sms_dir, REMOTE_ADDR="192.0.2.33")
        page = client.get("/access/history", REMOTE_ADDR="192.0.2.33").content.decode()
        assert "192.0.2.33" in page
        assert "One-time code accepted" in page
        assert "198.51.100.222" not in page

    def test_a_uid_of_another_share_is_404(self, two_shares, sms_dir):  # type: ignore[no-untyped-def]
        a, b = two_shares
        client = Client()
        sign_in(client, a, sms_dir)
        request = RequestFactory().get("/")
        request.session = client.session
        assert access.study_uid_or_404(request, a.share.study_instance_uid) == a.share
        with pytest.raises(Http404):
            access.study_uid_or_404(request, b.share.study_instance_uid)
        with pytest.raises(Http404):
            access.study_uid_or_404(request, "1.2.3.4")

    @pytest.mark.parametrize(
        "path", ["/admin/", "/admin/login/", "/admin/accounts/share/", "/staff/", "/staff/login/"]
    )
    def test_staff_pages_are_404_to_a_recipient(self, share, sms_dir, path):  # type: ignore[no-untyped-def]
        client = Client()
        sign_in(client, share, sms_dir)
        assert client.get(path).status_code == 404
        assert client.post(path, {"username": "x", "password": "y"}).status_code == 404
        # The session itself is unharmed.
        assert client.get("/viewer/").status_code == 200

    def test_opening_another_link_drops_the_first_share(self, two_shares, sms_dir):  # type: ignore[no-untyped-def]
        a, b = two_shares
        client = Client()
        sign_in(client, a, sms_dir)
        open_link(client, b)
        assert client.session[access.SHARE] == b.share.pk
        assert client.get("/viewer/")["Location"] == "/access/"

    def test_without_the_one_time_code_nothing_is_shown(self, share):  # type: ignore[no-untyped-def]
        client = Client()
        open_link(client, share)
        assert client.get("/viewer/")["Location"] == "/access/"
        assert client.get("/access/history")["Location"] == "/access/"

    def test_revoking_ends_open_sessions(self, share, sms_dir):  # type: ignore[no-untyped-def]
        from accounts import services

        client = Client()
        sign_in(client, share, sms_dir)
        services.share_revoke(share=share.share)
        assert client.get("/viewer/")["Location"] == "/access/"


class TestTimeLimits:
    def _age(self, client: Client, *, started: int = 0, seen: int = 0) -> None:
        session = client.session
        session[access.STARTED] -= started
        session[access.SEEN] -= seen
        session.save()

    def test_it_ends_after_15_minutes_idle(self, share, sms_dir):  # type: ignore[no-untyped-def]
        client = Client()
        sign_in(client, share, sms_dir)
        self._age(client, seen=14 * 60)
        assert client.get("/viewer/").status_code == 200
        self._age(client, seen=16 * 60)
        assert client.get("/viewer/")["Location"] == "/access/"
        assert b"after a period without activity" in client.get("/access/").content
        assert AuditEvent.objects.filter(share=share.share, action="session_expired").exists()

    def test_it_ends_after_2_hours_whatever_the_activity(self, share, sms_dir):  # type: ignore[no-untyped-def]
        client = Client()
        sign_in(client, share, sms_dir)
        self._age(client, started=2 * 3600 + 1)
        assert client.get("/viewer/")["Location"] == "/access/"

    def test_the_cookie_expires_with_the_idle_limit(self, share, sms_dir):  # type: ignore[no-untyped-def]
        client = Client()
        sign_in(client, share, sms_dir)
        assert 0 < client.session.get_expiry_age() <= 15 * 60

    def test_sign_out_ends_the_session(self, share, sms_dir):  # type: ignore[no-untyped-def]
        client = Client()
        sign_in(client, share, sms_dir)
        key = str(session_key(client))
        response = client.post("/access/logout")
        assert response["Location"] == "/access/"
        assert not SessionStore().exists(key)
        assert client.get("/viewer/")["Location"] == "/access/"
        assert AuditEvent.objects.filter(share=share.share, action="logout").exists()
        assert client.get("/access/logout").status_code == 405


class TestSecretsStayOutOfLogsAndUrls:
    def test_no_token_code_or_otp_in_any_log_line(self, study, sms_dir, caplog):  # type: ignore[no-untyped-def]
        for name in ("", "django", "django.request", "django.server", "axes", "accounts"):
            logging.getLogger(name).setLevel(logging.DEBUG)
        try:
            caplog.set_level(logging.DEBUG)
            created = make_share()
            token = link_path(created)[3:]
            client = Client()
            response = client.get(link_path(created), follow=True)
            final_url = response.redirect_chain[-1][0]
            assert final_url == "/access/verify"
            assert token not in final_url
            client.post("/access/verify", {"action": "send"})
            otp = last_code(sms_dir)
            client.post("/access/verify", {"otp": otp})
            client.get("/viewer/")
            # Failures and a lockout are logged by axes and django.request.
            for i in range(6):
                Client().get(link_path(created)[:-3] + f"x{i}y", REMOTE_ADDR="203.0.113.9")
                Client().get(link_path(created) + "tamper", REMOTE_ADDR="203.0.113.9")
            Client().post("/access/", {"code": created.access_code}, REMOTE_ADDR="203.0.113.9")
            Client().get("/s/" + token, REMOTE_ADDR="203.0.113.9")
            logging.getLogger("django.server").info('"GET /s/%s HTTP/1.1" 302 0', token)
            logging.getLogger("django.request").warning("Not Found: %s", "/s/" + token)
        finally:
            for name in ("", "django", "django.request", "django.server", "axes", "accounts"):
                logging.getLogger(name).setLevel(logging.NOTSET)
        logged = caplog.text + "\n".join(str(r.__dict__) for r in caplog.records)
        assert "AXES" in logged  # the failures were logged…
        raw = token.split(".", 1)[0]
        assert raw not in logged  # …without the token
        assert created.access_code not in logged
        assert created.access_code.replace("-", "")[4:] not in logged
        assert otp not in logged


class TestHeaders:
    @pytest.mark.parametrize("path", ["/access/", "/access/verify", "/viewer/", "/access/history"])
    def test_recipient_pages_send_the_security_headers(self, share, sms_dir, path):  # type: ignore[no-untyped-def]
        client = Client()
        sign_in(client, share, sms_dir)
        if path == "/access/verify":
            open_link(client, share)
        response = client.get(path)
        assert response.status_code == 200
        csp = response["Content-Security-Policy"]
        assert "default-src 'self'" in csp
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "frame-ancestors 'none'" in csp
        assert response["Referrer-Policy"] == "no-referrer"
        assert response["X-Frame-Options"] == "DENY"
        assert response["X-Content-Type-Options"] == "nosniff"
        assert "no-store" in response["Cache-Control"]
        html = response.content.decode()
        assert "<script>" not in html and " style=" not in html and "<style" not in html

    def test_link_redirects_and_lockout_pages_are_not_cached(self, share):  # type: ignore[no-untyped-def]
        response = Client().get(link_path(share))
        assert "no-store" in response["Cache-Control"]
        assert "no-store" in Client().get("/access/locked")["Cache-Control"]

    def test_hsts_over_https_in_production(self, share, settings):  # type: ignore[no-untyped-def]
        settings.SECURE_HSTS_SECONDS = 63072000
        settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True
        response = Client().get("/access/", secure=True)
        assert response["Strict-Transport-Security"].startswith("max-age=63072000")

    def test_check_deploy_passes_with_production_settings(self, tmp_path):  # type: ignore[no-untyped-def]
        env = {
            **os.environ,
            "PORTAL_SECRET_KEY": secrets.token_urlsafe(64),
            "PORTAL_BASE_URL": "https://portal.example.org",
            "PORTAL_ALLOWED_HOSTS": "portal.example.org",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'deploy.sqlite3'}",
            "PORTAL_DEBUG": "false",
        }
        result = subprocess.run(
            [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
            cwd=BASE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        # And production cookies are __Host- ones.
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import django; django.setup(); from django.conf import settings as s; "
                "print(s.SESSION_COOKIE_NAME, s.CSRF_COOKIE_NAME, s.SESSION_COOKIE_SECURE)",
            ],
            cwd=BASE_DIR,
            env={**env, "DJANGO_SETTINGS_MODULE": "portal.settings"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.stdout.split() == ["__Host-portal_session", "__Host-portal_csrf", "True"]

    def test_check_deploy_refuses_the_demo_key(self, tmp_path):  # type: ignore[no-untyped-def]
        env = {k: v for k, v in os.environ.items() if k != "PORTAL_SECRET_KEY"} | {
            "PORTAL_BASE_URL": "https://portal.example.org",
            "PORTAL_ALLOWED_HOSTS": "portal.example.org",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'deploy.sqlite3'}",
        }
        result = subprocess.run(
            [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
            cwd=BASE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode != 0
        assert "portal.E001" in result.stderr + result.stdout


def test_sessions_are_short_even_when_idle_clock_is_refreshed(share, sms_dir) -> None:  # type: ignore[no-untyped-def]
    client = Client()
    sign_in(client, share, sms_dir)
    session = client.session
    session[access.SEEN] = int(time.time()) - 31
    session.save()
    client.get("/viewer/")
    assert int(time.time()) - client.session[access.SEEN] <= 1


class TestCsrfWithNoReferrer:
    """Browsers post with `Origin: null` and no Referer under `Referrer-Policy: no-referrer`."""

    def _token(self, client: Client) -> str:
        html = client.get("/access/").content.decode()
        return html.split('name="csrfmiddlewaretoken" value="', 1)[1].split('"', 1)[0]

    def test_a_null_origin_with_the_token_is_accepted(self, share) -> None:  # type: ignore[no-untyped-def]
        client = Client(enforce_csrf_checks=True)
        data = {"code": share.access_code, "csrfmiddlewaretoken": self._token(client)}
        response = client.post("/access/", data, HTTP_ORIGIN="null", secure=True)
        assert response.status_code == 302

    def test_a_foreign_origin_or_referer_is_refused(self, share) -> None:  # type: ignore[no-untyped-def]
        client = Client(enforce_csrf_checks=True)
        data = {"code": share.access_code, "csrfmiddlewaretoken": self._token(client)}
        assert client.post("/access/", data, HTTP_ORIGIN="https://evil.example").status_code == 403
        response = client.post(
            "/access/", data, secure=True, HTTP_REFERER="https://evil.example/form"
        )
        assert response.status_code == 403

    def test_no_token_no_post(self, share) -> None:  # type: ignore[no-untyped-def]
        client = Client(enforce_csrf_checks=True)
        self._token(client)
        response = client.post("/access/", {"code": share.access_code}, HTTP_ORIGIN="null")
        assert response.status_code == 403


def test_axes_records_keep_no_secret(share) -> None:  # type: ignore[no-untyped-def]
    from axes.models import AccessAttempt

    token = link_path(share)[3:]
    Client().get("/s/" + token[:-2] + "zz", REMOTE_ADDR="203.0.113.5")
    wrong = share.access_code[:-1] + ("0" if share.access_code[-1] != "0" else "1")
    Client().post("/access/", {"code": wrong}, REMOTE_ADDR="203.0.113.5")
    rows = list(AccessAttempt.objects.values())
    assert len(rows) == 2
    blob = repr(rows)
    assert token.split(".")[0] not in blob
    assert wrong not in blob and wrong.replace("-", "")[4:] not in blob
    assert "/s/[redacted]" in blob
