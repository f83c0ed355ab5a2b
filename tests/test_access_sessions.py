"""Recipient sessions: fixation, binding to one share (IDOR), time limits, logs and headers."""

import http.client
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.sessions.backends.db import SessionStore
from django.test import Client
from django.utils import timezone

from accounts import access, credentials
from accounts.models import AuditEvent
from tests.support import free_port
from tests.support.access import (
    OTHER_STUDY_UID,
    last_code,
    legacy_link_path,
    link_token,
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


def _production_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PORTAL_SECRET_KEY": secrets.token_urlsafe(64),
        "PORTAL_BASE_URL": "https://portal.example.org",
        "PORTAL_ALLOWED_HOSTS": "portal.example.org",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'deploy.sqlite3'}",
        "PORTAL_DEBUG": "false",
        # Production uses Redis; the file system broker is a warning under --deploy.
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
        # One-time codes reach recipients (accounts.E010, E011 otherwise).
        "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "PORTAL_SMS_BACKEND": "http",
        "PORTAL_SMS_GATEWAY_URL": "https://sms.example.org/v1/messages",
        "PORTAL_SMS_GATEWAY_TOKEN": secrets.token_urlsafe(32),
    }


class TestSessionFixation:
    def test_the_session_key_changes_at_every_step(self, share, sms_dir):
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

    def test_the_code_step_rotates_the_key_too(self, share):
        client = Client()
        before = SessionStore()
        before.create()
        client.cookies[django_settings.SESSION_COOKIE_NAME] = str(before.session_key)
        client.post("/access/", {"code": share.access_code})
        assert session_key(client) != before.session_key
        assert client.session[access.STAGE] == access.PENDING


class TestBoundToOneShare:
    @pytest.fixture
    def two_shares(self, study, sms_dir):
        make_study(OTHER_STUDY_UID, patient_name="MARTIN^Paul", description="MR GENOU")
        a = make_share(contact="+33611111111")
        b = make_share(OTHER_STUDY_UID, contact="+33622222222")
        return a, b

    def test_the_viewer_shows_only_the_sessions_study(self, two_shares, sms_dir):
        a, _b = two_shares
        client = Client()
        sign_in(client, a, sms_dir)
        page = client.get("/viewer/").content.decode()
        assert "CT THORAX" in page and "Marie DUPONT" in page
        assert "MR GENOU" not in page and "MARTIN" not in page

    def test_the_history_lists_only_the_sessions_share(self, two_shares, sms_dir):
        a, b = two_shares
        open_link(Client(), b, REMOTE_ADDR="198.51.100.222")
        client = Client()
        sign_in(client, a, sms_dir, REMOTE_ADDR="192.0.2.33")
        page = client.get("/access/history", REMOTE_ADDR="192.0.2.33").content.decode()
        assert "192.0.2.33" in page
        assert "One-time code accepted" in page
        assert "198.51.100.222" not in page

    def test_the_history_does_not_show_where_staff_worked_from(self, share, sms_dir, rf):
        from accounts import services
        from accounts.models import User

        staff = User.objects.create_user("secretary", password="x" * 16)
        request = rf.post(
            "/admin/", REMOTE_ADDR="10.20.30.40", HTTP_USER_AGENT="StaffDesktop/7.1 (ward 3)"
        )
        request.user = staff
        services.share_unlock(share=share.share, by=staff, request=request)
        assert AuditEvent.objects.filter(ip_address="10.20.30.40").exists()
        client = Client()
        sign_in(client, share, sms_dir, REMOTE_ADDR="192.0.2.33", HTTP_USER_AGENT="PatientPhone/1")
        page = client.get("/access/history", REMOTE_ADDR="192.0.2.33").content.decode()
        assert "Share unlocked" in page and "hospital staff" in page
        assert "10.20.30.40" not in page and "StaffDesktop" not in page
        # The recipient's own steps keep their address and browser.
        assert "192.0.2.33" in page and "PatientPhone/1" in page

    @pytest.mark.parametrize(
        "path", ["/admin/", "/admin/login/", "/admin/accounts/share/", "/staff/", "/staff/login/"]
    )
    def test_staff_pages_are_404_to_a_recipient(self, share, sms_dir, path):
        client = Client()
        sign_in(client, share, sms_dir)
        assert client.get(path).status_code == 404
        assert client.post(path, {"username": "x", "password": "y"}).status_code == 404
        # The session itself is unharmed.
        assert client.get("/viewer/").status_code == 200

    def test_opening_another_link_drops_the_first_share(self, two_shares, sms_dir):
        a, b = two_shares
        client = Client()
        sign_in(client, a, sms_dir)
        open_link(client, b)
        assert client.session[access.SHARE] == b.share.pk
        assert client.get("/viewer/")["Location"] == "/access/"

    def test_without_the_one_time_code_nothing_is_shown(self, share):
        client = Client()
        open_link(client, share)
        assert client.get("/viewer/")["Location"] == "/access/"
        assert client.get("/access/history")["Location"] == "/access/"

    def test_revoking_ends_open_sessions(self, share, sms_dir):
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

    def test_it_ends_after_15_minutes_idle(self, share, sms_dir):
        client = Client()
        sign_in(client, share, sms_dir)
        self._age(client, seen=14 * 60)
        assert client.get("/viewer/").status_code == 200
        self._age(client, seen=16 * 60)
        assert client.get("/viewer/")["Location"] == "/access/"
        assert b"after a period without activity" in client.get("/access/").content
        assert AuditEvent.objects.filter(
            share=share.share, action=AuditEvent.Action.SESSION_EXPIRED
        ).exists()

    def test_it_ends_after_2_hours_whatever_the_activity(self, share, sms_dir):
        client = Client()
        sign_in(client, share, sms_dir)
        self._age(client, started=2 * 3600 + 1)
        assert client.get("/viewer/")["Location"] == "/access/"

    def test_the_cookie_expires_with_the_idle_limit(self, share, sms_dir):
        client = Client()
        sign_in(client, share, sms_dir)
        assert 0 < client.session.get_expiry_age() <= 15 * 60

    def test_sign_out_ends_the_session(self, share, sms_dir):
        client = Client()
        sign_in(client, share, sms_dir)
        key = str(session_key(client))
        response = client.post("/access/logout")
        assert response["Location"] == "/access/"
        assert not SessionStore().exists(key)
        assert client.get("/viewer/")["Location"] == "/access/"
        assert AuditEvent.objects.filter(
            share=share.share, action=AuditEvent.Action.LOGOUT
        ).exists()
        assert client.get("/access/logout").status_code == 405


class TestSecretsStayOutOfLogsAndUrls:
    def test_no_token_code_or_otp_in_any_log_line(self, study, sms_dir, caplog):
        for name in ("", "django", "django.request", "axes", "accounts"):
            logging.getLogger(name).setLevel(logging.DEBUG)
        try:
            caplog.set_level(logging.DEBUG)
            created = make_share()
            token = link_token(created)
            client = Client()
            response = open_link(client, created, follow=True)
            final_url = response.redirect_chain[-1][0]
            assert final_url == "/access/verify"
            assert token not in final_url
            client.post("/access/verify", {"action": "send"})
            otp = last_code(sms_dir)
            client.post("/access/verify", {"otp": otp})
            client.get("/viewer/")
            # Failures and a lockout are logged by axes (with the path) and django.request.
            wrong = created.access_code[:-1] + ("0" if created.access_code[-1] != "0" else "1")
            Client().post("/access/", {"code": wrong}, REMOTE_ADDR="203.0.113.9")
            for _ in range(5):
                unknown = "/s/" + credentials.sign_link_token(credentials.new_link_token())
                Client().get(unknown, REMOTE_ADDR="203.0.113.9")
                Client().get(legacy_link_path(created) + "tamper", REMOTE_ADDR="203.0.113.9")
            Client().get("/s/" + token, REMOTE_ADDR="203.0.113.9")
            Client().post("/access/", {"code": created.access_code}, REMOTE_ADDR="203.0.113.9")
        finally:
            for name in ("", "django", "django.request", "axes", "accounts"):
                logging.getLogger(name).setLevel(logging.NOTSET)
        logged = caplog.text + "\n".join(str(r.__dict__) for r in caplog.records)
        assert "AXES: Locking out" in logged  # the failures were logged…
        raw = token.split(".", 1)[0]
        assert raw not in logged  # …without the token
        assert created.access_code not in logged
        assert created.access_code.replace("-", "")[4:] not in logged
        assert wrong.replace("-", "")[4:] not in logged
        assert otp not in logged

    def test_the_development_servers_request_lines_are_redacted(self, tmp_path, settings):
        """runserver prints a line per request, path included: run it, open a link, read what
        it printed."""
        key = secrets.token_urlsafe(64)
        settings.SECRET_KEY = key
        signed = credentials.sign_link_token(credentials.new_link_token())
        raw = signed.split(".", 1)[0]
        env = {
            **os.environ,
            "PORTAL_SECRET_KEY": key,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'server.sqlite3'}",
            "PORTAL_BROKER_DIR": str(tmp_path / "broker"),
            "PORTAL_LOG_LEVEL": "DEBUG",
        }
        manage = [sys.executable, "manage.py"]
        subprocess.run([*manage, "migrate", "-v0"], cwd=BASE_DIR, env=env, check=True, timeout=120)
        port = free_port()
        server = subprocess.Popen(
            [*manage, "runserver", "--noreload", "--skip-checks", f"127.0.0.1:{port}"],
            cwd=BASE_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "runserver did not start"
                    time.sleep(0.1)
            for path in (f"/s/{signed}", f"/s/{signed}?x=1", "/s/" + raw + "/more"):
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", path, headers={"Sec-Fetch-Mode": "navigate"})
                connection.getresponse().read()
                connection.close()
        finally:
            server.terminate()
            out, err = server.communicate(timeout=20)
        printed = out + err
        assert '"GET /s/[redacted] HTTP/1.1" 302' in printed, printed
        assert raw not in printed
        assert "AXES" in printed  # the failure was logged too, without the token


class TestHeaders:
    @pytest.mark.parametrize("path", ["/access/", "/access/verify", "/viewer/", "/access/history"])
    def test_recipient_pages_send_the_security_headers(self, share, sms_dir, path):
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

    def test_link_redirects_and_lockout_pages_are_not_cached(self, share):
        for response in (open_link(Client(), share), Client().get(legacy_link_path(share))):
            assert "no-store" in response["Cache-Control"]
        assert "no-store" in Client().get("/access/locked")["Cache-Control"]

    def test_pages_with_patient_data_are_not_cached(self, share, sms_dir):
        client = Client()
        sign_in(client, share, sms_dir)
        for path in ("/viewer/", "/access/history"):
            response = client.get(path)
            assert response.status_code == 200
            directives = {d.strip() for d in response["Cache-Control"].split(",")}
            assert {"no-store", "no-cache", "private", "max-age=0"} <= directives

    def test_check_deploy_passes_with_production_settings(self, tmp_path):
        env = _production_env(tmp_path)
        result = subprocess.run(
            [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
            cwd=BASE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_production_settings_send_hsts_and_host_cookies(self, tmp_path):
        """The production environment, in a process of its own (nothing of the test settings):
        what does it answer over HTTPS and over plain HTTP?"""
        probe = (
            "import json, django\n"
            "django.setup()\n"
            "from django.conf import settings as s\n"
            "from django.test import Client\n"
            "host = {'HTTP_HOST': 'portal.example.org'}\n"
            "https = Client().get('/healthz', secure=True, **host)\n"
            "plain = Client().get('/access/', **host)\n"
            "print(json.dumps({'cookies': [s.SESSION_COOKIE_NAME, s.CSRF_COOKIE_NAME,"
            " s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE],"
            " 'status': https.status_code, 'hsts': https.get('Strict-Transport-Security'),"
            " 'plain': [plain.status_code, plain.get('Location')]}))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", probe],
            cwd=BASE_DIR,
            env={**_production_env(tmp_path), "DJANGO_SETTINGS_MODULE": "portal.settings"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout.strip().splitlines()[-1])
        assert seen["status"] == 200
        assert seen["hsts"] == "max-age=63072000; includeSubDomains; preload"
        assert seen["plain"] == [301, "https://portal.example.org/access/"]
        assert seen["cookies"] == ["__Host-portal_session", "__Host-portal_csrf", True, True]

    def test_check_deploy_refuses_the_demo_key(self, tmp_path):
        env = {k: v for k, v in os.environ.items() if k != "PORTAL_SECRET_KEY"} | {
            "PORTAL_BASE_URL": "https://portal.example.org",
            "PORTAL_ALLOWED_HOSTS": "portal.example.org",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'deploy.sqlite3'}",
        }
        for debug, refusal in [
            # DEBUG off: the settings themselves refuse it, before any check runs.
            ("false", "ImproperlyConfigured: PORTAL_SECRET_KEY is not set"),
            # DEBUG on (the demo): the deploy check says the same.
            ("true", "portal.E001"),
        ]:
            result = subprocess.run(
                [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                cwd=BASE_DIR,
                env={**env, "PORTAL_DEBUG": debug},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode != 0
            assert refusal in result.stderr + result.stdout


def test_refreshing_the_idle_clock_never_outlasts_the_limits(share, sms_dir) -> None:
    from django.contrib.sessions.models import Session

    client = Client()
    sign_in(client, share, sms_dir)
    # Active for 14 minutes: the idle clock starts again…
    session = client.session
    session[access.SEEN] -= 14 * 60
    session.save()
    assert client.get("/viewer/").status_code == 200
    assert int(time.time()) - client.session[access.SEEN] <= 1
    key = str(session_key(client))
    expires = Session.objects.get(session_key=key).expire_date
    assert expires - timezone.now() <= timedelta(minutes=15)
    # …and 15 idle minutes later the session is over, on the server.
    session = client.session
    session[access.SEEN] -= 15 * 60 + 1
    session.save()
    assert client.get("/viewer/")["Location"] == "/access/"
    assert not Session.objects.filter(session_key=key, expire_date__gt=timezone.now()).exists()


def test_the_idle_refresh_stops_at_the_absolute_limit(share, sms_dir) -> None:
    from django.contrib.sessions.models import Session

    client = Client()
    sign_in(client, share, sms_dir)
    session = client.session
    session[access.STARTED] -= 2 * 3600 - 100  # 100 s before the 2-hour end
    session[access.SEEN] -= 60
    session.save()
    assert client.get("/viewer/").status_code == 200
    # The refreshed session (cookie and row) lives 100 s more, not another 15 minutes.
    key = str(session_key(client))
    assert Session.objects.get(session_key=key).expire_date - timezone.now() <= timedelta(
        seconds=100
    )
    assert client.session.get_expiry_age() <= 100
    session = client.session
    session[access.STARTED] -= 101
    session.save()
    assert client.get("/viewer/")["Location"] == "/access/"


class TestCsrfWithNoReferrer:
    """Browsers post with `Origin: null` and no Referer under `Referrer-Policy: no-referrer`."""

    def _token(self, client: Client) -> str:
        html = client.get("/access/").content.decode()
        return html.split('name="csrfmiddlewaretoken" value="', 1)[1].split('"', 1)[0]

    def test_a_null_origin_with_the_token_is_accepted(self, share) -> None:
        client = Client(enforce_csrf_checks=True)
        data = {"code": share.access_code, "csrfmiddlewaretoken": self._token(client)}
        response = client.post("/access/", data, HTTP_ORIGIN="null", secure=True)
        assert response.status_code == 302

    def test_a_foreign_origin_or_referer_is_refused(self, share) -> None:
        client = Client(enforce_csrf_checks=True)
        data = {"code": share.access_code, "csrfmiddlewaretoken": self._token(client)}
        assert client.post("/access/", data, HTTP_ORIGIN="https://evil.example").status_code == 403
        response = client.post(
            "/access/", data, secure=True, HTTP_REFERER="https://evil.example/form"
        )
        assert response.status_code == 403

    @pytest.mark.parametrize("site", ["cross-site", "same-site"])
    def test_a_null_origin_from_elsewhere_is_refused(self, share, site) -> None:
        # A sandboxed frame or a data: page posts with `Origin: null` too; the browser says
        # where it really comes from.
        client = Client(enforce_csrf_checks=True)
        data = {"code": share.access_code, "csrfmiddlewaretoken": self._token(client)}
        response = client.post(
            "/access/", data, HTTP_ORIGIN="null", HTTP_SEC_FETCH_SITE=site, secure=True
        )
        assert response.status_code == 403
        assert "recipient.share" not in client.session

    @pytest.mark.parametrize("site", ["same-origin", "none"])
    def test_a_null_origin_from_our_own_pages_is_accepted(self, share, site) -> None:
        client = Client(enforce_csrf_checks=True)
        data = {"code": share.access_code, "csrfmiddlewaretoken": self._token(client)}
        response = client.post(
            "/access/", data, HTTP_ORIGIN="null", HTTP_SEC_FETCH_SITE=site, secure=True
        )
        assert response.status_code == 302

    def test_no_token_no_post(self, share) -> None:
        client = Client(enforce_csrf_checks=True)
        self._token(client)
        response = client.post("/access/", {"code": share.access_code}, HTTP_ORIGIN="null")
        assert response.status_code == 403


def test_axes_records_keep_no_secret(share) -> None:
    from axes.models import AccessAttempt

    unknown = credentials.sign_link_token(credentials.new_link_token())
    Client().get("/s/" + unknown, REMOTE_ADDR="203.0.113.5")
    right = share.access_code
    wrong = right[:-1] + ("0" if right[-1] != "0" else "1")
    typed = wrong.replace("-", " ").lower()  # as a patient might type it
    Client().post("/access/", {"code": typed}, REMOTE_ADDR="203.0.113.5")
    rows = list(AccessAttempt.objects.values())
    assert len(rows) == 2
    blob = repr(rows)
    assert unknown.split(".")[0] not in blob
    for secret in (wrong, typed, wrong.replace("-", ""), wrong.replace("-", "")[4:]):
        assert secret not in blob and secret.lower() not in blob
    assert right.replace("-", "")[4:] not in blob
    assert "/s/[redacted]" in blob


def test_the_secrets_are_masked_before_the_failure_signal(share) -> None:
    """Django hands the credentials of a failed authentication to every receiver of
    user_login_failed (axes, and whatever else a site plugs in), masking only names that look
    secret: the typed code and the link token must be among them."""
    from django.contrib.auth.signals import user_login_failed

    heard: list[dict[str, str]] = []

    def receiver(sender, credentials, request=None, **kwargs):
        heard.append(dict(credentials))

    user_login_failed.connect(receiver)
    try:
        wrong = share.access_code[:-1] + ("0" if share.access_code[-1] != "0" else "1")
        Client().post("/access/", {"code": wrong}, REMOTE_ADDR="203.0.113.6")
        unknown = credentials.sign_link_token(credentials.new_link_token())
        Client().get("/s/" + unknown, REMOTE_ADDR="203.0.113.6")
    finally:
        user_login_failed.disconnect(receiver)
    masked = "*" * 20
    prefix = share.access_code[:4]
    assert heard[0] == {"access_code_secret": masked, "lockout_scope": "code:" + prefix}
    assert heard[1]["link_token"] == masked
    assert set(heard[1]) == {"link_token", "lockout_scope"}
    assert heard[1]["lockout_scope"].startswith("link:")
    assert unknown.split(".")[0] not in repr(heard)
