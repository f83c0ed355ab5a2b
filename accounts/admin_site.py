"""The Django admin, behind the staff sign-in and for administrators only.

From the admin one reads every recipient's phone and e-mail, unlocks shares and makes
superusers: a password alone must not open it. django-otp's `OTPAdminSite` lets in only a user
whom a device verified in this session (`OTPMiddleware` says so); on top of that, only the
`admin` role. Its own login form is not used: /admin/login/ sends to the staff sign-in
(password, then a second factor), and a signed-in member of staff of another role gets 403.
Every change (a POST) also needs a recent second factor (accounts.staff): staff accounts, PACS
nodes, the emergency close of recipient access. It is Django's default site
(`PortalAdminConfig.default_site`), so every `admin.register` lands here, and the system check
`accounts.E013` refuses any other.
"""

from collections.abc import Callable
from functools import update_wrapper
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth import REDIRECT_FIELD_NAME
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django_otp.admin import OTPAdminSite

from accounts import services, staff
from accounts.models import AuditEvent, User


class PortalAdminSite(OTPAdminSite):
    def __init__(self, name: str = "admin") -> None:
        # "admin", not django-otp's "otpadmin": the URL names stay `admin:…`.
        super().__init__(name)

    def has_permission(self, request: HttpRequest) -> bool:
        user = request.user
        return (
            super().has_permission(request)  # active, is_staff, verified by an OTP device
            and isinstance(user, User)
            and user.role == User.Role.ADMIN
        )

    def _refuse_other_staff(self, request: HttpRequest) -> None:
        # A member of staff signed in with a second factor but not an administrator: no
        # sign-in page would help (it would send them back here).
        user = request.user
        if isinstance(user, User) and staff.is_verified(user) and not self.has_permission(request):
            raise PermissionDenied

    def login(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        self._refuse_other_staff(request)
        next_url = staff.safe_next(request, request.GET.get(REDIRECT_FIELD_NAME))
        target = next_url or reverse("admin:index", current_app=self.name)
        if self.has_permission(request):
            return redirect(target)
        return redirect(f"{reverse('staff:login')}?{urlencode({'next': target})}")

    def logout(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        if request.method != "POST":
            return redirect("admin:index")
        user = request.user
        if isinstance(user, User):
            services.audit(AuditEvent.Action.LOGOUT, request=request, actor=user)
        staff.end(request, notice="signed-out")
        return redirect("staff:login")

    def admin_view(self, view: Callable[..., Any], cacheable: bool = False) -> Any:
        inner = super().admin_view(view, cacheable)

        def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            self._refuse_other_staff(request)
            if (
                request.method == "POST"
                and self.has_permission(request)
                and not staff.second_factor_is_recent(request)
                and request.path != reverse("admin:logout", current_app=self.name)
            ):
                # Nothing is changed: the administrator confirms and submits again.
                back = urlencode({"next": request.get_full_path()})
                return redirect(f"{reverse('staff:reauth')}?{back}")
            return inner(request, *args, **kwargs)

        return update_wrapper(guarded, inner)
