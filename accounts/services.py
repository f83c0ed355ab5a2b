"""Writes to the accounts domain: shares, recipient authentication steps, the audit log."""

import logging
import re
import smtplib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import phonenumbers
from axes.handlers.proxy import AxesProxyHandler
from axes.helpers import get_cool_off
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.db.models import F
from django.http import HttpRequest
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import formats, timezone, translation
from django.utils.translation import gettext as _

from accounts import audit as audit_trail
from accounts import credentials, net, selectors, sms
from accounts.models import (
    AuditEvent,
    PhysicianPasskey,
    RecipientAccess,
    Share,
    SharedStudy,
    ShareOTPDevice,
    User,
)

logger = logging.getLogger(__name__)

# Kinds of numbers that can receive a text message (a number that may be either, as in the
# United States, is taken at its word).
_TEXTABLE = {
    phonenumbers.PhoneNumberType.MOBILE,
    phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE,
}


# --- audit ----------------------------------------------------------------------------------


def audit(
    action: str,
    *,
    request: HttpRequest | None = None,
    share: Share | None = None,
    actor: User | None = None,
    **detail: Any,
) -> AuditEvent:
    """Record one event: appended to the hash chain (accounts.audit.event_append). The only
    way events are written; there is no update or delete."""
    if actor is None and request is not None:
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated and isinstance(user, User):
            actor = user
    return audit_trail.event_append(
        action=action,
        share=share,
        actor=actor,
        ip_address=net.client_ip(request) if request is not None else None,
        user_agent=net.user_agent(request) if request is not None else "",
        detail=detail,
    )


# --- viewer tokens --------------------------------------------------------------------------


def viewer_token_create(*, share: Share, study_instance_uid: str, request: HttpRequest) -> str:
    """A bearer token for an external viewer, minted by a verified recipient session for one
    study it may see (the caller checks that). Audited without the token: it is never stored,
    logged or written anywhere by the portal."""
    token = credentials.sign_viewer_token(share_id=share.pk, study_instance_uid=study_instance_uid)
    audit(
        AuditEvent.Action.VIEWER_TOKEN,
        request=request,
        share=share,
        study=study_instance_uid,
        minutes=settings.VIEWER_TOKEN_MINUTES,
    )
    return token


# --- shares ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreatedShare:
    share: Share
    url: str
    access_code: str


def share_link_url(signed_token: str) -> str:
    """The link sent and printed: the token in the fragment (`/s/#<token>`), which browsers
    keep to themselves, so that it never reaches a server's logs (accounts.views.link_page)."""
    return settings.BASE_URL + reverse("accounts:link_page") + "#" + signed_token


def phone_normalize(typed: str, *, strict: bool = True) -> str:
    """A mobile number as typed (`06 12 34 56 78`, `+33 6…`, `0033 6…`) in E.164
    (`+33612345678`), the form SMS gateways take. Numbers without a country code are read in
    settings.PHONE_REGION. Raises ValidationError (for the field `contact`) for anything that
    cannot be a phone number of that length, and for a number of a range known not to be
    mobile.

    `strict` (what staff type in the workspace) also refuses a number in no range allocated
    for phones: a typo of the right length is often one. Scripts and the demo pass numbers
    reserved for fiction (the French regulator's 06 39 98…), which exist in no allocated range.
    """
    try:
        number = phonenumbers.parse(typed.strip(), settings.PHONE_REGION)
    except phonenumbers.NumberParseException as exc:
        raise ValidationError(
            {
                "contact": [
                    _(
                        "This is not a phone number. Type a mobile number such as "
                        "06 12 34 56 78 or +33 6 12 34 56 78."
                    )
                ]
            }
        ) from exc
    valid = phonenumbers.is_valid_number(number)
    if not phonenumbers.is_possible_number(number) or (strict and not valid):
        raise ValidationError(
            {
                "contact": [
                    _("This phone number does not exist. Check the digits and the country code.")
                ]
            }
        )
    if valid and phonenumbers.number_type(number) not in _TEXTABLE:
        raise ValidationError(
            {"contact": [_("This is not a mobile number: text messages cannot reach it.")]}
        )
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _validate_contact(channel: str, contact: str) -> str:
    contact = contact.strip()
    if channel == Share.Channel.SMS:
        return phone_normalize(contact, strict=False)
    try:
        validate_email(contact)
    except ValidationError as exc:
        raise ValidationError({"contact": [_("This is not a valid email address.")]}) from exc
    # Django accepts addresses of up to 320 characters; the column holds fewer, and a longer
    # one would fail in the database (PostgreSQL) instead of here.
    limit = Share._meta.get_field("contact").max_length or 254
    if len(contact) > limit:
        message = _("This email address is too long (%(max)d characters at most).")
        raise ValidationError({"contact": [message % {"max": limit}]})
    return contact


def _default_days(recipient: str) -> int:
    if recipient == Share.Recipient.PHYSICIAN:
        return int(settings.SHARE_DAYS_PHYSICIAN)
    return int(settings.SHARE_DAYS_PATIENT)


def share_create(
    *,
    study_instance_uid: str,
    prior_study_instance_uids: Sequence[str] = (),
    recipient: str,
    channel: str,
    contact: str,
    days: int | None = None,
    allow_download: bool = True,
    single_use: bool = False,
    series_instance_uids: list[str] | None = None,
    note: str = "",
    language: str = "",
    created_by: User | None = None,
    request: HttpRequest | None = None,
) -> CreatedShare:
    """A new share of a study (and of priors of the same patient to compare it with) with its
    link and access code: the only moment they exist in clear.

    The caller (the studies app's sharing service) has validated the UIDs and that the studies
    are one patient's: what a valid UID is is defined once, in the studies app, which accounts
    does not import."""
    errors: dict[str, list[str]] = {}
    if recipient not in Share.Recipient.values:
        errors["recipient"] = [_("Unknown kind of recipient.")]
    if channel not in Share.Channel.values:
        errors["channel"] = [_("Unknown way of sending codes.")]
    if recipient == Share.Recipient.PHYSICIAN and channel != Share.Channel.EMAIL:
        errors["channel"] = [_("Physicians receive their codes by email.")]
    days = _default_days(recipient) if days is None else days
    if not 1 <= days <= settings.SHARE_MAX_DAYS:
        errors["days"] = [
            _("A share lasts from 1 to %(max)d days.") % {"max": settings.SHARE_MAX_DAYS}
        ]
    try:
        contact = _validate_contact(channel, contact)
    except ValidationError as exc:
        errors.update(exc.message_dict)
    note = note.strip()
    note_limit = Share._meta.get_field("note").max_length or 500
    if len(note) > note_limit:
        errors["note"] = [
            _("The note is too long (%(max)d characters at most).") % {"max": note_limit}
        ]
    language = language or settings.LANGUAGE_CODE
    if language not in dict(settings.LANGUAGES):
        errors["language"] = [_("Unknown language.")]
    if errors:
        raise ValidationError(errors)

    token = credentials.new_link_token()
    now = timezone.now()
    for _attempt in range(50):
        code = credentials.new_access_code()
        # A share that can no longer be opened may still hold this prefix: it gives it back.
        _release_prefix_if_dead(code.prefix)
        try:
            with transaction.atomic():
                share = Share.objects.create(
                    study=_find_study(study_instance_uid),
                    study_instance_uid=study_instance_uid,
                    series_instance_uids=list(series_instance_uids or []),
                    recipient=recipient,
                    channel=channel,
                    contact=contact,
                    token_hash=credentials.hash_link_token(token),
                    code_prefix=code.prefix,
                    code_hash=code.hashed_secret,
                    allow_download=allow_download,
                    single_use=single_use,
                    created_at=now,
                    created_by=created_by,
                    expires_at=now + timedelta(days=days),
                    note=note,
                    language=language,
                )
                SharedStudy.objects.bulk_create(
                    SharedStudy(share=share, study_instance_uid=uid)
                    for uid in dict.fromkeys([study_instance_uid, *prior_study_instance_uids])
                )
        except IntegrityError:
            # The 20-bit public prefix is taken by another share: draw another code.
            continue
        break
    else:  # pragma: no cover - a million live shares would be needed first
        raise RuntimeError("could not draw a free access code prefix")
    # Guesses typed at this prefix before the share existed were guesses at nothing: they do
    # not count against its recipient.
    AxesProxyHandler.reset_attempts(username="code:" + code.prefix)
    ShareOTPDevice.objects.create(share=share, name=share.get_channel_display())
    audit(
        AuditEvent.Action.SHARE_CREATED,
        request=request,
        share=share,
        actor=created_by,
        days=days,
        single_use=single_use,
        studies=len(share.study_uids),
    )
    return CreatedShare(
        share=share,
        url=share_link_url(credentials.sign_link_token(token)),
        access_code=code.display,
    )


def _study_model() -> Any:
    # The lazy reference "studies.Study", resolved without importing the studies app.
    return Share._meta.get_field("study").related_model


def _find_study(study_instance_uid: str) -> Any:
    return _study_model().objects.filter(study_instance_uid=study_instance_uid).first()


def share_attach_study(share: Share) -> Share:
    """Point a pending share at its study once the store has it. Idempotent."""
    if share.study_id is None:
        study = _find_study(share.study_instance_uid)
        if study is not None:
            Share.objects.filter(pk=share.pk, study__isnull=True).update(study=study)
            share.study = study
    return share


def share_revoke(
    *, share: Share, by: User | None = None, request: HttpRequest | None = None
) -> Share:
    if share.revoked_at is None:
        share.revoked_at = timezone.now()
        share.revoked_by = by
        share.save(update_fields=["revoked_at", "revoked_by"])
        audit(AuditEvent.Action.SHARE_REVOKED, request=request, share=share, actor=by)
    share_release_code(share)
    return share


def share_extend(
    *, share: Share, days: int, by: User | None = None, request: HttpRequest | None = None
) -> Share:
    """Push a live share's expiry `days` further, never past settings.SHARE_MAX_DAYS from its
    creation (accounts.selectors.share_extend_limit). A share that can no longer be opened is
    not brought back: its code may already be another share's (share_release_code), and a
    revoked share stays revoked; the study is shared again instead."""
    with transaction.atomic():
        share = _locked_row(share)
        if share.refusal() is not None:
            raise ValidationError(
                {"days": [_("This share has ended and cannot be extended: share the study again.")]}
            )
        limit = selectors.share_extend_limit(share)
        if days < 1:
            raise ValidationError({"days": [_("Extend by at least one day.")]})
        new_expiry = share.expires_at + timedelta(days=days)
        if new_expiry > limit:
            room = max(0, (limit - share.expires_at).days)
            message = _(
                "A share lasts at most %(max)d days from its creation, that is until "
                "%(limit)s: this one can be extended by %(room)d more days at most."
            ) % {
                "max": settings.SHARE_MAX_DAYS,
                "limit": formats.date_format(timezone.localtime(limit), "SHORT_DATETIME_FORMAT"),
                "room": room,
            }
            raise ValidationError({"days": [message]})
        previous = share.expires_at
        share.expires_at = new_expiry
        share.save(update_fields=["expires_at"])
    audit(
        AuditEvent.Action.SHARE_EXTENDED,
        request=request,
        share=share,
        actor=by,
        days=days,
        previous=previous.isoformat(),
        expires=new_expiry.isoformat(),
    )
    return share


def share_release_code(share: Share) -> Share:
    """Give back the public prefix of the access code of a share that can no longer be
    opened. The prefix has 20 bits and must be unique, while shares are never deleted (their
    audit trail outlives them): without this, prefixes would run out. The old code then matches
    no share, and gets the same "not valid" answer as before."""
    if share.code_prefix is not None:
        Share.objects.filter(pk=share.pk).update(code_prefix=None)
        share.code_prefix = None
    return share


def shares_release_dead_codes(*, now: datetime | None = None) -> int:
    """share_release_code for every share expired, revoked or used up: for `purge` and other
    scheduled work. (share_create also does it, lazily, for a prefix it draws.)"""
    dead = Share.objects.dead(now=now).filter(code_prefix__isnull=False)
    return sum(_share_end(share, now=now) for share in dead.iterator())


def _share_end(share: Share, *, now: datetime | None = None) -> int:
    """Release the code of a share that can no longer be opened; one that ended by itself
    (expired, used up) is recorded as ended here, once (a revoked one has its own event)."""
    released = Share.objects.filter(pk=share.pk, code_prefix__isnull=False).update(code_prefix=None)
    share.code_prefix = None
    reason = share.refusal(now=now)
    if released and reason is not None and share.revoked_at is None:
        audit(AuditEvent.Action.SHARE_EXPIRED, share=share, reason=str(reason))
    return released


def _release_prefix_if_dead(prefix: str) -> None:
    holder = Share.objects.filter(code_prefix=prefix).first()
    if holder is not None and holder.refusal() is not None:
        _share_end(holder)


def share_unlock(
    *, share: Share, by: User | None = None, request: HttpRequest | None = None
) -> Share:
    """Lift every lock on a share: wrong one-time codes (the lifetime count too: staff vouch
    for the recipient) and failed links or codes counted against it. Failures counted against
    an address are left alone."""
    share.locked_until = None
    share.otp_failures = 0
    share.save(update_fields=["locked_until", "otp_failures"])
    ShareOTPDevice.objects.filter(share=share).update(
        throttling_failure_count=0, throttling_failure_timestamp=None
    )
    for key in _lockout_keys(share):
        AxesProxyHandler.reset_attempts(username=key)
    audit(AuditEvent.Action.SHARE_UNLOCKED, request=request, share=share, actor=by)
    return share


@dataclass(frozen=True)
class NewCredentials:
    """A share's new link and, when it was replaced too, its new access code: the only moment
    they exist in clear."""

    url: str
    access_code: str | None


def share_regenerate(
    *,
    share: Share,
    code: bool = True,
    by: User | None = None,
    request: HttpRequest | None = None,
) -> NewCredentials:
    """Replace a share's link (and, with `code`, its access code): the old ones match nothing
    from this moment on, and get the same "not valid" answer as any unknown link or code.
    Lockouts counted against the old ones stay with them: they open nothing any more.

    Only a share that can still be opened: a dead one would hand out credentials that open
    nothing."""
    if share.refusal() is not None:
        raise ValidationError(_("This share can no longer be opened: it cannot get a new link."))
    token = credentials.new_link_token()
    update: dict[str, Any] = {"token_hash": credentials.hash_link_token(token)}
    new_code = None
    for _attempt in range(50):
        if code:
            new_code = credentials.new_access_code()
            _release_prefix_if_dead(new_code.prefix)
            update.update(code_prefix=new_code.prefix, code_hash=new_code.hashed_secret)
        try:
            with transaction.atomic():
                Share.objects.filter(pk=share.pk).update(**update)
        except IntegrityError:
            continue  # the new prefix is another share's: draw again
        break
    else:  # pragma: no cover - a million live shares would be needed first
        raise RuntimeError("could not draw a free access code prefix")
    share.refresh_from_db()
    if new_code is not None:
        AxesProxyHandler.reset_attempts(username="code:" + new_code.prefix)
    audit(
        AuditEvent.Action.SHARE_REGENERATED,
        request=request,
        share=share,
        actor=by,
        link=True,
        code=code,
    )
    return NewCredentials(
        url=share_link_url(credentials.sign_link_token(token)),
        access_code=new_code.display if new_code is not None else None,
    )


def share_link_send(
    *, share: Share, url: str, by: User | None = None, request: HttpRequest | None = None
) -> bool:
    """Send a share's link to its recipient's contact (a text message or an email), in the
    share's language. Returns whether the message was handed over; a failure is audited and
    logged without the contact or the link, and loses nothing: staff may send again."""
    context = {
        "url": url,
        "site": settings.BASE_URL,
        "hospital": settings.HOSPITAL_NAME,
        "expires_at": timezone.localtime(share.expires_at),
        "note": share.note,
    }
    try:
        with translation.override(share.language):
            if share.channel == Share.Channel.SMS:
                body = render_to_string("accounts/share_link_sms.txt", context).strip()
                sms.send_sms(share.contact, body)
            else:
                send_mail(
                    _("Your images are ready to view"),
                    render_to_string("accounts/share_link_email.txt", context),
                    settings.DEFAULT_FROM_EMAIL,
                    [share.contact],
                )
    except sms.SmsError as exc:
        logger.warning("link of share %s not sent: %s", share.pk, exc)
        audit(AuditEvent.Action.SHARE_LINK_SEND_FAILED, request=request, share=share, actor=by)
        return False
    except (smtplib.SMTPException, OSError) as exc:
        logger.warning("link of share %s not sent: %s", share.pk, type(exc).__name__)
        audit(AuditEvent.Action.SHARE_LINK_SEND_FAILED, request=request, share=share, actor=by)
        return False
    audit(
        AuditEvent.Action.SHARE_LINK_SENT,
        request=request,
        share=share,
        actor=by,
        channel=share.channel,
    )
    return True


def _lockout_keys(share: Share) -> list[str]:
    keys = ["link:" + share.token_hash[:16]]
    if share.code_prefix is not None:
        keys.append("code:" + share.code_prefix)
    return keys


# --- recipient authentication ----------------------------------------------------------------


# --- one-time codes -----------------------------------------------------------------------------


class OtpSend(StrEnum):
    SENT = "sent"
    COOLDOWN = "cooldown"
    LIMIT = "limit"
    LOCKED = "locked"
    FAILED = "failed"


@dataclass(frozen=True)
class OtpSendResult:
    outcome: OtpSend
    wait_seconds: int = 0


def _device(share: Share, *, for_update: bool = False) -> ShareOTPDevice:
    devices = ShareOTPDevice.objects.all()
    if for_update:
        devices = devices.select_for_update()
    device, _created = devices.get_or_create(share=share, defaults={"name": share.channel})
    return device


def _locked_row(share: Share) -> Share:
    """The share re-read and held until the transaction ends: parallel requests on one share
    take their turn here, and each sees the counts the previous one left."""
    return Share.objects.select_for_update().get(pk=share.pk)


def _expire_lock(share: Share, device: ShareOTPDevice) -> None:
    """A lock whose cool-off has passed gives the recipient a fresh run of attempts; the
    lifetime count (share.otp_failures) stays, so this happens once at most
    (settings.OTP_LIFETIME_MAX_FAILURES is twice settings.OTP_MAX_FAILURES)."""
    if share.locked_until is not None and share.locked_until <= timezone.now():
        Share.objects.filter(pk=share.pk).update(locked_until=None)
        share.locked_until = None
        device.throttle_reset()


def _sends_today(share: Share) -> int:
    since = timezone.now() - timedelta(hours=24)
    return AuditEvent.objects.filter(
        share=share, action=AuditEvent.Action.OTP_SENT, at__gte=since
    ).count()


def otp_send(*, share: Share, request: HttpRequest) -> OtpSendResult:
    """Send a new one-time code, at most one per cooldown and settings.OTP_MAX_SENDS_PER_DAY
    per share in 24 hours (each message costs, and a flood of them is a nuisance)."""
    with transaction.atomic():
        share = _locked_row(share)
        device = _device(share, for_update=True)
        _expire_lock(share, device)
        if selectors.share_is_locked(share):
            return OtpSendResult(OtpSend.LOCKED)
        limited = _sends_today(share) >= settings.OTP_MAX_SENDS_PER_DAY
        if not limited:
            allowed, data = device.generate_is_allowed()
            if not allowed:
                wait = (data or {}).get("next_generation_at", timezone.now()) - timezone.now()
                return OtpSendResult(OtpSend.COOLDOWN, max(1, int(wait.total_seconds()) + 1))
            # Resending draws a new code but leaves the count of wrong codes as it is.
            device.cooldown_set(commit=False)
            device.generate_token(valid_secs=settings.OTP_VALIDITY, commit=True)
            token = device.token or ""
    if limited:
        audit(AuditEvent.Action.OTP_SEND_LIMIT, request=request, share=share)
        return OtpSendResult(OtpSend.LIMIT)
    try:
        _deliver(share, token, request)
    except sms.SmsError as exc:
        # SmsError texts are ours and hold neither the number nor the message.
        logger.warning("one-time code for share %s not sent: %s", share.pk, exc)
        return _send_failed(share, device, request)
    except (smtplib.SMTPException, OSError) as exc:
        # An SMTP error's text may quote the recipient's address: only its kind is logged.
        logger.warning("one-time code for share %s not sent: %s", share.pk, type(exc).__name__)
        return _send_failed(share, device, request)
    audit(AuditEvent.Action.OTP_SENT, request=request, share=share, channel=share.channel)
    return OtpSendResult(OtpSend.SENT)


def _send_failed(share: Share, device: ShareOTPDevice, request: HttpRequest) -> OtpSendResult:
    # The recipient may ask again at once. Only this column: the device row may have changed
    # (wrong codes counted) while the gateway was being waited for.
    ShareOTPDevice.objects.filter(pk=device.pk).update(last_generated_timestamp=None)
    audit(AuditEvent.Action.OTP_SEND_FAILED, request=request, share=share)
    return OtpSendResult(OtpSend.FAILED)


def _deliver(share: Share, token: str, request: HttpRequest) -> None:
    minutes = max(1, settings.OTP_VALIDITY // 60)
    context = {"code": token, "minutes": minutes, "site": settings.BASE_URL}
    if share.channel == Share.Channel.SMS:
        host = urlsplit(settings.BASE_URL).hostname
        body = render_to_string("accounts/otp_sms.txt", context).strip()
        # The last line lets phones offer the code for this site only (WebOTP / iOS autofill).
        sms.send_sms(share.contact, f"{body}\n\n@{host} #{token}")
    else:
        send_mail(
            _("Your code to view your images"),
            render_to_string("accounts/otp_email.txt", context),
            settings.DEFAULT_FROM_EMAIL,
            [share.contact],
        )


class OtpVerify(StrEnum):
    OK = "ok"
    WRONG = "wrong"
    WAIT = "wait"
    LOCKED = "locked"
    REFUSED = "refused"


@dataclass(frozen=True)
class OtpVerifyResult:
    outcome: OtpVerify
    wait_seconds: int = 0
    remaining: int = 0


def otp_verify(*, share: Share, otp: str, request: HttpRequest) -> OtpVerifyResult:
    """Check a typed one-time code. Five wrong codes in a row lock the share for the cool-off;
    settings.OTP_LIFETIME_MAX_FAILURES over its life lock it until staff unlock it. A right code
    is cleared so it cannot serve twice; a single-use share is used up here, never before.

    Every decision is taken on the share and device rows held by this request (select for
    update), so parallel guesses cannot slip past the limits; django-otp's throttle only adds
    a growing wait between guesses."""
    typed = re.sub(r"\s", "", otp)
    locked_now = False
    with transaction.atomic():
        share = _locked_row(share)
        if share.refusal() is not None:
            return OtpVerifyResult(OtpVerify.REFUSED)
        device = _device(share, for_update=True)
        _expire_lock(share, device)
        if (
            selectors.share_is_locked(share)
            or device.throttling_failure_count >= settings.OTP_MAX_FAILURES
        ):
            return OtpVerifyResult(OtpVerify.LOCKED)
        allowed, data = device.verify_is_allowed()
        if not allowed:
            until = (data or {}).get("locked_until", timezone.now())
            wait = max(1, int((until - timezone.now()).total_seconds()) + 1)
            return OtpVerifyResult(OtpVerify.WAIT, wait_seconds=wait)
        ok = typed.isdigit() and device.verify_token(typed)
        if not typed.isdigit():
            # Not even digits: django-otp was not asked, but it counts all the same.
            device.throttle_increment()
        failures = device.throttling_failure_count
        if ok and not share_consume(share):
            return OtpVerifyResult(OtpVerify.REFUSED)
        if not ok:
            share.otp_failures += 1
            update: dict[str, Any] = {"otp_failures": F("otp_failures") + 1}
            if failures >= settings.OTP_MAX_FAILURES or selectors.share_lock_is_final(share):
                # The same cool-off as axes' lockouts; accounts.E004 makes sure there is one.
                cool_off = get_cool_off(request)
                assert cool_off is not None
                share.locked_until = timezone.now() + cool_off
                update["locked_until"] = share.locked_until
                locked_now = True
            Share.objects.filter(pk=share.pk).update(**update)
    if ok:
        audit(AuditEvent.Action.OTP_OK, request=request, share=share)
        return OtpVerifyResult(OtpVerify.OK)
    audit(AuditEvent.Action.OTP_FAILED, request=request, share=share, failures=failures)
    if locked_now:
        final = selectors.share_lock_is_final(share)
        audit(AuditEvent.Action.LOCKOUT, request=request, share=share, step="otp", final=final)
        return OtpVerifyResult(OtpVerify.LOCKED)
    remaining = min(
        settings.OTP_MAX_FAILURES - failures,
        settings.OTP_LIFETIME_MAX_FAILURES - share.otp_failures,
    )
    return OtpVerifyResult(OtpVerify.WRONG, remaining=remaining)


# --- passkeys ---------------------------------------------------------------------------------


def passkey_enrolled(*, share: Share, request: HttpRequest) -> None:
    """Record a new passkey and tell the physician at the address it now opens: should somebody
    else have enrolled it (with a link and an emailed code they should not have had), the owner
    of the mailbox learns it at once."""
    audit(AuditEvent.Action.PASSKEY_ENROLLED, request=request, share=share)
    context = {
        "site": settings.BASE_URL,
        "when": timezone.localtime(),
        "support_contact": settings.SUPPORT_CONTACT,
        "idle_days": settings.PASSKEY_IDLE_DAYS,
    }
    try:
        send_mail(
            _("A passkey was added for your access to shared images"),
            render_to_string("accounts/passkey_added_email.txt", context),
            settings.DEFAULT_FROM_EMAIL,
            [share.contact],
        )
    except (smtplib.SMTPException, OSError) as exc:
        logger.warning("passkey notice for share %s not sent: %s", share.pk, type(exc).__name__)


def share_consume(share: Share) -> bool:
    """Use up a single-use share at the moment its recipient is fully authenticated; False if
    another session got there first. Other shares are not affected."""
    if not share.single_use:
        return True
    now = timezone.now()
    used = Share.objects.filter(pk=share.pk, used_at__isnull=True).update(used_at=now)
    if used:
        share.used_at = now
    return bool(used)


# --- emergency close of recipient access -----------------------------------------------------


def _recipient_access_row() -> RecipientAccess:
    row, _created = RecipientAccess.objects.select_for_update().get_or_create(
        pk=RecipientAccess.SINGLETON
    )
    return row


def recipients_close(
    *, message: str = "", by: User | None = None, request: HttpRequest | None = None
) -> RecipientAccess:
    """Close every recipient URL at once (the CISO's emergency close when the portal is under
    attack): each answers 503 with the maintenance page, and every recipient session ends at
    its next request. Staff work goes on. Closing again only changes the message."""
    message = message.strip()[:500]
    now = timezone.now()
    with transaction.atomic():
        row = _recipient_access_row()
        already = row.closed_at is not None
        if not already:
            row.closed_at = now
            row.last_closed_at = now
            row.closed_by = by
        row.message = message
        row.save()
    audit(
        AuditEvent.Action.RECIPIENTS_CLOSED,
        request=request,
        actor=by,
        message=message,
        already_closed=already,
    )
    return row


def recipients_open(
    *, by: User | None = None, request: HttpRequest | None = None
) -> RecipientAccess:
    """Let recipients in again. Sessions that were live when access closed stay ended: their
    recipients start again from their link or code."""
    with transaction.atomic():
        row = _recipient_access_row()
        was_closed = row.closed_at is not None
        if was_closed:
            row.closed_at = None
            row.opened_at = timezone.now()
            row.message = ""
            row.save()
    audit(AuditEvent.Action.RECIPIENTS_OPENED, request=request, actor=by, was_closed=was_closed)
    return row


# --- physicians' passkeys (staff) -------------------------------------------------------------


def passkey_delete(
    *, passkey: PhysicianPasskey, by: User | None = None, request: HttpRequest | None = None
) -> None:
    """Remove a physician's passkey (lost phone, a passkey the physician did not create…):
    later shares to that address ask for an emailed code again. The physician is told by
    email, as when one is added."""
    email, passkey_id, share = passkey.email, passkey.pk, passkey.enrolled_with
    passkey.delete()
    audit(
        AuditEvent.Action.PASSKEY_DELETED,
        request=request,
        actor=by,
        share=share,
        passkey=passkey_id,
        email=selectors.mask_email(email),
    )
    context = {
        "site": settings.BASE_URL,
        "when": timezone.localtime(),
        "support_contact": settings.SUPPORT_CONTACT,
    }
    try:
        send_mail(
            _("A passkey was removed from your access to shared images"),
            render_to_string("accounts/passkey_removed_email.txt", context),
            settings.DEFAULT_FROM_EMAIL,
            [email],
        )
    except (smtplib.SMTPException, OSError) as exc:
        logger.warning("passkey removal notice %s not sent: %s", passkey_id, type(exc).__name__)


# --- guessing campaigns -------------------------------------------------------------------------


def security_alert(*, failures: int, request: HttpRequest | None = None) -> AuditEvent:
    """Failed links and codes across all shares passed settings.ALERT_FAILURES_PER_MINUTE:
    a guessing campaign spread over many addresses, which lockout by address cannot see
    (accounts.throttle.failure_campaign_starts calls it once per episode). Recorded, mailed to
    settings.SECURITY_EMAIL and, with settings.AUTO_CLOSE, recipient access is closed."""
    closed = False
    if settings.AUTO_CLOSE:
        recipients_close(
            message=_("Access is closed for a while for safety reasons. Please try again later."),
            request=request,
        )
        closed = True
    event = audit(
        AuditEvent.Action.FAILURE_ALERT,
        request=request,
        failures=failures,
        threshold=settings.ALERT_FAILURES_PER_MINUTE,
        closed=closed,
    )
    logger.warning(
        "security alert: %d failed links or codes within a minute across all shares", failures
    )
    if settings.SECURITY_EMAIL:
        context = {
            "site": settings.BASE_URL,
            "failures": failures,
            "threshold": settings.ALERT_FAILURES_PER_MINUTE,
            "when": timezone.localtime(event.at),
            "closed": closed,
        }
        try:
            send_mail(
                _("Image portal: many failed access codes"),
                render_to_string("accounts/security_alert_email.txt", context),
                settings.DEFAULT_FROM_EMAIL,
                [settings.SECURITY_EMAIL],
            )
        except (smtplib.SMTPException, OSError) as exc:
            logger.warning("security alert not mailed: %s", type(exc).__name__)
    return event
