"""Scheduled work of the accounts app (Celery beat: portal.settings.CELERY_BEAT_SCHEDULE)."""

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from accounts import audit


@shared_task
def audit_prune() -> int:
    """Export the audit events past the retention to a dated file in AUDIT_ARCHIVE_DIR, then
    prune them (the same service as `manage.py audit prune`)."""
    stamp = timezone.now().strftime("%Y%m%dT%H%M%S")
    output = settings.AUDIT_ARCHIVE_DIR / f"audit-{stamp}.ndjson"
    return audit.audit_prune(output=output).events
