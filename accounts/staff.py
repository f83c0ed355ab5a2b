"""The rules of a staff session, in one place: who is signed in with a second factor, which
role may do what, and when a sensitive action needs the second factor again.

Every staff view is wrapped in `staff_required(...)`; sensitive actions (a share to a contact
typed by hand, unlocking a share, regenerating a code, staff and node management, emergency
close) also in `recent_second_factor_required`.
"""

import time
from collections.abc import Callable
from functools import wraps
from typing import ParamSpec
from urllib.parse import urlencode

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.shortcuts import redirect
from django.urls import reverse

from accounts.models import User

P = ParamSpec("P")
# HttpResponseBase: a streamed response (the audit log's CSV export) is a view's answer too.
View = Callable[..., HttpResponseBase]

# When this session's user last proved a second factor (seconds since the epoch).
SECOND_FACTOR_AT = "staff.second_factor_at"


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
