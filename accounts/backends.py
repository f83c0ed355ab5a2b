"""Recipient authentication as a Django authentication backend, so that django-axes sees every
failed link and code (it listens to `user_login_failed`) and refuses locked-out ones before
they are checked (axes' own backend comes first in AUTHENTICATION_BACKENDS).

Views call `django.contrib.auth.authenticate(request, link_token=…, lockout_scope=…)` or
`authenticate(request, access_code_secret=…, lockout_scope=…)`. The secret credentials are named
so that Django masks them before the failure signal (its `_clean_credentials` masks names that
contain api, token, key, secret, password or signature); `lockout_scope` is the non-secret
value axes counts per share (accounts.credentials.lockout_key_for_*), named so that it is not
masked.
"""

from typing import Any

from django.http import HttpRequest

from accounts import selectors
from accounts.models import Share


class ShareBackend:
    def authenticate(
        self,
        request: HttpRequest | None,
        link_token: str | None = None,
        access_code_secret: str | None = None,
        lockout_scope: str | None = None,
        **kwargs: Any,
    ) -> Share | None:
        if request is None or (link_token is None and access_code_secret is None):
            return None
        if link_token is not None:
            check = selectors.share_check_link(link_token)
        else:
            check = selectors.share_check_code(access_code_secret or "")
        # The view reads the outcome for its audit event; the answer never depends on it.
        request.share_check = check  # type: ignore[attr-defined]
        return check.share

    def get_user(self, user_id: Any) -> None:
        # Recipients are never logged in as users: their session holds a share binding.
        return None


def axes_username(request: HttpRequest, credentials: dict[str, Any] | None) -> str | None:
    """AXES_USERNAME_CALLABLE: a share-derived key for recipients, the username for staff."""
    credentials = credentials or {}
    key = credentials.get("lockout_scope")
    if key:
        return str(key)
    username = credentials.get("username")
    if username is None and request is not None:
        username = request.POST.get("username")
    return str(username) if username is not None else None
