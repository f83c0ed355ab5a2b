"""Staff sessions for tests: a session made the way Django's login makes it, without going
through an authentication step (which needs a client address the test client's login lacks)."""

import time

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
from django.test import Client
from django_otp import DEVICE_ID_SESSION_KEY
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.models import User
from accounts.staff import SECOND_FACTOR_AT


def staff_client(user: User, *, second_factor_at: float | None = None) -> Client:
    """Signed in with a password and a second factor (a TOTP device of the user's), as the
    admin requires. The second factor counts as just proved (sensitive actions need no
    re-authentication) unless `second_factor_at` (seconds since the epoch) says otherwise."""
    device, _created = TOTPDevice.objects.get_or_create(
        user=user, name="test", defaults={"confirmed": True}
    )
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session[DEVICE_ID_SESSION_KEY] = device.persistent_id
    session[SECOND_FACTOR_AT] = int(time.time() if second_factor_at is None else second_factor_at)
    session.create()
    client = Client()
    client.cookies[settings.SESSION_COOKIE_NAME] = str(session.session_key)
    return client


def admin_user(username: str = "admin") -> User:
    return User.objects.create_superuser(
        username, f"{username}@example.org", "x" * 20, role="admin"
    )
