"""Reads of the accounts domain."""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from axes.helpers import get_cool_off
from axes.models import AccessAttempt
from django.conf import settings
from django.db.models import Q, QuerySet, Sum
from django.http import HttpRequest
from django.utils import timezone
from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _

from accounts import credentials
from accounts.models import (
    AuditEvent,
    PhysicianPasskey,
    RecipientAccess,
    Refusal,
    Share,
    SharedStudy,
)


def share_study_ready(share: Share) -> bool:
    """Whether the store holds every study of the share (the studies app's
    `StudyQuerySet.in_store`, reached through the lazy reference "studies.Study" since accounts
    does not import it)."""
    study_model: Any = Share._meta.get_field("study").related_model
    uids = share.study_uids
    in_store = study_model.objects.in_store().filter(study_instance_uid__in=uids)
    return bool(in_store.count() == len(uids))


def shared_study_uids_live(*, now: datetime | None = None) -> QuerySet[SharedStudy, Any]:
    """The studies that live shares grant, as a subquery of Study Instance UIDs."""
    live = Share.objects.live(now=now)
    return SharedStudy.objects.filter(share__in=live).values("study_instance_uid")


def share_status(share: Share) -> str:
    """revoked, expired or used when it can no longer be opened; otherwise pending while its
    study is not (yet) in the store, and active once it is."""
    refusal = share.refusal()
    if refusal is not None:
        return refusal.value
    return "active" if share_study_ready(share) else "pending"


def share_list(*, live_only: bool = False) -> QuerySet[Share]:
    shares = Share.objects.select_related("created_by").order_by("-created_at")
    if live_only:
        shares = shares.live()
    return shares


def share_lock_is_final(share: Share) -> bool:
    """Too many wrong one-time codes over the share's life: only staff unlock it."""
    return share.otp_failures >= settings.OTP_LIFETIME_MAX_FAILURES


def share_is_locked(share: Share) -> bool:
    if share_lock_is_final(share):
        return True
    return share.locked_until is not None and share.locked_until > timezone.now()


def share_locked_q(*, now: datetime | None = None) -> Q:
    """`share_is_locked` as a query condition, for lists of shares: the final lock (too many
    wrong one-time codes over the share's life) or a lock whose cool-off runs."""
    now = now or timezone.now()
    return Q(otp_failures__gte=settings.OTP_LIFETIME_MAX_FAILURES) | Q(locked_until__gt=now)


def share_extend_limit(share: Share) -> datetime:
    """The latest a share may expire: settings.SHARE_MAX_DAYS from its creation, however
    often it is extended (the ceiling of a share's life, as `share_create` applies it)."""
    return share.created_at + timedelta(days=settings.SHARE_MAX_DAYS)


def share_open_to_verified(share: Share) -> bool:
    """Whether a recipient who completed the second factor may still see the share: it is live
    and not locked. A single-use share is used up by the one-time code of the session that then
    keeps it open until that session ends (and no other session gets that far), so "used" does
    not close it to that session, nor to the viewer tokens that session mints."""
    if share_is_locked(share):
        return False
    refusal = share.refusal()
    return refusal is None or refusal == Refusal.USED


@dataclass(frozen=True)
class ViewerAccess:
    """A viewer token's share, still open, and the one study the token was minted for."""

    share: Share
    study_instance_uid: str


def share_for_viewer_token(token: str) -> ViewerAccess | None:
    """The share and study a bearer token opens, or None: a bad signature, a token past
    settings.VIEWER_TOKEN_MINUTES, a share revoked, expired or locked since it was minted, or a
    token minted before the last emergency close (which ends every recipient session, and so
    what they minted). Checked at every request: nothing about the token is stored."""
    grant = credentials.unsign_viewer_token(token)
    if grant is None:
        return None
    last_closed = recipient_access().last_closed_at
    if last_closed is not None and grant.issued_at <= last_closed.timestamp():
        return None
    share = Share.objects.filter(pk=grant.share_id).first()
    if share is None or not share_open_to_verified(share):
        return None
    return ViewerAccess(share=share, study_instance_uid=grant.study_instance_uid)


@dataclass(frozen=True)
class AccessCheck:
    """The outcome of a link or code: `share` when it opens one; `matched` is the share the
    credential pointed at even when refused (for the audit log only, never for the answer)."""

    share: Share | None
    matched: Share | None
    reason: Refusal | None


def share_check_link(signed: str) -> AccessCheck:
    token = credentials.unsign_link_token(signed)
    if token is None:
        # Forged or older than any share can live: refused before any lookup.
        return AccessCheck(None, None, Refusal.UNKNOWN)
    share = Share.objects.filter(token_hash=credentials.hash_link_token(token)).first()
    if share is None:
        return AccessCheck(None, None, Refusal.UNKNOWN)
    reason = share.refusal()
    return AccessCheck(None if reason else share, share, reason)


def share_check_code(typed: str) -> AccessCheck:
    """The same work whatever the code: one lookup by prefix and one hash verification, so an
    unknown code takes as long as an expired, revoked or right one."""
    code = credentials.normalize_code(typed)
    prefix, secret = credentials.split_code(code or "0" * credentials.CODE_LENGTH)
    share = Share.objects.filter(code_prefix=prefix).first()
    matches = credentials.code_secret_matches(secret, share.code_hash if share else None)
    if code is None or share is None or not matches:
        return AccessCheck(None, share if code else None, Refusal.UNKNOWN)
    reason = share.refusal()
    return AccessCheck(None if reason else share, share, reason)


def audit_events(
    *,
    share_id: int | None = None,
    actor_username: str = "",
    action: str = "",
    since: datetime | None = None,
    until: datetime | None = None,
    study_uids: Iterable[str] | None = None,
) -> QuerySet[AuditEvent]:
    """The audit log as auditors filter it, newest first. `study_uids` (a patient's studies,
    which the studies app finds) keeps the events of shares of those studies and of what
    was done to the studies themselves (a copy purged)."""
    events = AuditEvent.objects.select_related("actor", "share")
    if share_id is not None:
        events = events.filter(share_id=share_id)
    if actor_username:
        events = events.filter(actor__username=actor_username)
    if action:
        events = events.filter(action=action)
    if since is not None:
        events = events.filter(at__gte=since)
    if until is not None:
        events = events.filter(at__lt=until)
    if study_uids is not None:
        uids = list(study_uids)
        of_shares = SharedStudy.objects.filter(study_instance_uid__in=uids).values("share_id")
        events = events.filter(Q(share_id__in=of_shares) | Q(detail__study__in=uids))
    return events.order_by("-at", "-pk")


def share_events(share: Share) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(share=share).select_related("actor").order_by("-at", "-pk")


# Failed attempts anybody may make on a share: whoever typed its public prefix (a stranger's
# typo, or the holder of an older share that had the same prefix), whoever holds an old link.
# Their recipient learns that it happened and when, never from which address or browser: that
# is a stranger's to keep. Staff (the admin, the audit export) still see everything.
_ATTEMPTS_BY_ANYBODY: dict[str, str | Promise] = {
    AuditEvent.Action.LINK_FAILED: _("Someone tried a link that does not work"),
    AuditEvent.Action.CODE_FAILED: _("Someone typed a wrong code"),
    AuditEvent.Action.OTP_FAILED: _("Someone typed a wrong one-time code"),
    AuditEvent.Action.PASSKEY_FAILED: _("Someone tried a passkey that was refused"),
    AuditEvent.Action.LOCKOUT: _("Locked after too many attempts"),
}


@dataclass(frozen=True)
class HistoryEntry:
    """One line of a share's access history as its recipient sees it."""

    at: datetime
    what: str
    by_staff: bool
    # None (and "") for staff actions and for failed attempts by anybody.
    ip_address: str | None
    user_agent: str


def recipient_history(share: Share, *, limit: int = 500) -> list[HistoryEntry]:
    entries = []
    for event in share_events(share)[:limit]:
        anybody = _ATTEMPTS_BY_ANYBODY.get(event.action)
        # Where hospital staff worked from is theirs, not the recipient's, to know.
        hidden = anybody is not None or event.actor is not None
        entries.append(
            HistoryEntry(
                at=event.at,
                what=str(anybody or event.get_action_display()),
                by_staff=event.actor is not None,
                ip_address=None if hidden else event.ip_address,
                user_agent="" if hidden else event.user_agent,
            )
        )
    return entries


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


def _failures_within_cool_off(attempts: QuerySet[AccessAttempt]) -> int:
    cool_off = get_cool_off()
    if cool_off is not None:
        attempts = attempts.filter(attempt_time__gte=timezone.now() - cool_off)
    return int(attempts.aggregate(total=Sum("failures_since_start"))["total"] or 0)


def failures_from_ip(ip_address: str | None) -> int:
    """Failed links and codes counted by axes against one address within the cool-off."""
    if not ip_address:
        return 0
    return _failures_within_cool_off(AccessAttempt.objects.filter(ip_address=ip_address))


def failures_for_scope(scope: str) -> int:
    """Failed links and codes counted by axes against one share (its lockout key,
    accounts.credentials.lockout_key_*) within the cool-off."""
    return _failures_within_cool_off(AccessAttempt.objects.filter(username=scope))


def otp_pending(share: Share) -> bool:
    """Whether a one-time code was sent and is still valid (the page then asks for it)."""
    device = getattr(share, "otp_device", None)
    return bool(device and device.token and device.valid_until > timezone.now())


# --- emergency close of recipient access -----------------------------------------------------


@dataclass(frozen=True)
class Closure:
    """Recipient access is closed: since when, and what recipients are told."""

    since: datetime
    message: str


@dataclass(frozen=True)
class RecipientAccessState:
    closure: Closure | None
    last_closed_at: datetime | None


_STATE_ATTRIBUTE = "_recipient_access_state"


def recipient_access(request: HttpRequest | None = None) -> RecipientAccessState:
    """The state of recipient access, read from the database (one primary-key lookup) so that
    a close made on any machine is seen by the next request on every other; remembered on
    `request` for the rest of that request, never longer."""
    if request is not None and hasattr(request, _STATE_ATTRIBUTE):
        cached: RecipientAccessState = getattr(request, _STATE_ATTRIBUTE)
        return cached
    row = (
        RecipientAccess.objects.filter(pk=RecipientAccess.SINGLETON)
        .values_list("closed_at", "message", "last_closed_at")
        .first()
    )
    if row is None:
        state = RecipientAccessState(closure=None, last_closed_at=None)
    else:
        closed_at, message, last_closed_at = row
        closure = Closure(since=closed_at, message=message) if closed_at is not None else None
        state = RecipientAccessState(closure=closure, last_closed_at=last_closed_at)
    if request is not None:
        setattr(request, _STATE_ATTRIBUTE, state)
    return state


def recipients_closed(request: HttpRequest | None = None) -> Closure | None:
    """The closure in force, or None while recipients may come in."""
    return recipient_access(request).closure


# --- physicians' passkeys ---------------------------------------------------------------------


def passkey_list(*, email: str = "") -> QuerySet[PhysicianPasskey]:
    passkeys = PhysicianPasskey.objects.order_by("email", "created_at")
    return passkeys.filter(email__iexact=email) if email else passkeys


def passkey_is_usable(passkey: PhysicianPasskey) -> bool:
    return PhysicianPasskey.objects.usable().filter(pk=passkey.pk).exists()
