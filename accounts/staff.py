"""The rules of a staff session, in one place: who is signed in with a second factor, which
role may do what, and when a sensitive action needs the second factor again.

Every staff view is wrapped in `staff_required(...)`; sensitive actions (a share to a contact
typed by hand, unlocking a share, regenerating a code, staff and node management, emergency
close) also in `recent_second_factor_required`.

Signing in has two stages (accounts.staff_views): the password makes a new session that only
remembers whose password it was (`begin_pending`; nobody is signed in yet), and the second
factor signs the user in with Django's and django-otp's `login` (`complete_login`), each with a
new session key. StaffSessionMiddleware ends a signed-in session past its idle or absolute limit
or whose account got locked (`session_end_reason`).
"""

import time
from collections.abc import Callable
from functools import wraps
from typing import ParamSpec
from urllib.parse import urlencode

import django_otp
from django.conf import settings
from django.contrib import auth
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.crypto import constant_time_compare
from django.utils.http import url_has_allowed_host_and_scheme
from django_otp.models import Device

from accounts.models import User

P = ParamSpec("P")
# HttpResponseBase: a streamed response (the audit log's CSV export) is a view's answer too.
View = Callable[..., HttpResponseBase]

# When this session's user last proved a second factor (seconds since the epoch).
SECOND_FACTOR_AT = "staff.second_factor_at"
# The password step passed, the second factor not yet: whose password, and when. Such a session
# is not signed in (request.user stays anonymous): it reaches the second factor and, for an
# account without one, the enrolment page, and nothing else.
PENDING_USER = "staff.pending_user"
PENDING_AT = "staff.pending_at"
PENDING_NEXT = "staff.pending_next"
# The password's hash as the pending session saw it: a password change ends the session.
PENDING_HASH = "staff.pending_hash"
# Seconds the second factor may follow the password (enrolling an app takes a few minutes).
PENDING_SECONDS = 15 * 60
# When the signed-in session began and was last seen (seconds since the epoch), for
# settings.STAFF_SESSION_MAX and settings.STAFF_SESSION_IDLE.
STARTED = "staff.started"
SEEN = "staff.seen"
# A word for the sign-in page after a redirect ("expired", "signed-out", "locked").
NOTICE = "staff.notice"
# How often the idle clock is written back to the session (seconds).
_SEEN_RESOLUTION = 30
_BACKEND = "django.contrib.auth.backends.ModelBackend"


def role_allows(user: User, *roles: str) -> bool:
    """Administrators may do everything; other members of staff what their role names."""
    return user.role == User.Role.ADMIN or user.role in roles


def is_verified(user: User) -> bool:
    """Whether this request's session passed a second factor (django-otp's OTPMiddleware
    gives the user its `is_verified`)."""
    check = getattr(user, "is_verified", None)
    return bool(check is not None and check())


def second_factor_mark(request: HttpRequest) -> None:
    """Called whenever a second factor verifies (login, re-authentication)."""
    request.session[SECOND_FACTOR_AT] = int(time.time())


def second_factor_is_recent(request: HttpRequest) -> bool:
    verified_at = request.session.get(SECOND_FACTOR_AT)
    if not isinstance(verified_at, int):
        return False
    return time.time() - verified_at <= settings.STAFF_REAUTH_SECONDS


def _login_url(request: HttpRequest) -> str:
    return f"{reverse('staff:login')}?{urlencode({'next': request.get_full_path()})}"


def staff_required(*roles: str) -> Callable[[View], View]:
    """A signed-in member of staff whose session passed a second factor (else the login page)
    and whose role allows the view (else 403). Without roles, any role."""

    def decorator(view: View) -> View:
        @wraps(view)
        def wrapped(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponseBase:
            user = request.user
            if not isinstance(user, User) or not is_verified(user):
                return redirect(_login_url(request))
            if roles and not role_allows(user, *roles):
                raise PermissionDenied
            return view(request, *args, **kwargs)

        return wrapped

    return decorator


def recent_second_factor_required(view: View) -> View:
    """A sensitive action: the second factor again if the last one is older than
    STAFF_REAUTH_SECONDS. A POST is not replayed after re-authentication: the member of staff
    comes back to the page (`next` is the page the form was on) and submits again."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponseBase:
        if second_factor_is_recent(request):
            return view(request, *args, **kwargs)
        back = request.get_full_path()
        if request.method != "GET":
            back = request.POST.get("next") or reverse("staff:home")
        return redirect(f"{reverse('staff:reauth')}?{urlencode({'next': back})}")

    return wrapped


# --- the sign-in stages ------------------------------------------------------------------------


def safe_next(request: HttpRequest, candidate: str | None) -> str | None:
    """`candidate` if it is a path on this site (never another host or scheme), else None."""
    if candidate and url_has_allowed_host_and_scheme(
        candidate, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return candidate
    return None


def home_url(user: User) -> str:
    """Where a member of staff lands after signing in: the audit log for auditors, the search
    page for the others."""
    if user.role == User.Role.AUDITOR:
        return reverse("staff:audit")
    return reverse("staff:home")


def begin_pending(request: HttpRequest, user: User, *, next_url: str | None) -> None:
    """The password was right: a new session (new key, nothing of the old one kept) that
    remembers whose it was, awaiting the second factor."""
    request.session.flush()
    request.session[PENDING_USER] = user.pk
    request.session[PENDING_AT] = int(time.time())
    request.session[PENDING_HASH] = user.get_session_auth_hash()
    if next_url:
        request.session[PENDING_NEXT] = next_url
    request.session.set_expiry(PENDING_SECONDS)


def pending_user(request: HttpRequest) -> User | None:
    """The member of staff whose password this session took, while the second factor may still
    follow; None otherwise."""
    user_id = request.session.get(PENDING_USER)
    started = request.session.get(PENDING_AT)
    if user_id is None or not isinstance(started, int):
        return None
    if not 0 <= time.time() - started <= PENDING_SECONDS:
        return None
    user = User.objects.filter(pk=user_id, is_active=True).first()
    seen = request.session.get(PENDING_HASH)
    if user is None or not isinstance(seen, str):
        return None
    if not constant_time_compare(seen, user.get_session_auth_hash()):
        # The password changed since this session passed it.
        return None
    return user


def complete_login(request: HttpRequest, user: User, device: Device) -> str:
    """The second factor was right: sign the user in (Django's login gives the session a new
    key), mark it verified by `device` (django-otp) and start the staff clocks. Returns where
    to go next."""
    next_url = safe_next(request, request.session.get(PENDING_NEXT))
    auth.login(request, user, backend=_BACKEND)
    django_otp.login(request, device)
    for key in (PENDING_USER, PENDING_AT, PENDING_NEXT, PENDING_HASH):
        request.session.pop(key, None)
    now = int(time.time())
    request.session[STARTED] = now
    request.session[SEEN] = now
    second_factor_mark(request)
    request.session.set_expiry(settings.STAFF_SESSION_IDLE)
    return next_url or home_url(user)


def end(request: HttpRequest, *, notice: str | None = None) -> None:
    """Sign out: the session is deleted server side (its old cookie opens nothing)."""
    auth.logout(request)
    if notice:
        request.session[NOTICE] = notice


def session_end_reason(request: HttpRequest) -> str | None:
    """Why this signed-in staff session must end now ("idle", "max", "locked"), or None (the
    idle clock is then refreshed)."""
    user = getattr(request, "user", None)
    if not isinstance(user, User) or not user.is_authenticated:
        return None
    if user.locked_at is not None:
        return "locked"
    session = request.session
    now = int(time.time())
    # Sessions made outside complete_login (management code, tests) start their clocks now.
    started = session.setdefault(STARTED, now)
    seen = session.setdefault(SEEN, now)
    if now - int(started) > settings.STAFF_SESSION_MAX:
        return "max"
    if now - int(seen) > settings.STAFF_SESSION_IDLE:
        return "idle"
    if now - int(seen) >= _SEEN_RESOLUTION:
        session[SEEN] = now
    return None
