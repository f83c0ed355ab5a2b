"""Configuration errors of recipient access fail at start-up."""

import ipaddress
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from axes.helpers import get_cool_off
from django.conf import settings
from django.core.checks import Error, Tags, register

_CSRF = {"django.middleware.csrf.CsrfViewMiddleware", "accounts.csrf.NoReferrerCsrfViewMiddleware"}


@register(Tags.security, deploy=True)
def check_csrf_middleware(app_configs: Any, **kwargs: Any) -> list[Error]:
    # Stands in for Django's security.W003, which only recognises its own class by name.
    if _CSRF.isdisjoint(settings.MIDDLEWARE):
        return [Error("No CSRF middleware in MIDDLEWARE.", id="accounts.E001")]
    return []


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@register(Tags.security)
def check_sms_settings(app_configs: Any, **kwargs: Any) -> list[Error]:
    if settings.SMS_BACKEND != "http":
        return []
    if not settings.SMS_GATEWAY_URL:
        return [
            Error(
                "PORTAL_SMS_BACKEND is http but PORTAL_SMS_GATEWAY_URL is not set.",
                id="accounts.E002",
            )
        ]
    url = urlsplit(settings.SMS_GATEWAY_URL)
    # One-time codes and the gateway's bearer token cross the network in every request.
    if url.scheme != "https" and not (url.scheme == "http" and _is_loopback(url.hostname or "")):
        return [
            Error(
                "PORTAL_SMS_GATEWAY_URL must be an https:// URL.",
                hint="Plain http:// is only accepted for a gateway on this machine (loopback).",
                id="accounts.E005",
            )
        ]
    return []


@register(Tags.security)
def check_lockout_settings(app_configs: Any, **kwargs: Any) -> list[Error]:
    errors = []
    if settings.AXES_FAILURE_LIMIT > 5:
        errors.append(Error("AXES_FAILURE_LIMIT must be 5 or less.", id="accounts.E003"))
    # Read as axes reads it; None would lock for ever, and the one-time code lock needs an end.
    cool_off = get_cool_off()
    if cool_off is None or cool_off < timedelta(minutes=15):
        errors.append(Error("PORTAL_LOCKOUT_MINUTES must be 15 or more.", id="accounts.E004"))
    return errors


@register(Tags.security)
def check_otp_settings(app_configs: Any, **kwargs: Any) -> list[Error]:
    errors = []
    if not 30 <= settings.OTP_VALIDITY <= 300:
        errors.append(Error("PORTAL_OTP_VALIDITY must be 30 to 300 seconds.", id="accounts.E006"))
    if settings.OTP_RESEND_COOLDOWN < 60:
        errors.append(
            Error("PORTAL_OTP_RESEND_COOLDOWN must be 60 seconds or more.", id="accounts.E007")
        )
    if settings.OTP_THROTTLE_FACTOR < 1:
        # 0 would let parallel or scripted guesses come without any wait between them.
        errors.append(Error("PORTAL_OTP_THROTTLE_FACTOR must be 1 or more.", id="accounts.E008"))
    return errors


@register(Tags.security)
def check_trusted_proxies(app_configs: Any, **kwargs: Any) -> list[Error]:
    errors = []
    for entry in settings.TRUSTED_PROXIES:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            errors.append(
                Error(
                    f"PORTAL_TRUSTED_PROXIES: {entry!r} is not an address or a network.",
                    hint="List the reverse proxies' addresses (never clients'), comma separated.",
                    id="accounts.E009",
                )
            )
    return errors


@register(Tags.security)
def check_viewer_token_lifetime(app_configs: Any, **kwargs: Any) -> list[Error]:
    # Viewer tokens live minutes (an external viewer loads a study in that time); a token
    # outliving the session that minted it by hours would be a second, unaudited session.
    if not 1 <= settings.VIEWER_TOKEN_MINUTES <= 60:
        return [Error("PORTAL_VIEWER_TOKEN_MINUTES must be 1 to 60.", id="accounts.E015")]
    return []


# --- Where one-time codes go, in production --------------------------------------------------
# Backends that keep messages on this machine (printed, written to files, kept in memory) or drop
# them: fine for the demo and the tests, but in production every live one-time code and share
# link would land in a log or a folder instead of reaching its recipient.
_LOCAL_EMAIL_BACKENDS = {
    "django.core.mail.backends.console.EmailBackend",
    "django.core.mail.backends.filebased.EmailBackend",
    "django.core.mail.backends.locmem.EmailBackend",
    "django.core.mail.backends.dummy.EmailBackend",
}
_LOCAL_SMS_BACKENDS = {
    "console",
    "file",
    "locmem",
    "accounts.sms.ConsoleBackend",
    "accounts.sms.FileBackend",
}


@register(Tags.security, deploy=True)
def check_message_backends_for_deployment(app_configs: Any, **kwargs: Any) -> list[Error]:
    if settings.DEBUG:
        return []
    errors = []
    if settings.EMAIL_BACKEND in _LOCAL_EMAIL_BACKENDS:
        errors.append(
            Error(
                f"EMAIL_BACKEND is {settings.EMAIL_BACKEND}: one-time codes and share links "
                "would be printed, written to files or kept in memory on this machine instead "
                "of being mailed.",
                hint="Set EMAIL_BACKEND=django.core.mail.backends.smtp.EmailBackend and "
                "EMAIL_HOST (with EMAIL_HOST_USER and EMAIL_HOST_PASSWORD if the relay asks).",
                id="accounts.E010",
            )
        )
    if settings.SMS_BACKEND in _LOCAL_SMS_BACKENDS:
        errors.append(
            Error(
                f"PORTAL_SMS_BACKEND is {settings.SMS_BACKEND!r}: one-time codes would be "
                "printed or written to files on this machine instead of being texted.",
                hint="Set PORTAL_SMS_BACKEND=http with PORTAL_SMS_GATEWAY_URL and "
                "PORTAL_SMS_GATEWAY_TOKEN, or the dotted path of a gateway class.",
                id="accounts.E011",
            )
        )
    if settings.SMS_BACKEND == "http" and not settings.SMS_GATEWAY_TOKEN:
        errors.append(
            Error(
                "PORTAL_SMS_BACKEND is http but PORTAL_SMS_GATEWAY_TOKEN is not set: the "
                "gateway would be sent an empty bearer token.",
                id="accounts.E012",
            )
        )
    return errors


# --- The admin behind the second factor -------------------------------------------------------
_AUTHENTICATION_MIDDLEWARE = "django.contrib.auth.middleware.AuthenticationMiddleware"
_OTP_MIDDLEWARE = "django_otp.middleware.OTPMiddleware"


@register(Tags.security, Tags.admin)
def check_admin_second_factor(app_configs: Any, **kwargs: Any) -> list[Error]:
    from django.contrib import admin
    from django_otp.admin import OTPAdminSite

    errors = []
    # (Django's lazy default site answers isinstance() for the site it stands for.)
    if not isinstance(admin.site, OTPAdminSite):
        errors.append(
            Error(
                f"The admin site ({admin.site.__class__.__name__}) is not OTP-protected: a "
                "password alone would open it.",
                hint="Install 'accounts.apps.PortalAdminConfig' instead of "
                "'django.contrib.admin' in INSTALLED_APPS.",
                id="accounts.E013",
            )
        )
    middleware = list(settings.MIDDLEWARE)
    if _OTP_MIDDLEWARE not in middleware or (
        _AUTHENTICATION_MIDDLEWARE in middleware
        and middleware.index(_OTP_MIDDLEWARE) < middleware.index(_AUTHENTICATION_MIDDLEWARE)
    ):
        errors.append(
            Error(
                f"{_OTP_MIDDLEWARE} must be in MIDDLEWARE, after {_AUTHENTICATION_MIDDLEWARE}: "
                "without it the admin cannot tell a session verified by a second factor.",
                id="accounts.E014",
            )
        )
    return errors


@register()
def check_audit_retention(app_configs: Any, **kwargs: Any) -> list[Error]:
    # A retention under a day would prune the events of the day itself: what happened today
    # must still be there for whoever looks into it.
    if settings.AUDIT_RETENTION_DAYS < 1:
        return [Error("PORTAL_AUDIT_RETENTION_DAYS must be 1 or more.", id="accounts.E030")]
    return []
