"""Configuration errors of recipient access fail at start-up."""

from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, register

_CSRF = {"django.middleware.csrf.CsrfViewMiddleware", "accounts.csrf.NoReferrerCsrfViewMiddleware"}


@register(Tags.security, deploy=True)
def check_csrf_middleware(app_configs: Any, **kwargs: Any) -> list[Error]:
    # Stands in for Django's security.W003, which only recognises its own class by name.
    if _CSRF.isdisjoint(settings.MIDDLEWARE):
        return [Error("No CSRF middleware in MIDDLEWARE.", id="accounts.E001")]
    return []


@register()
def check_sms_settings(app_configs: Any, **kwargs: Any) -> list[Error]:
    if settings.SMS_BACKEND == "http" and not settings.SMS_GATEWAY_URL:
        return [
            Error(
                "PORTAL_SMS_BACKEND is http but PORTAL_SMS_GATEWAY_URL is not set.",
                id="accounts.E002",
            )
        ]
    return []


@register(Tags.security)
def check_lockout_settings(app_configs: Any, **kwargs: Any) -> list[Error]:
    errors = []
    if settings.AXES_FAILURE_LIMIT > 5:
        errors.append(Error("AXES_FAILURE_LIMIT must be 5 or less.", id="accounts.E003"))
    if settings.AXES_COOLOFF_TIME.total_seconds() < 15 * 60:
        errors.append(Error("PORTAL_LOCKOUT_MINUTES must be 15 or more.", id="accounts.E004"))
    return errors
