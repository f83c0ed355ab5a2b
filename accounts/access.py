"""The recipient's session: bound to exactly one share, rotated at every step, short-lived.

Stages: after a valid link or code the session holds the share with stage "pending" (it may
only ask for and type a one-time code); after the one-time code (or a physician's passkey) the
stage is "verified" and the recipient may see the study. Endpoints with patient data call
`recipient_share()` / `recipient_required` and answer 404 to anything the share does not cover.
"""

import time
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from typing import Concatenate, ParamSpec, cast

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect

from accounts import selectors, services
from accounts.models import AuditEvent, Share

SHARE = "recipient.share"
STAGE = "recipient.stage"
STARTED = "recipient.started"
SEEN = "recipient.seen"
# How and when the second factor was proved ("otp" or "passkey"), and whether this session
# already enrolled a passkey: enrolment is allowed once, soon after an emailed code.
VERIFIED_BY = "recipient.verified_by"
VERIFIED_AT = "recipient.verified_at"
PASSKEY_ADDED = "recipient.passkey_added"
# The Study Instance UIDs this session has viewed (and audited) so far.
VIEWED = "recipient.viewed"
BY_OTP = "otp"
BY_PASSKEY = "passkey"
PASSKEY_ENROL_WINDOW = 5 * 60  # seconds after the one-time code
PENDING = "pending"
VERIFIED = "verified"
# How often the idle clock is written back to the session (seconds): often enough for the
# 15-minute idle limit, rarely enough not to write the session on every image request.
_SEEN_RESOLUTION = 30

_P = ParamSpec("_P")

# The home page, which sends a recipient session back to where it was.
HOME_PATH = "/"
# The only URLs a recipient session may reach (with HOME_PATH); anything else answers 404.
RECIPIENT_PATHS = (
    "/s/",
    "/access/",
    "/viewer/",
    "/dicomweb/",
    "/download/",
    "/static/",
    "/i18n/",
    "/captcha/",
    "/healthz",
    "/favicon.ico",
    "/ohif/",
)


# While recipient access is closed (accounts.services.recipients_close), these answer 503 with
# the maintenance page, and so does the home page: every way in for a recipient, OHIF's pages
# too when it is installed. Static files, the language switch and /healthz stay up.
CLOSED_PATHS = ("/s/", "/access/", "/viewer/", "/dicomweb/", "/download/", "/ohif/", "/captcha/")


def closes_with_recipient_access(path: str) -> bool:
    return path == HOME_PATH or path.startswith(CLOSED_PATHS)


def started_before(request: HttpRequest, moment: datetime) -> bool:
    """Whether this recipient session began before `moment`."""
    return int(request.session.get(STARTED, 0)) <= moment.timestamp()


def bind(request: HttpRequest, share: Share) -> None:
    """Start a recipient session for this share after a valid link or code.

    Whatever the session held before (another share, a staff login) is dropped, and the key
    changes, so a session planted before this step is worth nothing after it.
    """
    request.session.flush()
    now = int(time.time())
    request.session[SHARE] = share.pk
    request.session[STAGE] = PENDING
    request.session[STARTED] = now
    request.session[SEEN] = now
    request.session.set_expiry(settings.RECIPIENT_SESSION_IDLE)


def mark_verified(request: HttpRequest, *, by: str) -> None:
    request.session.cycle_key()
    now = int(time.time())
    request.session[STAGE] = VERIFIED
    request.session[SEEN] = now
    request.session[VERIFIED_BY] = by
    request.session[VERIFIED_AT] = now


def may_enrol_passkey(request: HttpRequest) -> bool:
    """A passkey opens every later share sent to the physician's address, so it is only
    enrolled by a session that has just proved that mailbox with an emailed code (not with a
    passkey, which would let one passkey breed others), once, and within a few minutes: a
    session left open on a shared computer cannot be used to add one later."""
    session = request.session
    if session.get(VERIFIED_BY) != BY_OTP or session.get(PASSKEY_ADDED):
        return False
    return 0 <= int(time.time()) - int(session.get(VERIFIED_AT, 0)) <= PASSKEY_ENROL_WINDOW


def mark_passkey_added(request: HttpRequest) -> None:
    request.session[PASSKEY_ADDED] = True


def record_view(request: HttpRequest, *, share: Share, study_instance_uid: str) -> None:
    """Audit that this session views a study: one VIEW event per session and study (the viewer
    page, DICOMweb metadata and retrieve all call it), not one per page load or request."""
    viewed = request.session.get(VIEWED)
    # Sessions begun before views were counted per study held True here.
    seen = list(viewed) if isinstance(viewed, list) else []
    if study_instance_uid in seen:
        return
    services.audit(AuditEvent.Action.VIEW, request=request, share=share, study=study_instance_uid)
    request.session[VIEWED] = [*seen, study_instance_uid]


def end(request: HttpRequest) -> None:
    request.session.flush()


def is_recipient_session(request: HttpRequest) -> bool:
    return SHARE in request.session


def _bound_share(request: HttpRequest, stage: str) -> Share | None:
    share_id = request.session.get(SHARE)
    if share_id is None or request.session.get(STAGE) != stage:
        return None
    share = Share.objects.filter(pk=share_id).first()
    if share is None:
        return None
    if stage == VERIFIED:
        return share if selectors.share_open_to_verified(share) else None
    return share if share.refusal() is None and not selectors.share_is_locked(share) else None


def bound_locked_share(request: HttpRequest) -> Share | None:
    """This session's share (at any stage) if it is locked after too many wrong codes."""
    share_id = request.session.get(SHARE)
    share = Share.objects.filter(pk=share_id).first() if share_id is not None else None
    return share if share is not None and selectors.share_is_locked(share) else None


def pending_share(request: HttpRequest) -> Share | None:
    """The share whose link or code this session presented, awaiting the second factor."""
    return _bound_share(request, PENDING)


def recipient_share(request: HttpRequest) -> Share | None:
    """The share this session fully opened, or None."""
    return _bound_share(request, VERIFIED)


class RecipientRequest(HttpRequest):
    """The request a `recipient_required` view receives: its session's verified share."""

    share: Share


def recipient_required(
    view: Callable[Concatenate[RecipientRequest, _P], HttpResponse],
) -> Callable[Concatenate[HttpRequest, _P], HttpResponse]:
    """For recipient pages: the verified share as `request.share`, else back to the code page.
    (Never cached: RecipientSessionMiddleware marks every recipient URL.)"""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: _P.args, **kwargs: _P.kwargs) -> HttpResponse:
        share = recipient_share(request)
        if share is None:
            return redirect("accounts:access")
        recipient_request = cast(RecipientRequest, request)
        recipient_request.share = share
        return view(recipient_request, *args, **kwargs)

    return wrapper


def check_session_age(request: HttpRequest) -> bool:
    """False (and the session ended) when a recipient session passed its idle or absolute
    limit; refreshes the idle clock otherwise."""
    if not is_recipient_session(request):
        return True
    now = int(time.time())
    started = int(request.session.get(STARTED, 0))
    seen = int(request.session.get(SEEN, 0))
    if (
        now - started > settings.RECIPIENT_SESSION_MAX
        or now - seen > settings.RECIPIENT_SESSION_IDLE
    ):
        share = Share.objects.filter(pk=int(request.session.get(SHARE, 0))).first()
        services.audit(AuditEvent.Action.SESSION_EXPIRED, request=request, share=share)
        end(request)
        return False
    if now - seen >= _SEEN_RESOLUTION:
        request.session[SEEN] = now
        remaining = settings.RECIPIENT_SESSION_MAX - (now - started)
        request.session.set_expiry(min(settings.RECIPIENT_SESSION_IDLE, max(1, remaining)))
    return True
