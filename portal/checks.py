"""Configuration errors fail at start-up, not at the first patient's visit."""

import tempfile
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

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


def _broker_scheme() -> str:
    return str(settings.CELERY_BROKER_URL).split(":", 1)[0]


# The settings holding seconds to wait for a peer, by the variable that sets them.
_TIMEOUTS = {
    "PORTAL_DICOM_CONNECT_TIMEOUT": "DICOM_CONNECT_TIMEOUT",
    "PORTAL_DICOM_DIMSE_TIMEOUT": "DICOM_DIMSE_TIMEOUT",
    "PORTAL_DICOM_NETWORK_TIMEOUT": "DICOM_NETWORK_TIMEOUT",
    "PORTAL_DICOM_RETRIEVE_TIMEOUT": "DICOM_RETRIEVE_TIMEOUT",
    "PORTAL_DICOMWEB_TIMEOUT": "DICOMWEB_TIMEOUT",
}


@register()
def check_dicom_settings(app_configs: Any, **kwargs: Any) -> list[Error]:
    errors = []
    if not is_valid_ae_title(settings.DICOM_AE_TITLE):
        errors.append(
            Error(
                f"PORTAL_AE_TITLE {settings.DICOM_AE_TITLE!r} is not a valid AE title.",
                hint="1 to 16 printable ASCII characters, no backslash.",
                id="portal.E002",
            )
        )
    if not 1 <= settings.DICOM_PORT <= 65535:
        errors.append(Error("PORTAL_DICOM_PORT must be 1-65535.", id="portal.E003"))
    if _broker_scheme() not in {"filesystem", "redis", "rediss", "memory"}:
        errors.append(
            Error(
                f"CELERY_BROKER_URL scheme is not supported: {settings.CELERY_BROKER_URL!r}.",
                hint="Use redis://host:port/db in production.",
                id="portal.E004",
            )
        )
    for variable, name in _TIMEOUTS.items():
        value = getattr(settings, name)
        # 0 or less would make pynetdicom and requests wait for ever, or fail at once.
        if not value > 0:
            errors.append(
                Error(
                    f"{variable} is {value:g}: a timeout must be more than 0 seconds.",
                    id="portal.E005",
                )
            )
    if _broker_scheme() == "memory" and not settings.CELERY_TASK_ALWAYS_EAGER:
        errors.append(
            Error(
                "CELERY_BROKER_URL is memory://: a worker, another process, never gets the "
                "jobs queued here, so no study would ever be retrieved.",
                hint="Use redis://host:port/db, or leave CELERY_BROKER_URL unset for the demo.",
                id="portal.E006",
            )
        )
    if not settings.RETRIEVAL_LEASE > 0:
        errors.append(
            Error(
                f"PORTAL_RETRIEVAL_LEASE is {settings.RETRIEVAL_LEASE:g}: a worker's hold on "
                "a running retrieval must last more than 0 seconds.",
                hint="Leave it unset (60 seconds) unless a reason says otherwise.",
                id="portal.E008",
            )
        )
    errors += _check_store()
    return errors


@register()
def check_broker_redelivery(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """Redis hands a message out again once its visibility timeout has passed without an
    acknowledgement: shorter than a retrieval may last, it sends a copy of every long job's
    message to another worker (harmless, the lease refuses it, but a waste and noise)."""
    if _broker_scheme() not in {"redis", "rediss"}:
        return []
    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", None) or {}
    visibility = float(options.get("visibility_timeout", 3600))
    longest = settings.DICOM_RETRIEVE_TIMEOUT + settings.RETRIEVAL_INDEX_WAIT
    if visibility < longest:
        return [
            Warning(
                f"PORTAL_BROKER_VISIBILITY_TIMEOUT ({visibility:g} s) is shorter than a "
                f"retrieval may last ({longest:g} s: PORTAL_DICOM_RETRIEVE_TIMEOUT and "
                "PORTAL_RETRIEVAL_INDEX_WAIT): Redis would hand copies of running jobs to "
                "other workers.",
                hint="Leave it unset: a dead worker's job comes back after its lease "
                "(PORTAL_RETRIEVAL_LEASE), not after this timeout.",
                id="portal.W002",
            )
        ]
    return []


def _check_store() -> list[Error]:
    """The store must take files: otherwise each retrieval and each received instance fails,
    one after the other, long after start-up."""
    store = Path(settings.STORE_DIR)
    try:
        store.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=store):
            pass
    except OSError as exc:
        return [
            Error(
                f"PORTAL_STORE_DIR {str(store)!r} is not a folder the portal can write to "
                f"({exc.strerror or exc}).",
                hint="Create it, owned by the user the portal runs as.",
                id="portal.E007",
            )
        ]
    return []


@register(Tags.security, deploy=True)
def check_broker_for_deployment(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    if _broker_scheme() == "filesystem":
        return [
            Warning(
                "CELERY_BROKER_URL is not set: jobs go through a folder on this machine, the "
                "demo's broker, which serves one machine only and loses the message of a job "
                "whose worker is killed.",
                hint="Set CELERY_BROKER_URL=redis://host:port/db.",
                id="portal.W001",
            )
        ]
    return []
