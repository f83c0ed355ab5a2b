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
        return [Error("PORTAL_VIEWER_TOKEN_MINUTES must be 1 to 60.", id="accounts.E010")]
    return []
