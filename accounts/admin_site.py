"""The Django admin, behind the second factor and for administrators only.

From the admin one reads every recipient's phone and e-mail, unlocks shares and makes
superusers: a password alone must not open it. django-otp's `OTPAdminSite` asks for the TOTP
code on its login form and lets in only a user whom a device verified in this session
(`OTPMiddleware` says so); on top of that, only the `admin` role. It is Django's default site
(`PortalAdminConfig.default_site`), so every `admin.register` lands here, and the system check
`accounts.E013` refuses any other.
"""

from django.http import HttpRequest
from django_otp.admin import OTPAdminSite

from accounts.models import User


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
