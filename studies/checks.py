"""Configuration errors of the DICOM network stack fail at start-up."""

from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, register

from studies.dimse import tls


@register(Tags.security)
def check_dicom_tls(app_configs: Any, **kwargs: Any) -> list[Error]:
    # Files that cannot be read, a key that is not the certificate's, a CA that is no PEM
    # certificate: found now rather than at the first association, which would fail.
    return [
        Error(
            problem,
            hint="PEM files readable by the portal: the certificate, its private key and the "
            "CA that signs the DICOM nodes' certificates.",
            id=check_id,
        )
        for check_id, problem in tls.configuration_errors()
    ]


@register()
def check_retention_settings(app_configs: Any, **kwargs: Any) -> list[Error]:
    errors = []
    if settings.STORE_MAX_BYTES < 0:
        errors.append(Error("PORTAL_STORE_MAX_GB must be 0 (no cap) or more.", id="studies.E010"))
    if settings.PURGE_INTERVAL_MINUTES < 1:
        errors.append(Error("PORTAL_PURGE_INTERVAL_MINUTES must be 1 or more.", id="studies.E011"))
    return errors
