"""Configuration errors fail at start-up, not at the first patient's visit."""

from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, register

from studies.dicom import is_valid_ae_title


@register(Tags.security, deploy=True)
def check_secret_key(app_configs: Any, **kwargs: Any) -> list[Error]:
    if settings.SECRET_KEY == settings.INSECURE_DEMO_KEY:
        return [
            Error(
                "PORTAL_SECRET_KEY is not set: the demo key signs share links.",
                hint="Set PORTAL_SECRET_KEY to 50 or more random characters.",
                id="portal.E001",
            )
        ]
    return []


@register()
def check_dicom_settings(app_configs: Any, **kwargs: Any) -> list[Error]:
    errors = []
    if not is_valid_ae_title(settings.DICOM_AE_TITLE):
        errors.append(
            Error(
                f"PORTAL_AE_TITLE {settings.DICOM_AE_TITLE!r} is not a valid AE title.",
                hint="1 to 16 characters, no backslash or control characters.",
                id="portal.E002",
            )
        )
    if not 1 <= settings.DICOM_PORT <= 65535:
        errors.append(Error("PORTAL_DICOM_PORT must be 1-65535.", id="portal.E003"))
    if settings.CELERY_BROKER_URL.split(":", 1)[0] not in {
        "filesystem",
        "redis",
        "rediss",
        "memory",
    }:
        errors.append(
            Error(
                f"CELERY_BROKER_URL scheme is not supported: {settings.CELERY_BROKER_URL!r}.",
                hint="Use redis://host:port/db in production.",
                id="portal.E004",
            )
        )
    return errors
