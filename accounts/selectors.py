"""Reads of the accounts domain."""

from datetime import datetime
from typing import Any

from axes.helpers import get_cool_off
from axes.models import AccessAttempt
from django.db.models import QuerySet, Sum
from django.utils import timezone

from accounts.models import AuditEvent, Share


def share_study_ready(share: Share) -> bool:
    """Whether the store holds the share's study (the studies app's `StudyQuerySet.in_store`,
    reached through the lazy reference "studies.Study" since accounts does not import it)."""
    study_model: Any = Share._meta.get_field("study").related_model
    in_store = study_model.objects.in_store()
    return bool(in_store.filter(study_instance_uid=share.study_instance_uid).exists())


def share_status(share: Share) -> str:
    """revoked, expired or used when it can no longer be opened; otherwise pending while its
    study is not (yet) in the store, and active once it is."""
    refusal = share.refusal()
    if refusal is not None:
        return refusal.value
    return "active" if share_study_ready(share) else "pending"


def shares_live(*, now: datetime | None = None) -> QuerySet[Share]:
    """Shares that can still be opened (locked ones too: staff may unlock them); the queryset
    form of `Share.refusal`."""
    return Share.objects.live(now=now)


def share_list(*, live_only: bool = False) -> QuerySet[Share]:
    shares = Share.objects.select_related("created_by").order_by("-created_at")
    if live_only:
        shares = shares.live()
    return shares


def share_events(share: Share) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(share=share).select_related("actor").order_by("-at", "-pk")


def mask_phone(number: str) -> str:
    """+33612345642 → 06 •• •• •• 42 (French numbers as they are written in France);
    other numbers keep their country code and last two digits."""
    if number.startswith("+33") and len(number) == 12:
        national = "0" + number[3:]
        return f"{national[:2]} •• •• •• {national[-2:]}"
    return f"{number[:3]} {'•' * max(2, len(number) - 5)} {number[-2:]}"


def mask_email(address: str) -> str:
    """jane.doe@example.org → j•••@example.org"""
    local, _sep, domain = address.partition("@")
    return f"{local[:1]}•••@{domain}"


def masked_contact(share: Share) -> str:
    if share.channel == Share.Channel.SMS:
        return mask_phone(share.contact)
    return mask_email(share.contact)


def failures_from_ip(ip_address: str | None) -> int:
    """Failed links and codes counted by axes against one address within the cool-off."""
    if not ip_address:
        return 0
    attempts = AccessAttempt.objects.filter(ip_address=ip_address)
    cool_off = get_cool_off()
    if cool_off is not None:
        attempts = attempts.filter(attempt_time__gte=timezone.now() - cool_off)
    return int(attempts.aggregate(total=Sum("failures_since_start"))["total"] or 0)


def otp_pending(share: Share) -> bool:
    """Whether a one-time code was sent and is still valid (the page then asks for it)."""
    device = getattr(share, "otp_device", None)
    return bool(device and device.token and device.valid_until > timezone.now())
