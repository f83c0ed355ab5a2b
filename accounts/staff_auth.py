"""Staff second factors: what a member of staff has enrolled, checking what they give, the hard
lock after too many wrong ones, recovery codes, and the audit events of each step.

The password step is Django's own (`authenticate`, so that django-axes counts and locks by
address and by username); everything after it is here. Every second factor, whatever its
kind, counts toward one hard lock: settings.STAFF_SECOND_FACTOR_MAX_FAILURES wrong ones in a
row lock the account until an administrator unlocks it (`staff_unlock`, an admin action).
TOTP codes are also slowed down by django-otp's throttle (ThrottlingMixin).
"""

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from django.conf import settings
from django.contrib.sessions.backends.base import SessionBase
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Q
from django.http import HttpRequest
from django.utils import timezone
from django.utils.translation import gettext as _
from django_otp.models import Device
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts import credentials, services
from accounts.models import AuditEvent, RecoveryCode, RecoveryCodeDevice, StaffPasskey, User

RECOVERY_CODES = 10
TOTP_DEVICE_NAME = "authenticator"


# --- reads --------------------------------------------------------------------------------------


def primary_devices(user: User) -> list[Device]:
    """The user's confirmed second factors that may stand alone: authenticator apps and
    passkeys (recovery codes are a fallback, not one of these)."""
    return [
        *TOTPDevice.objects.filter(user=user, confirmed=True).order_by("pk"),
        *StaffPasskey.objects.filter(user=user, confirmed=True).order_by("pk"),
    ]


def has_primary_device(user: User) -> bool:
    return (
        TOTPDevice.objects.filter(user=user, confirmed=True).exists()
        or StaffPasskey.objects.filter(user=user, confirmed=True).exists()
    )


def has_passkey(user: User) -> bool:
    return StaffPasskey.objects.filter(user=user, confirmed=True).exists()


def recovery_codes_left(user: User) -> int:
    return RecoveryCode.objects.filter(device__user=user, used_at__isnull=True).count()


# --- the password step ----------------------------------------------------------------------------


def password_failed(*, username: str, request: HttpRequest, locked_out: bool) -> None:
    """A refused password (or one refused unchecked during a lockout). The typed username is
    not recorded (people type passwords into it); the account is, when it exists."""
    actor = User.objects.filter(username=username).first()
    services.audit(
        AuditEvent.Action.STAFF_LOGIN_FAILED,
        request=request,
        actor=actor,
        step="password",
        reason="locked-out" if locked_out else "wrong",
    )
    if locked_out:
        services.audit(AuditEvent.Action.LOCKOUT, request=request, actor=actor, step="staff")


# --- second factors -----------------------------------------------------------------------------


class Outcome(StrEnum):
    OK = "ok"
    WRONG = "wrong"
    WAIT = "wait"
    LOCKED = "locked"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Check:
    outcome: Outcome
    device: Device | None = None
    wait_seconds: int = 0
    remaining: int = 0


def _locked_user(user: User) -> User:
    return User.objects.select_for_update().get(pk=user.pk)


def _failed(user: User, request: HttpRequest, *, method: str, purpose: str) -> Check:
    """Count a wrong second factor; past the limit, lock the account."""
    with transaction.atomic():
        row = _locked_user(user)
        row.second_factor_failures = F("second_factor_failures") + 1
        row.save(update_fields=["second_factor_failures"])
        row.refresh_from_db(fields=["second_factor_failures", "locked_at"])
        locked_now = (
            row.locked_at is None
            and row.second_factor_failures >= settings.STAFF_SECOND_FACTOR_MAX_FAILURES
        )
        if locked_now:
            row.locked_at = timezone.now()
            row.save(update_fields=["locked_at"])
    user.second_factor_failures, user.locked_at = row.second_factor_failures, row.locked_at
    services.audit(
        AuditEvent.Action.STAFF_SECOND_FACTOR_FAILED,
        request=request,
        actor=user,
        method=method,
        purpose=purpose,
        failures=row.second_factor_failures,
    )
    if locked_now:
        services.audit(AuditEvent.Action.STAFF_LOCKED, request=request, actor=user)
    if row.locked_at is not None:
        return Check(Outcome.LOCKED)
    remaining = settings.STAFF_SECOND_FACTOR_MAX_FAILURES - row.second_factor_failures
    return Check(Outcome.WRONG, remaining=remaining)


def _succeeded(user: User, request: HttpRequest, device: Device, *, method: str) -> Check:
    User.objects.filter(pk=user.pk).update(second_factor_failures=0)
    user.second_factor_failures = 0
    if method == "recovery":
        services.audit(
            AuditEvent.Action.STAFF_RECOVERY_CODE_USED,
            request=request,
            actor=user,
            left=recovery_codes_left(user),
        )
    return Check(Outcome.OK, device=device)


def _is_locked(user: User) -> bool:
    return User.objects.filter(pk=user.pk, locked_at__isnull=False).exists()


def totp_verify(*, user: User, code: str, request: HttpRequest, purpose: str) -> Check:
    """A code from one of the user's authenticator apps. A code is good once (django-otp keeps
    the last time step used); each device's throttle makes the next try wait 1, 2, 4… seconds,
    and a try refused by the throttle is not counted."""
    if _is_locked(user):
        return Check(Outcome.LOCKED)
    typed = "".join(code.split())
    matched = None
    with transaction.atomic():
        devices = list(
            TOTPDevice.objects.select_for_update().filter(user=user, confirmed=True).order_by("pk")
        )
        allowed = [d for d in devices if d.verify_is_allowed()[0]]
        if devices and not allowed:
            now = timezone.now()
            until = min(d.verify_is_allowed()[1]["locked_until"] for d in devices)
            return Check(Outcome.WAIT, wait_seconds=max(1, int((until - now).total_seconds()) + 1))
        if typed.isdigit() and len(typed) <= 8:
            for device in allowed:
                if device.verify_token(typed):
                    matched = device
                    break
        else:
            for device in allowed:
                device.throttle_increment()
    if matched is None:
        return _failed(user, request, method="totp", purpose=purpose)
    return _succeeded(user, request, matched, method="totp")


def recovery_code_verify(*, user: User, code: str, request: HttpRequest, purpose: str) -> Check:
    """One of the user's unused recovery codes, which it uses up."""
    if _is_locked(user):
        return Check(Outcome.LOCKED)
    matched = None
    with transaction.atomic():
        device = RecoveryCodeDevice.objects.select_for_update().filter(user=user).first()
        if device is not None and device.verify_token(code[:64]):
            matched = device
    if matched is None:
        return _failed(user, request, method="recovery", purpose=purpose)
    return _succeeded(user, request, matched, method="recovery")


def passkey_verified(*, user: User, device: StaffPasskey, request: HttpRequest) -> Check:
    if _is_locked(user):
        return Check(Outcome.LOCKED)
    return _succeeded(user, request, device, method="passkey")


def passkey_failed(*, user: User, request: HttpRequest, purpose: str) -> Check:
    return _failed(user, request, method="passkey", purpose=purpose)


def login_succeeded(*, user: User, device: Device, request: HttpRequest) -> None:
    services.audit(
        AuditEvent.Action.STAFF_LOGIN, request=request, actor=user, method=_method(device)
    )


def reauth_succeeded(*, user: User, device: Device, request: HttpRequest) -> None:
    services.audit(
        AuditEvent.Action.STAFF_REAUTH, request=request, actor=user, method=_method(device)
    )


def _method(device: Device) -> str:
    if isinstance(device, StaffPasskey):
        return "passkey"
    if isinstance(device, RecoveryCodeDevice):
        return "recovery"
    return "totp"


def staff_unlock(*, user: User, by: User | None, request: HttpRequest | None = None) -> User:
    """Lift the hard lock (an administrator, from the admin): the count starts again and the
    TOTP throttle too."""
    User.objects.filter(pk=user.pk).update(second_factor_failures=0, locked_at=None)
    user.second_factor_failures, user.locked_at = 0, None
    TOTPDevice.objects.filter(user=user).update(
        throttling_failure_count=0, throttling_failure_timestamp=None
    )
    services.audit(AuditEvent.Action.STAFF_UNLOCKED, request=request, actor=by, staff_user=user.pk)
    return user


# --- enrolment and devices -----------------------------------------------------------------------


# The authenticator app this session is enrolling (its unconfirmed TOTPDevice's pk). Each session
# makes its own secret: a secret shown to one session (perhaps someone else's, who had the
# password) is never the one another session confirms.
ENROLLING = "staff.enrolling_totp"
# An unconfirmed app older than this is never confirmed: its secret has been on a screen too long.
ENROL_SECONDS = 60 * 60


def _enrol_stale() -> Q:
    cutoff = timezone.now() - timedelta(seconds=ENROL_SECONDS)
    return Q(created_at__lt=cutoff) | Q(created_at__isnull=True)


def _is_stale(device: TOTPDevice) -> bool:
    cutoff = timezone.now() - timedelta(seconds=ENROL_SECONDS)
    return device.created_at is None or device.created_at < cutoff


def totp_device_enrolling(user: User, session: SessionBase) -> TOTPDevice | None:
    """The unconfirmed app whose secret this session was shown, however old (confirming it
    checks its age)."""
    pk = session.get(ENROLLING)
    if not isinstance(pk, int):
        return None
    return TOTPDevice.objects.filter(pk=pk, user=user, confirmed=False).first()


def totp_device_to_enrol(user: User, session: SessionBase) -> TOTPDevice:
    """The authenticator app this session is enrolling: a new secret, kept (unconfirmed) for
    this session only until a first code confirms it, so that reloading the page does not change
    the QR code but another session never sees it."""
    device = totp_device_enrolling(user, session)
    if device is not None and _is_stale(device):
        device = None
    if device is None:
        TOTPDevice.objects.filter(user=user, confirmed=False).filter(_enrol_stale()).delete()
        device = TOTPDevice.objects.create(user=user, name=TOTP_DEVICE_NAME, confirmed=False)
        session[ENROLLING] = device.pk
    return device


def totp_enrol_confirm(
    *, user: User, device: TOTPDevice | None, code: str, request: HttpRequest
) -> Check:
    """A first code from the app confirms it, and the user's other unconfirmed apps (secrets
    other sessions were shown) are deleted. An app that is gone or too old is refused (EXPIRED):
    the page then shows a new secret. (A wrong code is throttled but not counted toward the
    hard lock: whoever sees the QR code could type a right one.)"""
    typed = "".join(code.split())
    with transaction.atomic():
        _locked_user(user)  # one confirmation at a time per user
        row = (
            TOTPDevice.objects.select_for_update()
            .filter(pk=device.pk, user=user, confirmed=False)
            .first()
            if device is not None
            else None
        )
        if row is None or _is_stale(row):
            if row is not None:
                row.delete()
            request.session.pop(ENROLLING, None)
            return Check(Outcome.EXPIRED)
        allowed, data = row.verify_is_allowed()
        if not allowed:
            until = (data or {}).get("locked_until", timezone.now())
            wait = max(1, int((until - timezone.now()).total_seconds()) + 1)
            return Check(Outcome.WAIT, wait_seconds=wait)
        ok = typed.isdigit() and row.verify_token(typed)
        if not typed.isdigit():
            row.throttle_increment()
        if ok:
            row.confirmed = True
            row.save(update_fields=["confirmed"])
            TOTPDevice.objects.filter(user=user, confirmed=False).delete()
    if not ok:
        return Check(Outcome.WRONG)
    request.session.pop(ENROLLING, None)
    device_added(user=user, device=row, request=request)
    return Check(Outcome.OK, device=row)


def device_added(*, user: User, device: Device, request: HttpRequest) -> None:
    services.audit(
        AuditEvent.Action.STAFF_DEVICE_ADDED,
        request=request,
        actor=user,
        kind=_method(device),
        device=device.pk,
    )


def recovery_codes_create(*, user: User, request: HttpRequest) -> list[str]:
    """A new set of recovery codes, replacing any earlier set (its unused codes die). Returned
    in clear this once: only their hashes are stored."""
    made = [credentials.new_recovery_code() for _i in range(RECOVERY_CODES)]
    with transaction.atomic():
        # The device stays (a session it verified stays verified); its codes are replaced.
        device, _created = RecoveryCodeDevice.objects.get_or_create(
            user=user, defaults={"name": _("Recovery codes"), "confirmed": True}
        )
        device.codes.all().delete()
        RecoveryCode.objects.bulk_create(
            RecoveryCode(device=device, code_hash=hashed) for _shown, hashed in made
        )
    services.audit(AuditEvent.Action.STAFF_RECOVERY_CODES, request=request, actor=user)
    return [shown for shown, _hashed in made]


def device_remove(*, user: User, kind: str, pk: int, request: HttpRequest) -> Device:
    """Remove one of the user's authenticator apps or passkeys, never the last one: an account
    always keeps a second factor. Returns one that remains."""
    with transaction.atomic():
        _locked_user(user)
        model = {"totp": TOTPDevice, "passkey": StaffPasskey}.get(kind)
        device = model.objects.filter(user=user, pk=pk).first() if model is not None else None
        if device is None:
            raise ValidationError(_("This second factor does not exist."))
        if device.confirmed and len(primary_devices(user)) <= 1:
            raise ValidationError(
                _("This is your only second factor: add another one before removing it.")
            )
        device.delete()
        remaining = primary_devices(user)[0]
    services.audit(
        AuditEvent.Action.STAFF_DEVICE_REMOVED, request=request, actor=user, kind=kind, device=pk
    )
    return remaining


# --- the password ---------------------------------------------------------------------------


def staff_password_change(*, user: User, new_password: str, request: HttpRequest) -> User:
    """A new password (already checked: the old one and the configured validators). Every
    session of the user made with the old one ends at its next request (Django compares the
    session's password hash); the view keeps its own (update_session_auth_hash)."""
    user.set_password(new_password)
    user.save(update_fields=["password"])
    services.audit(AuditEvent.Action.STAFF_PASSWORD_CHANGED, request=request, actor=user)
    return user
