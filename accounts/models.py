from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models
from django.db.models import Case, Q, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from django_otp.models import (
    CooldownMixin,
    Device,
    DeviceManager,
    SideChannelDevice,
    ThrottlingMixin,
    TimestampMixin,
)

from accounts import credentials


class User(AbstractUser):  # type: ignore[django-manager-missing]  # django-otp is untyped
    """A member of hospital staff. Recipients (patients, physicians) are not users."""

    class Role(models.TextChoices):
        SHARER = "sharer", _("Sharer")
        AUDITOR = "auditor", _("Auditor")
        ADMIN = "admin", _("Administrator")

    role = models.CharField(_("role"), max_length=16, choices=Role.choices, default=Role.SHARER)
    # Wrong second factors (codes, recovery codes, passkeys) since the last right one: past
    # settings.STAFF_SECOND_FACTOR_MAX_FAILURES the account is locked (`locked_at`) until an
    # administrator unlocks it (accounts.staff_auth.staff_unlock). A password cool-off does not
    # lift it: whoever typed them had the password.
    second_factor_failures = models.PositiveIntegerField(_("wrong second factors"), default=0)
    locked_at = models.DateTimeField(_("locked since"), null=True, blank=True)


class Refusal(StrEnum):
    """Why a share can no longer be opened."""

    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REVOKED = "revoked"
    USED = "used"


class ShareQuerySet(models.QuerySet["Share"]):
    """The one definition of a live share, in its queryset form (`Share.refusal` is the same
    rule for one row): not revoked, not expired, not a single-use share already used. A locked
    share is still live: the lock is lifted by its cool-off or by staff."""

    def live(self, *, now: datetime | None = None) -> "ShareQuerySet":
        return self.filter(_live_q(now or timezone.now()))

    def dead(self, *, now: datetime | None = None) -> "ShareQuerySet":
        return self.exclude(_live_q(now or timezone.now()))

    def with_refusal(self, *, now: datetime | None = None) -> "ShareQuerySet":
        """Each share with `refusal_reason`: the value of `Share.refusal()` computed by the database
        (NULL while live), for lists filtered and counted by status. Its conditions are those
        of `_live_q`, taken in the order of `Share.refusal`."""
        now = now or timezone.now()
        return self.annotate(
            refusal_reason=Case(
                When(revoked_at__isnull=False, then=Value(Refusal.REVOKED.value)),
                When(expires_at__lte=now, then=Value(Refusal.EXPIRED.value)),
                When(single_use=True, used_at__isnull=False, then=Value(Refusal.USED.value)),
                default=Value(None),
                output_field=models.CharField(),
            )
        )


def _live_q(now: datetime) -> Q:
    return Q(revoked_at__isnull=True, expires_at__gt=now) & ~Q(
        single_use=True, used_at__isnull=False
    )


class Share(models.Model):
    """One recipient's access to one study (optionally some of its series).

    The link token and the access code are never stored, only their hashes
    (see accounts.credentials). The study may not be in the store yet: `study` is filled when
    it is, and until then the share is pending (accounts.selectors.share_status).
    """

    class Recipient(models.TextChoices):
        PATIENT = "patient", _("Patient")
        PHYSICIAN = "physician", _("Referring physician")

    class Channel(models.TextChoices):
        SMS = "sms", _("Text message")
        EMAIL = "email", _("Email")

    study = models.ForeignKey(
        "studies.Study",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="shares",
        verbose_name=_("study"),
    )
    study_instance_uid = models.CharField(_("Study Instance UID"), max_length=64, db_index=True)
    # Empty: the whole study.
    series_instance_uids = models.JSONField(_("series"), default=list, blank=True)
    recipient = models.CharField(_("recipient"), max_length=16, choices=Recipient.choices)
    channel = models.CharField(_("one-time code sent by"), max_length=8, choices=Channel.choices)
    # E.164 phone number or email address, as the hospital recorded it.
    contact = models.CharField(_("contact"), max_length=254)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    # The public first group of the access code: 20 bits, so a share that can no longer be
    # opened gives it back (revoked, expired: accounts.services.share_release_code) for a
    # new share to draw, and its old code then matches nothing. NULL, not "": unique allows
    # any number of NULLs.
    code_prefix = models.CharField(  # noqa: DJ001
        max_length=4, unique=True, null=True, editable=False
    )
    code_hash = models.CharField(max_length=128, editable=False)
    allow_download = models.BooleanField(_("download allowed"), default=True)
    single_use = models.BooleanField(_("single use"), default=False)
    created_at = models.DateTimeField(_("created"), default=timezone.now)
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    expires_at = models.DateTimeField(_("expires"))
    revoked_at = models.DateTimeField(_("revoked"), null=True, blank=True)
    revoked_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    used_at = models.DateTimeField(_("used"), null=True, blank=True)
    # Set when too many wrong one-time codes were typed; staff clear it.
    locked_until = models.DateTimeField(_("locked until"), null=True, blank=True)
    # Wrong one-time codes over the share's whole life: neither a cool-off nor a right code
    # resets it, only staff do (accounts.services.share_unlock). Past
    # settings.OTP_LIFETIME_MAX_FAILURES the share stays locked until they do.
    otp_failures = models.PositiveIntegerField(_("wrong one-time codes"), default=0)
    # What staff tell the recipient (shown on the handout and the viewer), and the language
    # of the handout and of the messages the recipient gets.
    note = models.TextField(_("note for the recipient"), max_length=500, blank=True)
    language = models.CharField(
        _("language"), max_length=8, choices=settings.LANGUAGES, default="en"
    )

    objects = ShareQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = _("share")
        verbose_name_plural = _("shares")

    def __str__(self) -> str:
        return f"share {self.pk} {self.study_instance_uid}"

    @property
    def study_uids(self) -> list[str]:
        """Every study the share grants: the current one first, then the priors staff chose to
        compare it with (all of the same patient)."""
        uids = [s.study_instance_uid for s in self.shared_studies.all()]
        return uids or [self.study_instance_uid]

    def refusal(self, *, now: datetime | None = None) -> Refusal | None:
        """Why this share cannot be opened any more, or None while it is live (the row form of
        `ShareQuerySet.live`). Locks are separate: a locked share answers with the lockout
        page, not as if it did not exist."""
        now = now or timezone.now()
        if self.revoked_at is not None:
            return Refusal.REVOKED
        if self.expires_at <= now:
            return Refusal.EXPIRED
        if self.single_use and self.used_at is not None:
            return Refusal.USED
        return None


class SharedStudy(models.Model):
    """One study a share grants. A share holds the current study (`Share.study_instance_uid`,
    first here too) and may hold priors of the same patient for comparison."""

    share = models.ForeignKey(Share, on_delete=models.CASCADE, related_name="shared_studies")
    study_instance_uid = models.CharField(_("Study Instance UID"), max_length=64, db_index=True)

    class Meta:
        ordering = ["pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["share", "study_instance_uid"], name="one_row_per_shared_study"
            )
        ]
        verbose_name = _("shared study")
        verbose_name_plural = _("shared studies")

    def __str__(self) -> str:
        return self.study_instance_uid


class ShareOTPDeviceManager(DeviceManager):
    """No staff user ever holds a share's device: django-otp asks every device model for a
    user's devices (the admin's login form does, for its second factor), and this one has no
    user column to filter on."""

    def devices_for_user(self, user: object, confirmed: bool | None = None) -> models.QuerySet:
        return self.none()


class ShareOTPDevice(TimestampMixin, CooldownMixin, ThrottlingMixin, SideChannelDevice):
    """The one-time code channel of one share's recipient (its phone or mailbox).

    django-otp does the token (6 digits, expiry, cleared once used), the resend cooldown and the
    exponential throttling; the hard limit of wrong codes per share and the lock are in
    accounts.services. Recipients are not users, so the device belongs to the share.
    """

    user = None
    share = models.OneToOneField(Share, on_delete=models.CASCADE, related_name="otp_device")

    objects = ShareOTPDeviceManager()

    class Meta:
        verbose_name = _("one-time code device")

    def __str__(self) -> str:
        return f"one-time code device of share {self.share_id}"

    def get_cooldown_duration(self) -> int:
        return int(settings.OTP_RESEND_COOLDOWN)

    def get_throttle_factor(self) -> int:
        return int(settings.OTP_THROTTLE_FACTOR)

    def verify_token(self, token: str) -> bool:
        # The pattern of django-otp's EmailDevice: throttle, then the base class check
        # (content and expiry; clears the token on success so it cannot be used twice).
        allowed, _data = self.verify_is_allowed()
        if not allowed:
            return False
        if super().verify_token(token):
            self.throttle_reset(commit=False)
            self.set_last_used_timestamp(commit=False)
            self.save()
            return True
        self.throttle_increment()
        return False


class PhysicianPasskeyQuerySet(models.QuerySet["PhysicianPasskey"]):
    """The one definition of a passkey that still signs in: used (or, never used, enrolled)
    within PORTAL_PASSKEY_IDLE_DAYS. One left unused longer is presumed lost or forgotten, and
    a lost authenticator must not open the physician's shares for ever."""

    def usable(self, *, now: datetime | None = None) -> "PhysicianPasskeyQuerySet":
        return self.alias(active=Coalesce("last_used_at", "created_at")).filter(
            active__gt=_passkey_cutoff(now)
        )

    def idle(self, *, now: datetime | None = None) -> "PhysicianPasskeyQuerySet":
        return self.alias(active=Coalesce("last_used_at", "created_at")).filter(
            active__lte=_passkey_cutoff(now)
        )


def _passkey_cutoff(now: datetime | None) -> datetime:
    return (now or timezone.now()) - timedelta(days=settings.PASSKEY_IDLE_DAYS)


class PhysicianPasskey(models.Model):
    """A WebAuthn credential a referring physician enrolled after proving their mailbox, so
    that later shares sent to the same address need no emailed code."""

    email = models.EmailField(_("email"), db_index=True)
    # Random, per physician address: what the authenticator stores as the user handle.
    user_handle = models.BinaryField(max_length=64)
    credential_id = models.BinaryField(unique=True)
    public_key = models.BinaryField()
    sign_count = models.PositiveBigIntegerField(default=0)
    enrolled_with = models.ForeignKey(Share, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)

    objects = PhysicianPasskeyQuerySet.as_manager()

    class Meta:
        verbose_name = _("physician passkey")

    def __str__(self) -> str:
        return f"passkey of {self.email}"


class AuditTrailImmutable(Exception):
    """An audit event was to be changed or deleted: the trail is append-only (only
    accounts.audit.audit_prune removes events, the oldest, past the retention)."""


class AuditEventQuerySet(models.QuerySet["AuditEvent"]):
    """Bulk writes would bypass the chain (accounts.audit.event_append) or break it."""

    def update(self, **kwargs: Any) -> int:
        raise AuditTrailImmutable("audit events cannot be changed")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise AuditTrailImmutable("audit events cannot be deleted")

    def bulk_create(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> list["AuditEvent"]:
        raise AuditTrailImmutable("audit events are appended one by one to the chain")

    def bulk_update(self, *args: Any, **kwargs: Any) -> int:
        raise AuditTrailImmutable("audit events cannot be changed")


class AuditEvent(models.Model):
    """Append-only and hash-chained: created by accounts.audit.event_append (through
    accounts.services.audit) and nothing else; the admin shows it read-only. Each event's
    `digest` covers its fields and the digest of the event before it (`prev_digest`), so that
    a changed, inserted or deleted row breaks the chain (`manage.py audit verify`). Never holds
    a token, a code or a one-time code."""

    class Action(models.TextChoices):
        SHARE_CREATED = "share_created", _("Share created")
        SHARE_REVOKED = "share_revoked", _("Share revoked")
        SHARE_UNLOCKED = "share_unlocked", _("Share unlocked")
        LINK_OPENED = "link_opened", _("Link opened")
        LINK_FAILED = "link_failed", _("Invalid link")
        CODE_OK = "code_ok", _("Access code accepted")
        CODE_FAILED = "code_failed", _("Wrong access code")
        OTP_SENT = "otp_sent", _("One-time code sent")
        OTP_SEND_FAILED = "otp_send_failed", _("One-time code could not be sent")
        OTP_SEND_LIMIT = "otp_send_limit", _("Too many one-time codes asked for")
        OTP_OK = "otp_ok", _("One-time code accepted")
        OTP_FAILED = "otp_failed", _("Wrong one-time code")
        PASSKEY_ENROLLED = "passkey_enrolled", _("Passkey enrolled")
        PASSKEY_OK = "passkey_ok", _("Signed in with a passkey")
        PASSKEY_FAILED = "passkey_failed", _("Passkey refused")
        LOCKOUT = "lockout", _("Locked after too many attempts")
        LOGOUT = "logout", _("Signed out")
        SESSION_EXPIRED = "session_expired", _("Session expired")
        VIEW = "view", _("Study viewed")
        DOWNLOAD = "download", _("Study downloaded")
        VIEWER_TOKEN = "viewer_token", _("Viewer link issued")
        RECIPIENTS_CLOSED = "recipients_closed", _("Recipient access closed")
        RECIPIENTS_OPENED = "recipients_opened", _("Recipient access opened")
        PASSKEY_DELETED = "passkey_deleted", _("Passkey deleted")
        STUDY_OVERWRITE_REFUSED = (
            "study_overwrite_refused",
            _("Changed instance of a shared study refused"),
        )
        FAILURE_ALERT = "failure_alert", _("Many failed codes across all shares")
        SHARE_EXTENDED = "share_extended", _("Share extended")
        PATIENT_SHARES_REVOKED = "patient_shares_revoked", _("Every share of a patient revoked")
        PACS_NODE_CREATED = "pacs_node_created", _("PACS node added")
        PACS_NODE_UPDATED = "pacs_node_updated", _("PACS node changed")
        PACS_NODE_DELETED = "pacs_node_deleted", _("PACS node removed")
        PACS_NODE_ECHO = "pacs_node_echo", _("PACS node checked (C-ECHO)")
        PACS_NODE_WAY_BACK = "pacs_node_way_back", _("PACS node's way back checked")
        STAFF_LOGIN = "staff_login", _("Staff member signed in")
        STAFF_LOGIN_FAILED = "staff_login_failed", _("Staff sign-in refused")
        STAFF_SECOND_FACTOR_FAILED = "staff_second_factor_failed", _("Wrong second factor")
        STAFF_LOCKED = "staff_locked", _("Staff account locked")
        STAFF_UNLOCKED = "staff_unlocked", _("Staff account unlocked")
        STAFF_REAUTH = "staff_reauth", _("Second factor confirmed again")
        STAFF_DEVICE_ADDED = "staff_device_added", _("Second factor added")
        STAFF_DEVICE_REMOVED = "staff_device_removed", _("Second factor removed")
        STAFF_RECOVERY_CODES = "staff_recovery_codes", _("Recovery codes made")
        STAFF_RECOVERY_CODE_USED = "staff_recovery_code_used", _("Recovery code used")
        STAFF_PASSWORD_CHANGED = "staff_password_changed", _("Staff password changed")
        STUDY_SEARCH = "study_search", _("Studies searched")
        SHARE_REGENERATED = "share_regenerated", _("Link and code replaced")
        SHARE_LINK_SENT = "share_link_sent", _("Link sent to the recipient")
        SHARE_LINK_SEND_FAILED = "share_link_send_failed", _("Link could not be sent")
        RETRIEVAL_RETRIED = "retrieval_retried", _("Retrieval started again")
        HANDOUT_PRINTED = "handout_printed", _("Handout printed")
        SHARE_EXPIRED = "share_expired", _("Share ended (expired or used)")
        SHARE_REARMED = "share_rearmed", _("Share re-armed (study retrieved again)")
        STUDY_PURGED = "study_purged", _("Study copy deleted from the store")
        STORE_OVER_CAP = "store_over_cap", _("Store over its size cap")
        AUDIT_EXPORTED = "audit_exported", _("Audit log exported")
        AUDIT_PRUNED = "audit_pruned", _("Audit events past the retention pruned")

    at = models.DateTimeField(_("when"), default=timezone.now, db_index=True)
    action = models.CharField(_("what"), max_length=32, choices=Action.choices)
    # An audit trail outlives what it describes: shares with events cannot be deleted.
    share = models.ForeignKey(
        Share, null=True, blank=True, on_delete=models.PROTECT, related_name="events"
    )
    actor = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    ip_address = models.GenericIPAddressField(_("from"), null=True, blank=True)
    user_agent = models.CharField(_("browser"), max_length=255, blank=True)
    detail = models.JSONField(default=dict, blank=True)
    # SHA-256 (hex) of the previous event's digest and this event's fields
    # (accounts.audit.event_digest); the first event's prev_digest is empty, or after a prune
    # the digest of the last pruned event (AuditChain.anchor_digest).
    prev_digest = models.CharField(max_length=64, blank=True, default="", editable=False)
    digest = models.CharField(max_length=64, blank=True, default="", editable=False)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-at", "-pk"]
        verbose_name = _("audit event")
        verbose_name_plural = _("audit events")
        indexes = [models.Index(fields=["share", "-at"])]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.action}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AuditTrailImmutable("audit events cannot be changed")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise AuditTrailImmutable("audit events cannot be deleted")


class AuditChain(models.Model):
    """The head of the audit chain: one row (pk 1). Appending an event locks it, so that
    concurrent writers (every web process, worker and SCP) take their turn and the chain never
    forks; its digest also shows when events were cut off the end. `anchor_digest` is the
    digest of the last event pruned past the retention: the first kept event chains to it."""

    SINGLETON = 1

    head_digest = models.CharField(max_length=64, blank=True, default="")
    events = models.PositiveBigIntegerField(default=0)
    anchor_digest = models.CharField(max_length=64, blank=True, default="")
    pruned_events = models.PositiveBigIntegerField(default=0)
    pruned_through = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = _("audit chain")
        verbose_name_plural = _("audit chain")

    def __str__(self) -> str:
        return f"audit chain ({self.events} events)"


class RecipientAccess(models.Model):
    """Whether recipients may reach the portal at all: one row (pk 1), read by every process
    and machine at each recipient request (accounts.selectors.recipient_access), so that an
    emergency close takes effect everywhere at once. Written only by
    accounts.services.recipients_close and recipients_open."""

    SINGLETON = 1

    # Set while recipient access is closed.
    closed_at = models.DateTimeField(_("closed since"), null=True, blank=True)
    message = models.TextField(_("message to recipients"), max_length=500, blank=True)
    closed_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # The last time access was closed: a recipient session that began before it is ended at
    # its next request, also after reopening, so that a close always ends every session.
    last_closed_at = models.DateTimeField(_("last closed"), null=True, blank=True)
    opened_at = models.DateTimeField(_("last opened"), null=True, blank=True)

    class Meta:
        verbose_name = _("recipient access")
        verbose_name_plural = _("recipient access")

    def __str__(self) -> str:
        return "closed" if self.closed_at is not None else "open"


class StaffPasskey(TimestampMixin, Device):
    """A member of staff's passkey (WebAuthn), as a django-otp device: signing in with it goes
    through `django_otp.login`, so the session is verified as with a TOTP code. There is no token
    to type: accounts.staff_passkeys checks the browser's signed answer instead."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="staff_passkeys")
    credential_id = models.BinaryField(unique=True)
    public_key = models.BinaryField()
    sign_count = models.PositiveBigIntegerField(default=0)

    class Meta:
        verbose_name = _("staff passkey")

    def verify_token(self, token: object) -> bool:
        return False


class RecoveryCodeDevice(Device):
    """A member of staff's recovery codes, for the day the phone is lost: one device holding
    the codes (RecoveryCode), each stored as a salted hash, shown once when made, good once.
    Unlike django-otp's static device, no code is ever stored in clear. Checking them is in
    accounts.staff_auth; they are a fallback, never the account's only second factor."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="recovery_code_devices")

    class Meta:
        verbose_name = _("recovery codes")

    def verify_token(self, token: object) -> bool:
        """Use up the unused code `token` is (typed in any case, with or without dashes).
        Every unused code is hashed against, so a wrong code takes as long as a right one."""
        typed = credentials.normalize_recovery_code(str(token))
        match = None
        for code in self.codes.select_for_update().filter(used_at__isnull=True):
            if credentials.recovery_code_matches(typed or "", code.code_hash) and match is None:
                match = code
        if typed is None or match is None:
            return False
        # Only if still unused: two requests with the same code cannot both use it.
        return bool(
            RecoveryCode.objects.filter(pk=match.pk, used_at__isnull=True).update(
                used_at=timezone.now()
            )
        )


class RecoveryCode(models.Model):
    device = models.ForeignKey(RecoveryCodeDevice, on_delete=models.CASCADE, related_name="codes")
    code_hash = models.CharField(max_length=128)
    used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = _("recovery code")

    def __str__(self) -> str:
        return f"recovery code {self.pk} ({'used' if self.used_at else 'unused'})"
