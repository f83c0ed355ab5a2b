"""The Django admin takes the staff sign-in (a password and a TOTP code), and administrators only.

From the admin one reads every recipient's phone and e-mail, unlocks shares and creates
superusers. alice is an administrator enrolled with `createstaff --totp`; bob is a sharer with an
authenticator too (made is_staff by hand, as a careless edit in the admin would); mallory has
alice's password, not her phone.
"""

import io
import sys
from typing import Any

import pytest
from django.conf import settings
from django.contrib import admin
from django.contrib.admin import AdminSite
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
from django.core.management import call_command
from django.test import Client
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts import checks
from accounts.models import User

PASSWORD = "correct horse battery staple"


def createstaff(monkeypatch: pytest.MonkeyPatch, username: str, role: str) -> TOTPDevice:
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
    call_command(
        "createstaff",
        username,
        email=f"{username}@hospital.example.org",
        role=role,
        password_stdin=True,
        totp=True,
        stdout=io.StringIO(),
    )
    return TOTPDevice.objects.get(user__username=username)


def code(device: TOTPDevice) -> str:
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    return f"{totp.token():0{device.digits}d}"


def admin_login(client: Client, username: str, *, otp_token: str | None = None, **_: str) -> Any:
    """The staff sign-in, as /admin/login/ sends there: the password, then (with `otp_token`)
    the code; the last answer."""
    answer = client.post(
        "/staff/login/", {"username": username, "password": PASSWORD, "next": "/admin/"}
    )
    if otp_token is None or answer.status_code != 302:
        return answer
    return client.post(answer["Location"], {"otp": otp_token})


@pytest.fixture
def alice(db: Any, monkeypatch: pytest.MonkeyPatch) -> TOTPDevice:
    return createstaff(monkeypatch, "alice", "admin")


@pytest.fixture
def bob(db: Any, monkeypatch: pytest.MonkeyPatch) -> TOTPDevice:
    device = createstaff(monkeypatch, "bob", "sharer")
    User.objects.filter(username="bob").update(is_staff=True)
    return device


class TestAdminSecondFactor:
    def test_its_login_page_is_the_staff_sign_in(self, alice: TOTPDevice) -> None:
        response = Client().get("/admin/login/?next=/admin/accounts/share/")
        assert response.status_code == 302
        assert response["Location"] == "/staff/login/?next=%2Fadmin%2Faccounts%2Fshare%2F"

    def test_it_refuses_the_password_alone(self, alice: TOTPDevice) -> None:
        mallory = Client()

        response = admin_login(mallory, "alice")

        assert response.status_code == 302  # on to the second factor
        assert "_auth_user_id" not in mallory.session
        assert mallory.get("/admin/").status_code == 302
        assert mallory.get("/admin/accounts/share/").status_code == 302

    def test_it_refuses_a_wrong_code(self, alice: TOTPDevice) -> None:
        mallory = Client()
        wrong = f"{(int(code(alice)) + 1) % 10**6:06d}"

        admin_login(mallory, "alice", otp_device=alice.persistent_id, otp_token=wrong)

        assert mallory.get("/admin/").status_code == 302

    def test_a_session_signed_in_with_the_password_alone_does_not_reach_it(
        self, alice: TOTPDevice
    ) -> None:
        """As if another page (a staff login of tomorrow) had taken the password only."""
        user = User.objects.get(username="alice")
        session = SessionStore()
        session[SESSION_KEY] = str(user.pk)
        session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
        session[HASH_SESSION_KEY] = user.get_session_auth_hash()
        session.create()
        mallory = Client()
        mallory.cookies[settings.SESSION_COOKIE_NAME] = str(session.session_key)
        assert mallory.get("/healthz").wsgi_request.user.is_authenticated

        response = mallory.get("/admin/")

        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")
        assert mallory.get("/admin/accounts/user/add/").status_code == 302

    def test_it_lets_alice_in_with_her_password_and_code(self, alice: TOTPDevice) -> None:
        client = Client()

        response = admin_login(
            client, "alice", otp_device=alice.persistent_id, otp_token=code(alice)
        )

        assert response.status_code == 302
        assert response["Location"] == "/admin/"
        assert client.get("/admin/").status_code == 200
        assert client.get("/admin/accounts/share/").status_code == 200

    def test_a_sharer_does_not_reach_it_even_with_a_verified_second_factor(
        self, bob: TOTPDevice
    ) -> None:
        client = Client()

        admin_login(client, "bob", otp_device=bob.persistent_id, otp_token=code(bob))

        assert client.get("/admin/").status_code == 403
        assert client.get("/admin/accounts/share/").status_code == 403

    def test_a_sharer_as_createstaff_makes_one_cannot_enter(
        self, db: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        device = createstaff(monkeypatch, "charlie", "sharer")
        client = Client()

        response = admin_login(
            client, "charlie", otp_device=device.persistent_id, otp_token=code(device)
        )

        # Signed in to the workspace, refused by the admin.
        assert response.status_code == 302
        assert client.get("/admin/").status_code == 403


class TestAdminCheck:
    def test_the_configured_site_passes(self) -> None:
        assert checks.check_admin_second_factor(None) == []

    def test_a_site_without_the_second_factor_is_an_error(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(admin, "site", AdminSite())

        errors = checks.check_admin_second_factor(None)

        assert [e.id for e in errors] == ["accounts.E013"]
        assert "not OTP-protected" in errors[0].msg

    def test_the_otp_middleware_must_follow_authentication(self, settings: Any) -> None:
        otp = "django_otp.middleware.OTPMiddleware"
        settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if m != otp]
        assert [e.id for e in checks.check_admin_second_factor(None)] == ["accounts.E014"]

        settings.MIDDLEWARE = [otp, *settings.MIDDLEWARE]
        assert [e.id for e in checks.check_admin_second_factor(None)] == ["accounts.E014"]
