"""Staff sign-in as an attacker meets it: the password (django-axes by address and by username,
429 then the cool-off), the mandatory second factor (TOTP, passkeys, hashed single-use recovery
codes), the hard lock only an administrator lifts, session keys rotated at each step, idle and
absolute expiry, sign-out that kills the session, re-authentication before sensitive actions,
and the admin behind all of it.

Personas: alice is an administrator, bob a sharer, carol an auditor, each with an authenticator
app; dave is new and has no second factor yet; mallory has somebody's password but not their
phone, and tries everything.
"""

import json
import re
import time
from base64 import b32decode, b32encode
from datetime import timedelta
from typing import Any

import pytest
from axes.models import AccessAttempt
from django.conf import settings
from django.contrib.sessions.models import Session
from django.db.models import F
from django.http import HttpRequest, HttpResponse
from django.test import Client
from django.urls import path
from django.utils import timezone
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts import staff, staff_auth
from accounts.models import AuditEvent, RecoveryCode, RecoveryCodeDevice, StaffPasskey, User
from portal import urls as portal_urls
from tests.support.staff import staff_client
from tests.test_access_passkeys import SoftAuthenticator

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"
SESSION = settings.SESSION_COOKIE_NAME


def make_staff(username: str, role: str = User.Role.SHARER, *, totp: bool = True) -> User:
    user = User.objects.create_user(
        username,
        f"{username}@hospital.example.org",
        PASSWORD,
        role=role,
        is_staff=role == User.Role.ADMIN,
        is_superuser=role == User.Role.ADMIN,
    )
    if totp:
        # The name tests.support.staff.staff_client gives its device: both use this one.
        TOTPDevice.objects.create(user=user, name="test", confirmed=True)
    return user


def device_of(user: User) -> TOTPDevice:
    return TOTPDevice.objects.get(user=user, confirmed=True)


def code(device: TOTPDevice, *, steps_ahead: int = 0) -> str:
    device.refresh_from_db()
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    totp.time = time.time() + steps_ahead * device.step
    return f"{totp.token():0{device.digits}d}"


def wrong(right: str) -> str:
    return f"{(int(right) + 500_000) % 10**6:06d}"


def unthrottle(user: User) -> None:
    """Time travel past django-otp's growing wait between guesses (not past the hard lock)."""
    TOTPDevice.objects.filter(user=user).update(
        throttling_failure_timestamp=timezone.now() - timedelta(hours=1)
    )


def password_step(client: Client, username: str, password: str = PASSWORD, **extra: Any) -> Any:
    return client.post("/staff/login/", {"username": username, "password": password, **extra})


def sign_in(client: Client, user: User, **extra: Any) -> Any:
    answer = password_step(client, user.username, **extra)
    assert answer.status_code == 302 and answer["Location"] == "/staff/login/second-factor/"
    return client.post("/staff/login/second-factor/", {"otp": code(device_of(user))})


def cookie(client: Client) -> str:
    return client.cookies[SESSION].value


def is_signed_in(client: Client) -> bool:
    return client.get("/staff/security/").status_code == 200


def actions(**filters: Any) -> list[str]:
    return list(
        AuditEvent.objects.filter(**filters).order_by("pk").values_list("action", flat=True)
    )


@pytest.fixture
def alice() -> User:
    return make_staff("alice", User.Role.ADMIN)


@pytest.fixture
def bob() -> User:
    return make_staff("bob", User.Role.SHARER)


@pytest.fixture
def carol() -> User:
    return make_staff("carol", User.Role.AUDITOR)


@pytest.fixture
def dave() -> User:
    return make_staff("dave", User.Role.SHARER, totp=False)


class TestPasswordAndCode:
    def test_it_signs_bob_in_with_his_password_and_code_and_rotates_the_key_each_step(
        self, bob: User
    ) -> None:
        client = Client()
        session = client.session
        session["planted"] = "by mallory"
        session.save()
        planted = cookie(client)

        password_step(client, "bob", next="/staff/shares/")
        after_password = cookie(client)
        answer = client.post("/staff/login/second-factor/", {"otp": code(device_of(bob))})
        after_code = cookie(client)

        assert answer.status_code == 302 and answer["Location"] == "/staff/shares/"
        assert len({planted, after_password, after_code}) == 3
        # The earlier keys are gone server side: a planted or stolen key opens nothing.
        assert not Session.objects.filter(session_key__in=[planted, after_password]).exists()
        assert "planted" not in client.session
        assert is_signed_in(client)
        assert actions(actor=bob) == [AuditEvent.Action.STAFF_LOGIN]

    def test_it_refuses_a_wrong_password_and_records_it(self, bob: User) -> None:
        mallory = Client()

        answer = password_step(mallory, "bob", "not bob's password")

        assert answer.status_code == 200
        assert "do not match" in answer.content.decode()
        assert staff.PENDING_USER not in mallory.session
        assert mallory.get("/staff/login/second-factor/")["Location"] == "/staff/login/"
        event = AuditEvent.objects.get(action=AuditEvent.Action.STAFF_LOGIN_FAILED)
        assert event.actor == bob and "not bob" not in json.dumps(event.detail)

    def test_an_unknown_username_gets_the_same_answer(self, bob: User) -> None:
        known = password_step(Client(), "bob", "wrong password here")
        unknown = password_step(Client(), "nobody", "wrong password here")
        assert known.status_code == unknown.status_code == 200
        assert "do not match" in unknown.content.decode()

    def test_the_password_alone_reaches_nothing(self, alice: User) -> None:
        mallory = Client()
        password_step(mallory, "alice")

        assert mallory.get("/staff/")["Location"].startswith("/staff/login/")
        assert mallory.get("/staff/security/")["Location"].startswith("/staff/login/")
        assert mallory.get("/staff/audit/")["Location"].startswith("/staff/login/")
        assert mallory.get("/admin/").status_code == 302
        assert mallory.get("/admin/accounts/user/").status_code == 302
        # Nor may a password add a second factor to an account that has one.
        assert mallory.get("/staff/enrol/")["Location"] == "/staff/login/second-factor/"
        assert not TOTPDevice.objects.filter(user=alice, confirmed=False).exists()

    def test_it_refuses_a_wrong_code(self, bob: User) -> None:
        mallory = Client()
        password_step(mallory, "bob")

        answer = mallory.post("/staff/login/second-factor/", {"otp": wrong(code(device_of(bob)))})

        assert answer.status_code == 200
        assert "not right" in answer.content.decode()
        assert not is_signed_in(mallory)
        assert actions(actor=bob) == [AuditEvent.Action.STAFF_SECOND_FACTOR_FAILED]

    def test_a_code_is_good_once(self, bob: User) -> None:
        first = Client()
        password_step(first, "bob")
        used = code(device_of(bob))
        assert first.post("/staff/login/second-factor/", {"otp": used}).status_code == 302

        mallory = Client()  # read the code over bob's shoulder, a second too late
        password_step(mallory, "bob")
        answer = mallory.post("/staff/login/second-factor/", {"otp": used})

        assert answer.status_code == 200 and not is_signed_in(mallory)

    def test_guesses_are_throttled_and_a_throttled_try_is_not_checked(self, bob: User) -> None:
        mallory = Client()
        password_step(mallory, "bob")
        right = code(device_of(bob))
        mallory.post("/staff/login/second-factor/", {"otp": wrong(right)})

        # Within django-otp's wait, even the right code is refused unchecked.
        answer = mallory.post("/staff/login/second-factor/", {"otp": right})

        assert "Please wait" in answer.content.decode()
        assert not is_signed_in(mallory)
        assert User.objects.get(pk=bob.pk).second_factor_failures == 1

    def test_after_login_it_goes_home_by_role_or_to_a_safe_next(
        self, alice: User, bob: User, carol: User
    ) -> None:
        assert sign_in(Client(), bob)["Location"] == "/staff/"
        assert sign_in(Client(), carol)["Location"] == "/staff/audit/"
        evil = sign_in(Client(), alice, next="https://evil.example/staff/")
        assert evil["Location"] == "/staff/"
        TOTPDevice.objects.filter(user=alice).update(last_t=-1)  # a new code for a new login
        scheme_relative = sign_in(Client(), alice, next="//evil.example/")
        assert scheme_relative["Location"] == "/staff/"

    def test_a_signed_in_visit_to_the_login_page_goes_on(self, bob: User) -> None:
        client = staff_client(bob)
        assert client.get("/staff/login/?next=/staff/shares/")["Location"] == "/staff/shares/"


class TestRoles:
    def test_a_role_without_the_right_gets_403(self, bob: User, carol: User) -> None:
        assert staff_client(bob).get("/staff/audit/").status_code == 403
        # The workspace's address sends an auditor to the audit log (no search for her).
        assert staff_client(carol).get("/staff/?patient_id=X")["Location"] == "/staff/audit/"
        assert staff_client(carol).get("/staff/shares/").status_code == 403
        assert staff_client(carol).get("/staff/audit/").status_code == 200


class TestEnrolment:
    def test_an_account_without_a_device_is_sent_to_enrolment_and_reaches_nothing_else(
        self, dave: User
    ) -> None:
        client = Client()
        answer = password_step(client, "dave")
        assert answer["Location"] == "/staff/enrol/"

        assert client.get("/staff/login/second-factor/")["Location"] == "/staff/enrol/"
        for url in ("/staff/", "/staff/security/", "/staff/shares/", "/staff/reauth/"):
            assert client.get(url)["Location"].startswith("/staff/login/"), url
        assert client.get("/admin/").status_code == 302

        page = client.get("/staff/enrol/")
        assert page.status_code == 200
        html = page.content.decode()
        # The QR code is drawn by the server, as SVG, and no script is needed.
        assert 'src="data:image/svg+xml' in html and "<script" not in html
        secret = re.search(r'data-secret="([A-Z2-7]+)"', html)
        assert secret is not None
        device = TOTPDevice.objects.get(user=dave)
        assert not device.confirmed and secret.group(1) in device.config_url
        # Reloading keeps the secret the app has scanned.
        assert secret.group(1) in client.get("/staff/enrol/").content.decode()

        refused = client.post("/staff/enrol/", {"otp": wrong(code(device))})
        assert refused.status_code == 200 and not is_signed_in(client)
        unthrottle(dave)
        shown = client.post("/staff/enrol/", {"otp": code(device)})

        assert shown.status_code == 200
        assert "no-store" in shown["Cache-Control"]
        codes = re.findall(
            r"<code>([0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4})</code>", shown.content.decode()
        )
        assert len(codes) == 10
        assert is_signed_in(client)
        assert TOTPDevice.objects.get(user=dave).confirmed
        assert AuditEvent.Action.STAFF_DEVICE_ADDED in actions(actor=dave)

    def test_createstaff_enrols_an_app_that_signs_in(self, capsys: Any, monkeypatch: Any) -> None:
        import io
        import sys

        from django.core.management import call_command

        monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
        call_command(
            "createstaff", "erin", email="erin@hospital.example.org", password_stdin=True, totp=True
        )
        assert "otpauth://totp/" in capsys.readouterr().out
        erin = User.objects.get(username="erin")
        assert sign_in(Client(), erin).status_code == 302


def enrol_secret(client: Client) -> str:
    page = client.get("/staff/enrol/")
    assert page.status_code == 200
    found = re.search(r'data-secret="([A-Z2-7]+)"', page.content.decode())
    assert found is not None
    return found.group(1)


def code_of_secret(secret: str) -> str:
    """What an authenticator app that scanned `secret` shows now (the device may be gone)."""
    totp = TOTP(b32decode(secret))
    return f"{totp.token():06d}"


def device_with_secret(user: User, secret: str) -> TOTPDevice | None:
    for device in TOTPDevice.objects.filter(user=user):
        if b32encode(device.bin_key).decode() == secret:
            return device
    return None


class TestEnrolmentSecretsAreNotShared:
    """Mallory knows the initial password of dave, who has not enrolled yet. Whatever secret she
    is shown must never become the one dave confirms."""

    def test_each_password_session_gets_its_own_secret_and_only_the_confirmed_one_signs_in(
        self, dave: User
    ) -> None:
        mallory = Client()
        password_step(mallory, "dave")
        seen_by_mallory = enrol_secret(mallory)

        client = Client()
        password_step(client, "dave")
        daves = enrol_secret(client)
        # Reloading keeps each session's own secret.
        assert enrol_secret(client) == daves and enrol_secret(mallory) == seen_by_mallory
        assert daves != seen_by_mallory

        device = device_with_secret(dave, daves)
        assert device is not None
        shown = client.post("/staff/enrol/", {"otp": code(device)})
        assert shown.status_code == 200 and is_signed_in(client)

        # Mallory's secret died with dave's confirmation: only dave's app remains.
        assert list(TOTPDevice.objects.filter(user=dave).values_list("pk", flat=True)) == [
            device.pk
        ]
        assert device_with_secret(dave, seen_by_mallory) is None
        stolen = code_of_secret(seen_by_mallory)
        assert mallory.post("/staff/enrol/", {"otp": stolen})["Location"] == (
            "/staff/login/second-factor/"
        )
        assert mallory.post("/staff/login/second-factor/", {"otp": stolen}).status_code == 200
        assert not is_signed_in(mallory)
        later = Client()
        password_step(later, "dave")
        unthrottle(dave)
        assert later.post("/staff/login/second-factor/", {"otp": stolen}).status_code == 200
        assert not is_signed_in(later)

    def test_an_unconfirmed_secret_left_by_another_session_is_never_shown_again(
        self, dave: User
    ) -> None:
        left = TOTPDevice.objects.create(user=dave, name="authenticator", confirmed=False)
        client = Client()
        password_step(client, "dave")

        shown = enrol_secret(client)

        assert shown != b32encode(left.bin_key).decode()
        device = device_with_secret(dave, shown)
        assert device is not None
        client.post("/staff/enrol/", {"otp": code(device)})
        assert is_signed_in(client)
        assert not TOTPDevice.objects.filter(pk=left.pk).exists()

    def test_a_secret_older_than_an_hour_is_refused_and_deleted(self, dave: User) -> None:
        client = Client()
        password_step(client, "dave")
        old_secret = enrol_secret(client)
        old = device_with_secret(dave, old_secret)
        assert old is not None
        TOTPDevice.objects.filter(pk=old.pk).update(
            created_at=timezone.now() - timedelta(seconds=staff_auth.ENROL_SECONDS + 60)
        )

        answer = client.post("/staff/enrol/", {"otp": code(old)})

        assert answer.status_code == 200 and not is_signed_in(client)
        assert "has expired" in answer.content.decode()
        assert not TOTPDevice.objects.filter(pk=old.pk).exists()
        # A new secret is shown, and it works.
        new_secret = enrol_secret(client)
        assert new_secret != old_secret
        new = device_with_secret(dave, new_secret)
        assert new is not None
        client.post("/staff/enrol/", {"otp": code(new)})
        assert is_signed_in(client)

    def test_an_abandoned_secret_older_than_an_hour_is_swept(self, dave: User) -> None:
        abandoned = TOTPDevice.objects.create(user=dave, name="authenticator", confirmed=False)
        TOTPDevice.objects.filter(pk=abandoned.pk).update(
            created_at=timezone.now() - timedelta(hours=2)
        )
        client = Client()
        password_step(client, "dave")
        enrol_secret(client)
        assert not TOTPDevice.objects.filter(pk=abandoned.pk).exists()


NEW_PASSWORD = "a quite different passphrase 42"


def change_password(
    client: Client, old: str = PASSWORD, new: str = NEW_PASSWORD, again: str | None = None
) -> Any:
    return client.post(
        "/staff/security/password/",
        {
            "old_password": old,
            "new_password1": new,
            "new_password2": new if again is None else again,
            "next": "/staff/security/",
        },
    )


class TestPasswordChange:
    def test_bob_changes_his_password_and_his_other_sessions_end(self, bob: User) -> None:
        other = Client()
        sign_in(other, bob)
        assert is_signed_in(other)
        # Mallory passed the old password and awaits the second factor.
        mallory = Client()
        password_step(mallory, "bob")
        assert mallory.get("/staff/login/second-factor/").status_code == 200
        client = staff_client(bob)

        answer = change_password(client)

        assert answer.status_code == 302 and answer["Location"] == "/staff/security/"
        assert "Your password is changed" in client.get("/staff/security/").content.decode()
        assert is_signed_in(client)
        assert not is_signed_in(other)
        assert mallory.get("/staff/login/second-factor/")["Location"] == "/staff/login/"
        assert AuditEvent.objects.filter(
            action=AuditEvent.Action.STAFF_PASSWORD_CHANGED, actor=bob
        ).exists()
        refused = password_step(Client(), "bob")
        assert refused.status_code == 200 and "do not match" in refused.content.decode()
        accepted = password_step(Client(), "bob", NEW_PASSWORD)
        assert accepted["Location"] == "/staff/login/second-factor/"

    def test_a_wrong_old_password_is_refused_and_nothing_changes(self, bob: User) -> None:
        other = Client()
        sign_in(other, bob)
        client = staff_client(bob)

        answer = change_password(client, old="mallory's guess")

        assert answer.status_code == 200
        html = answer.content.decode()
        assert "Your old password was entered incorrectly" in html
        assert NEW_PASSWORD not in html and "mallory&#x27;s guess" not in html
        assert User.objects.get(pk=bob.pk).check_password(PASSWORD)
        assert is_signed_in(client) and is_signed_in(other)
        assert not AuditEvent.objects.filter(
            action=AuditEvent.Action.STAFF_PASSWORD_CHANGED
        ).exists()

    def test_the_configured_validators_apply(self, bob: User) -> None:
        client = staff_client(bob)
        short = change_password(client, new="short1")
        assert "too short" in short.content.decode()
        mismatch = change_password(client, again=NEW_PASSWORD + "!")
        assert "didn’t match" in mismatch.content.decode()
        assert User.objects.get(pk=bob.pk).check_password(PASSWORD)

    def test_it_needs_a_recent_second_factor(self, bob: User) -> None:
        client = staff_client(bob, second_factor_at=time.time() - 3600)
        page = client.get("/staff/security/").content.decode()
        assert "confirm it is you first" in page

        answer = change_password(client)

        assert answer["Location"] == "/staff/reauth/?next=%2Fstaff%2Fsecurity%2F"
        assert User.objects.get(pk=bob.pk).check_password(PASSWORD)
        client.post(answer["Location"], {"otp": code(device_of(bob))})
        assert change_password(client)["Location"] == "/staff/security/"
        assert User.objects.get(pk=bob.pk).check_password(NEW_PASSWORD)

    def test_it_is_a_post_with_a_csrf_token(self, bob: User) -> None:
        signed_in = staff_client(bob)
        client = Client(enforce_csrf_checks=True)
        client.cookies[SESSION] = cookie(signed_in)
        assert client.get("/staff/security/password/").status_code == 405

        forged = change_password(client)  # from mallory's page: no token

        assert forged.status_code == 403
        assert User.objects.get(pk=bob.pk).check_password(PASSWORD)
        html = client.get("/staff/security/").content.decode()
        token = html.split('name="csrfmiddlewaretoken" value="', 1)[1].split('"', 1)[0]
        answer = client.post(
            "/staff/security/password/",
            {
                "old_password": PASSWORD,
                "new_password1": NEW_PASSWORD,
                "new_password2": NEW_PASSWORD,
                "csrfmiddlewaretoken": token,
            },
        )
        assert answer.status_code == 302
        assert User.objects.get(pk=bob.pk).check_password(NEW_PASSWORD)

    def test_it_speaks_french(self, bob: User) -> None:
        client = staff_client(bob)
        page = client.get("/staff/security/", HTTP_ACCEPT_LANGUAGE="fr").content.decode()
        assert "Changer mon mot de passe" in page and "Ancien mot de passe" in page


class TestRecoveryCodes:
    def _codes(self, client: Client) -> list[str]:
        answer = client.post("/staff/security/recovery-codes/", {"next": "/staff/security/"})
        assert answer.status_code == 200
        return re.findall(r"<code>([0-9A-Z-]{14})</code>", answer.content.decode())

    def test_they_are_stored_hashed_and_each_works_once(self, bob: User) -> None:
        codes = self._codes(staff_client(bob))
        assert len(codes) == 10
        stored = list(RecoveryCode.objects.values_list("code_hash", flat=True))
        assert len(stored) == 10
        for shown in codes:
            assert not any(shown.replace("-", "") in h or shown in h for h in stored)
        assert all(h.startswith("argon2") for h in stored)

        client = Client()
        password_step(client, "bob")
        # Typed as people type: lower case, no dashes.
        answer = client.post(
            "/staff/login/second-factor/", {"recovery_code": codes[0].replace("-", "").lower()}
        )
        assert answer.status_code == 302 and is_signed_in(client)
        assert AuditEvent.Action.STAFF_RECOVERY_CODE_USED in actions(actor=bob)

        mallory = Client()
        password_step(mallory, "bob")
        again = mallory.post("/staff/login/second-factor/", {"recovery_code": codes[0]})
        assert again.status_code == 200 and not is_signed_in(mallory)

        # Signed in with a recovery code, bob makes new ones and stays signed in.
        assert len(self._codes(client)) == 10 and is_signed_in(client)

    def test_new_codes_kill_the_old_ones(self, bob: User) -> None:
        client = staff_client(bob)
        old = self._codes(client)
        self._codes(client)

        mallory = Client()
        password_step(mallory, "bob")
        mallory.post("/staff/login/second-factor/", {"recovery_code": old[1]})
        assert not is_signed_in(mallory)

    def test_making_codes_needs_a_recent_second_factor(self, bob: User) -> None:
        client = staff_client(bob, second_factor_at=time.time() - 3600)

        answer = client.post("/staff/security/recovery-codes/", {"next": "/staff/security/"})

        assert answer.status_code == 302
        assert answer["Location"] == "/staff/reauth/?next=%2Fstaff%2Fsecurity%2F"
        assert not RecoveryCodeDevice.objects.exists()

        confirmed = client.post(answer["Location"], {"otp": code(device_of(bob))})
        assert confirmed["Location"] == "/staff/security/"
        assert len(self._codes(client)) == 10
        assert AuditEvent.Action.STAFF_REAUTH in actions(actor=bob)

    def test_reauth_never_sends_elsewhere(self, bob: User) -> None:
        client = staff_client(bob, second_factor_at=time.time() - 3600)
        answer = client.post(
            "/staff/reauth/", {"otp": code(device_of(bob)), "next": "https://evil.example/"}
        )
        assert answer["Location"] == "/staff/"


class TestHardLock:
    def test_wrong_second_factors_lock_the_account_until_an_admin_unlocks_it(
        self, alice: User, bob: User
    ) -> None:
        mallory = Client()
        password_step(mallory, "bob")
        right = code(device_of(bob))
        for _attempt in range(settings.STAFF_SECOND_FACTOR_MAX_FAILURES - 1):
            unthrottle(bob)
            answer = mallory.post("/staff/login/second-factor/", {"otp": wrong(right)})
            assert answer.status_code == 200
        unthrottle(bob)
        # Recovery codes count toward the same lock.
        locked = mallory.post("/staff/login/second-factor/", {"recovery_code": "AAAA-BBBB-CCCC"})

        assert locked.status_code == 403
        assert User.objects.get(pk=bob.pk).locked_at is not None
        assert AuditEvent.Action.STAFF_LOCKED in actions(actor=bob)
        # Bob himself, with his password and the right code, is refused: no cool-off lifts it.
        unthrottle(bob)
        AccessAttempt.objects.all().delete()
        assert password_step(Client(), "bob").status_code == 403

        admin = staff_client(alice)
        answer = admin.post(
            "/admin/accounts/user/", {"action": "unlock", "_selected_action": [bob.pk]}
        )
        assert answer.status_code == 302
        assert User.objects.get(pk=bob.pk).locked_at is None
        assert AuditEvent.objects.filter(
            action=AuditEvent.Action.STAFF_UNLOCKED, actor=alice, detail__staff_user=bob.pk
        ).exists()
        assert sign_in(Client(), bob).status_code == 302

    def test_a_signed_in_session_ends_when_its_account_is_locked(self, bob: User) -> None:
        client = staff_client(bob)
        User.objects.filter(pk=bob.pk).update(locked_at=timezone.now())

        answer = client.get("/staff/security/")

        assert answer["Location"].startswith("/staff/login/")
        assert "locked" in client.get("/staff/login/").content.decode()

    def test_wrong_codes_at_reauthentication_count_too(self, bob: User) -> None:
        User.objects.filter(pk=bob.pk).update(
            second_factor_failures=settings.STAFF_SECOND_FACTOR_MAX_FAILURES - 1
        )
        client = staff_client(bob, second_factor_at=time.time() - 3600)

        answer = client.post("/staff/reauth/", {"otp": wrong(code(device_of(bob)))})

        assert answer.status_code == 403
        assert not is_signed_in(client)


class TestPasswordLockout:
    def test_wrong_passwords_lock_the_username_then_the_cool_off_lets_bob_in(
        self, bob: User
    ) -> None:
        for attempt in range(settings.AXES_FAILURE_LIMIT):
            answer = password_step(Client(REMOTE_ADDR=f"198.51.100.{attempt + 1}"), "bob", "guess")
        assert answer.status_code == 429
        assert "Retry-After" in answer
        # From a fresh address, with the right password: still the cool-off.
        assert password_step(Client(REMOTE_ADDR="192.0.2.7"), "bob").status_code == 429
        assert AuditEvent.Action.LOCKOUT in actions(actor=bob)

        AccessAttempt.objects.update(
            attempt_time=F("attempt_time") - settings.AXES_COOLOFF_TIME - timedelta(minutes=1)
        )
        assert sign_in(Client(REMOTE_ADDR="192.0.2.7"), bob).status_code == 302

    def test_one_address_trying_many_usernames_is_locked_out(self, alice: User, bob: User) -> None:
        for name in ("root", "admin", "test", "guest", "user"):
            password_step(Client(REMOTE_ADDR="203.0.113.9"), name, "guess")

        answer = password_step(Client(REMOTE_ADDR="203.0.113.9"), "alice")

        assert answer.status_code == 429
        assert b"Too many attempts" in answer.content
        # Bob, elsewhere, is not affected.
        assert sign_in(Client(REMOTE_ADDR="192.0.2.8"), bob).status_code == 302

    def test_the_cool_off_is_the_configured_one(self, bob: User, settings: Any) -> None:
        settings.AXES_COOLOFF_TIME = timedelta(minutes=20)
        for _attempt in range(settings.AXES_FAILURE_LIMIT):
            answer = password_step(Client(), "bob", "guess")
        assert answer.status_code == 429 and answer["Retry-After"] == "1200"
        assert b"20 minutes" in answer.content

        AccessAttempt.objects.update(attempt_time=F("attempt_time") - timedelta(minutes=19))
        assert password_step(Client(), "bob").status_code == 429
        AccessAttempt.objects.update(attempt_time=F("attempt_time") - timedelta(minutes=2))
        assert password_step(Client(), "bob").status_code == 302


class TestSessions:
    def _age(self, client: Client, **seconds_ago: int) -> None:
        session = client.session
        for key, ago in seconds_ago.items():
            session[getattr(staff, key)] = int(time.time()) - ago
        session.save()

    def test_an_idle_session_ends(self, bob: User) -> None:
        client = Client()
        sign_in(client, bob)
        old = cookie(client)
        self._age(client, SEEN=settings.STAFF_SESSION_IDLE + 1)

        answer = client.get("/staff/security/")

        assert answer["Location"].startswith("/staff/login/")
        assert not Session.objects.filter(session_key=old).exists()
        assert AuditEvent.objects.filter(
            action=AuditEvent.Action.SESSION_EXPIRED, actor=bob, detail__reason="idle"
        ).exists()
        assert "session has ended" in client.get("/staff/login/").content.decode()

    def test_a_busy_session_still_ends_after_the_absolute_limit(self, bob: User) -> None:
        client = Client()
        sign_in(client, bob)
        self._age(client, STARTED=settings.STAFF_SESSION_MAX + 1, SEEN=5)

        assert client.get("/staff/security/")["Location"].startswith("/staff/login/")
        assert AuditEvent.objects.filter(
            action=AuditEvent.Action.SESSION_EXPIRED, detail__reason="max"
        ).exists()

    def test_a_session_within_its_limits_goes_on(self, bob: User) -> None:
        client = Client()
        sign_in(client, bob)
        self._age(
            client, STARTED=settings.STAFF_SESSION_MAX - 60, SEEN=settings.STAFF_SESSION_IDLE - 60
        )
        assert is_signed_in(client)

    def test_the_second_factor_must_follow_the_password_soon(self, bob: User) -> None:
        client = Client()
        password_step(client, "bob")
        session = client.session
        session[staff.PENDING_AT] = int(time.time()) - staff.PENDING_SECONDS - 1
        session.save()

        answer = client.post("/staff/login/second-factor/", {"otp": code(device_of(bob))})

        assert answer["Location"] == "/staff/login/"
        assert not is_signed_in(client)

    def test_logout_kills_the_session_server_side(self, bob: User) -> None:
        client = Client()
        sign_in(client, bob)
        stolen = cookie(client)

        answer = client.post("/staff/logout/")

        assert answer["Location"] == "/staff/login/"
        assert not Session.objects.filter(session_key=stolen).exists()
        mallory = Client()
        mallory.cookies[SESSION] = stolen
        assert not is_signed_in(mallory)
        assert actions(actor=bob)[-1] == AuditEvent.Action.LOGOUT

    def test_logout_is_a_post(self, bob: User) -> None:
        client = staff_client(bob)
        assert client.get("/staff/logout/").status_code == 405
        assert is_signed_in(client)


class TestAdmin:
    def test_the_admin_login_page_sends_to_the_staff_sign_in(self, alice: User) -> None:
        client = Client()
        answer = client.get("/admin/", follow=True)
        assert answer.redirect_chain[-1][0] == "/staff/login/?next=%2Fadmin%2F"

        assert sign_in(client, alice, next="/admin/")["Location"] == "/admin/"
        assert client.get("/admin/").status_code == 200

    def test_a_sharer_or_an_auditor_is_refused(self, bob: User, carol: User) -> None:
        for user in (bob, carol):
            User.objects.filter(pk=user.pk).update(is_staff=True)  # a careless edit
            client = staff_client(User.objects.get(pk=user.pk))
            assert client.get("/admin/").status_code == 403
            assert client.get("/admin/accounts/user/").status_code == 403
            assert client.get("/admin/login/?next=/admin/").status_code == 403

    def test_a_change_needs_a_recent_second_factor(self, alice: User, bob: User) -> None:
        client = staff_client(alice, second_factor_at=time.time() - 3600)
        assert client.get("/admin/accounts/user/").status_code == 200
        assert client.get(f"/admin/accounts/user/{bob.pk}/change/").status_code == 200

        answer = client.post(
            f"/admin/accounts/user/{bob.pk}/change/",
            {"username": "bob", "role": "admin", "is_active": "on"},
        )

        assert answer["Location"].startswith("/staff/reauth/?next=")
        assert User.objects.get(pk=bob.pk).role == User.Role.SHARER

        closing = client.post("/admin/accounts/recipientaccess/", {"action": "close"})
        assert closing["Location"].startswith("/staff/reauth/")
        assert not AuditEvent.objects.filter(action=AuditEvent.Action.RECIPIENTS_CLOSED).exists()

        fresh = staff_client(alice)
        assert (
            fresh.post("/admin/accounts/recipientaccess/", {"action": "close"}).status_code == 302
        )
        assert AuditEvent.objects.filter(action=AuditEvent.Action.RECIPIENTS_CLOSED).exists()

    def test_signing_out_of_the_admin_ends_the_staff_session(self, alice: User) -> None:
        client = staff_client(alice)
        stolen = cookie(client)

        answer = client.post("/admin/logout/")

        assert answer["Location"] == "/staff/login/"
        assert not Session.objects.filter(session_key=stolen).exists()
        assert client.get("/admin/").status_code == 302


class TestPasskeys:
    def _post_json(self, client: Client, url: str, body: str = "{}") -> Any:
        return client.post(url, body, content_type="application/json")

    def _add(self, client: Client, authenticator: SoftAuthenticator) -> Any:
        options = self._post_json(client, "/staff/security/passkeys/options/")
        assert options.status_code == 200, options.content
        credential = authenticator.register(json.loads(options.content))
        return self._post_json(client, "/staff/security/passkeys/", credential)

    def test_bob_adds_a_passkey_and_signs_in_with_it(self, bob: User) -> None:
        authenticator = SoftAuthenticator()
        assert self._add(staff_client(bob), authenticator).status_code == 200
        assert StaffPasskey.objects.filter(user=bob).count() == 1

        client = Client()
        password_step(client, "bob")
        page = client.get("/staff/login/second-factor/").content.decode()
        assert 'id="passkey-login"' in page
        options = self._post_json(client, "/staff/login/passkey/options/")
        answer = self._post_json(
            client, "/staff/login/passkey/", authenticator.assert_(json.loads(options.content))
        )

        assert answer.status_code == 200 and answer.json()["next"] == "/staff/"
        assert is_signed_in(client)
        assert AuditEvent.objects.filter(
            action=AuditEvent.Action.STAFF_LOGIN, actor=bob, detail__method="passkey"
        ).exists()

    def test_adding_a_passkey_needs_a_recent_second_factor(self, bob: User) -> None:
        client = staff_client(bob, second_factor_at=time.time() - 3600)
        assert self._post_json(client, "/staff/security/passkeys/options/").status_code == 403

    def test_another_users_passkey_or_a_forged_answer_is_refused_and_counted(
        self, alice: User, bob: User
    ) -> None:
        alices = SoftAuthenticator()
        assert self._add(staff_client(alice), alices).status_code == 200
        mine = SoftAuthenticator(credential_id=b"bob's own key, 32 bytes long...")
        assert self._add(staff_client(bob), mine).status_code == 200

        mallory = Client()
        password_step(mallory, "bob")
        options = json.loads(self._post_json(mallory, "/staff/login/passkey/options/").content)
        answer = self._post_json(mallory, "/staff/login/passkey/", alices.assert_(options))

        assert answer.status_code == 400 and not is_signed_in(mallory)
        assert User.objects.get(pk=bob.pk).second_factor_failures == 1

    def test_devices_are_listed_and_the_last_one_cannot_be_removed(self, bob: User) -> None:
        client = staff_client(bob)
        page = client.get("/staff/security/").content.decode()
        assert "Authenticator app" in page and "Remove" not in page
        totp = device_of(bob)
        refused = client.post(f"/staff/security/devices/totp/{totp.pk}/remove/", follow=True)
        assert "only second factor" in refused.content.decode()
        assert TOTPDevice.objects.filter(pk=totp.pk).exists()

        self._add(client, SoftAuthenticator())
        passkey = StaffPasskey.objects.get(user=bob)
        assert "Remove" in client.get("/staff/security/").content.decode()
        client.post(f"/staff/security/devices/totp/{totp.pk}/remove/")
        assert not TOTPDevice.objects.filter(pk=totp.pk).exists()
        # The app that verified this session is gone; the session stays signed in.
        assert is_signed_in(client)
        assert AuditEvent.Action.STAFF_DEVICE_REMOVED in actions(actor=bob)
        # The passkey is now the last one.
        client.post(f"/staff/security/devices/passkey/{passkey.pk}/remove/")
        assert StaffPasskey.objects.filter(pk=passkey.pk).exists()

    def test_nobody_removes_another_users_device(self, alice: User, bob: User) -> None:
        client = staff_client(bob)
        self._add(client, SoftAuthenticator())
        alices = device_of(alice)
        answer = client.post(f"/staff/security/devices/totp/{alices.pk}/remove/", follow=True)
        assert "does not exist" in answer.content.decode()
        assert TOTPDevice.objects.filter(pk=alices.pk).exists()


# A view of a sensitive action, as the workspace's would be declared.
@staff.staff_required()
@staff.recent_second_factor_required
def _sensitive(request: HttpRequest) -> HttpResponse:
    return HttpResponse("done")


urlpatterns = [path("sensitive/", _sensitive), *portal_urls.urlpatterns]


@pytest.mark.urls("tests.test_staff_auth")
def test_a_sensitive_view_asks_for_the_second_factor_again(bob: User) -> None:
    assert staff_client(bob).get("/sensitive/").content == b"done"
    stale = staff_client(bob, second_factor_at=time.time() - settings.STAFF_REAUTH_SECONDS - 1)
    answer = stale.get("/sensitive/")
    assert answer.status_code == 302 and answer["Location"].startswith("/staff/reauth/")


def test_the_sign_in_speaks_french(bob: User) -> None:
    client = Client(HTTP_ACCEPT_LANGUAGE="fr-FR,fr;q=0.9")
    page = client.get("/staff/login/").content.decode()
    assert "Connexion du personnel" in page and "Mot de passe" in page
    password_step(client, "bob")
    page = client.get("/staff/login/second-factor/").content.decode()
    assert "Code de votre application d’authentification" in page
