"""Recipient access: share link, access code, one-time code, history, sign-out.

Every invalid, unknown, expired, revoked or used-up link or code gets the same answer, whatever
the reason (which only goes to the audit log). Failures go through Django's authentication so
that django-axes counts them by address and by share; locked-out attempts get the 429 page.
"""

import statistics
import threading
import time
from collections import deque
from typing import Any

from axes.handlers.proxy import AxesProxyHandler
from axes.helpers import get_cool_off
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import authenticate
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts import access, credentials, net, passkeys, selectors, services, throttle
from accounts.forms import AccessCodeForm, OtpForm
from accounts.middleware import NOTICE
from accounts.models import AuditEvent, Share

# Failures from one address after which the code form asks for a captcha.
CAPTCHA_AFTER = 3


# The notice the access page shows after a redirect ("this link does not work", "signed
# out"…) travels in a short-lived cookie, not in the session: a refused link or code must not
# cost a session row (anybody can send thousands). The middleware's "expired" notice is set
# in the session it ends.
NOTICE_COOKIE = "portal_notice"
_NOTICES = {"invalid", "start", "signed-out", "expired"}


def _notice(request: HttpRequest) -> str | None:
    notice = request.session.pop(NOTICE, None) or request.COOKIES.get(NOTICE_COOKIE)
    return notice if notice in _NOTICES else None


def _to_access(notice: str) -> HttpResponse:
    """Redirect to the access page, which then shows `notice` once."""
    response = redirect("accounts:access")
    response.set_cookie(
        NOTICE_COOKIE,
        notice,
        max_age=60,
        secure=settings.SESSION_COOKIE_SECURE,
        httponly=True,
        samesite="Lax",
    )
    return response


def _locked_response(request: HttpRequest, share: Share | None = None) -> HttpResponse:
    """The 429 page. `share`: the share whose one-time codes locked it, when that lock only
    ends with staff (the page then says to call them rather than to wait)."""
    cool_off = get_cool_off(request)
    # accounts.E004 makes sure there is a cool-off.
    assert cool_off is not None
    final = share is not None and selectors.share_lock_is_final(share)
    response = render(
        request,
        "accounts/locked.html",
        {
            "minutes": int(cool_off.total_seconds() // 60),
            "final": final,
            "support_contact": settings.SUPPORT_CONTACT,
        },
        status=429,
    )
    if not final:
        response["Retry-After"] = str(int(cool_off.total_seconds()))
    return response


def lockout(
    request: HttpRequest, response: HttpResponse | None = None, credentials: Any = None
) -> HttpResponse:
    """AXES_LOCKOUT_CALLABLE. At /s/<token> the answer is a redirect, never a 4xx: Django logs
    the path of every 4xx answer, and that path holds a token."""
    if request.path_info.startswith("/s/"):
        return redirect("accounts:locked")
    if request.path_info.startswith("/staff/"):
        # Staff sign-in: the staff page (wait, or ask a colleague), not the recipients'.
        from accounts.staff_views import lockout_response

        return lockout_response(request)
    return _locked_response(request)


# Set by the link view before it redirects to the lockout page (no 4xx at /s/, see lockout()).
_LOCKED_SHARE = "recipient.locked_share"


@require_GET
def locked(request: HttpRequest) -> HttpResponse:
    share_id = request.session.pop(_LOCKED_SHARE, None)
    share = Share.objects.filter(pk=share_id).first() if share_id is not None else None
    return _locked_response(request, share)


def _hide_path_from_axes(request: HttpRequest) -> None:
    # axes records (and logs) the path of a failed attempt, and this path is the token.
    AxesProxyHandler.update_request(request)
    request.axes_path_info = "/s/[redacted]"  # type: ignore[attr-defined]


def _audit_failure(request: HttpRequest, action: str) -> None:
    check: selectors.AccessCheck | None = getattr(request, "share_check", None)
    matched = check.matched if check else None
    reason = check.reason.value if check and check.reason else "locked-out"
    services.audit(action, request=request, share=matched, reason=reason)
    if getattr(request, "axes_locked_out", False):
        services.audit(AuditEvent.Action.LOCKOUT, request=request, share=matched, step=action)
    if check is not None:
        # A link or code that was really checked, and failed: counted across all shares.
        failures = throttle.failure_campaign_starts()
        if failures:
            services.security_alert(failures=failures, request=request)


def _no_slot(request: HttpRequest, action: str) -> HttpResponse:
    """As many attempts as the lockout allows are already counted or being checked for this
    address or share (accounts.throttle.attempt_slot): refused unchecked, as axes refuses a
    locked-out one."""
    services.audit(action, request=request, reason="locked-out")
    return lockout(request)


def _opened(request: HttpRequest, share: Share, *, via: str) -> HttpResponse:
    if selectors.share_is_locked(share):
        return _locked_response(request, share)
    access.bind(request, share)
    services.share_attach_study(share)
    action = AuditEvent.Action.LINK_OPENED if via == "link" else AuditEvent.Action.CODE_OK
    services.audit(action, request=request, share=share)
    return redirect("accounts:verify")


def _link_not_valid(request: HttpRequest) -> HttpResponse:
    return _to_access("invalid")


class _RefusalPace:
    """How long refusing a correctly signed link takes in this process (lookup, counting,
    audit): the median of the last few, so that refusing a forged or stale one, which needs
    none of that work, takes as long. The answer's timing says nothing of the refusal's kind."""

    def __init__(self) -> None:
        self._recent: deque[float] = deque(maxlen=15)
        self._lock = threading.Lock()

    def record(self, started: float) -> None:
        with self._lock:
            self._recent.append(time.perf_counter() - started)

    def wait_since(self, started: float) -> None:
        with self._lock:
            pace = statistics.median(self._recent) if self._recent else 0.0
        remaining = min(pace, 1.0) - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)


_refusal_pace = _RefusalPace()


@require_GET
def link(request: HttpRequest, token: str) -> HttpResponse:
    """/s/<token>: links issued before the fragment form (`/s/#<token>`), which carried their
    token in the path, still open (and are counted) exactly as a posted token does."""
    return _open_link(request, token)


@require_http_methods(["GET", "POST"])
@ensure_csrf_cookie
def link_page(request: HttpRequest) -> HttpResponse:
    """/s/: the page a link opens. Its token is in the URL fragment (`/s/#<token>`), which
    browsers never send to a server, so that no proxy, access log, mail scanner or link preview
    ever sees it: the page's script (static/js/link.js) reads it, takes it out of the address
    bar and posts it here (field `token`). Without JavaScript the page offers the access code.
    (It sets the CSRF cookie: the script's form needs it.)"""
    if request.method == "POST":
        return _open_link(request, request.POST.get("token", "").strip())
    return render(request, "accounts/link.html", {"form": AccessCodeForm()})


def _open_link(request: HttpRequest, token: str) -> HttpResponse:
    """Check a link's token, swap it for a session bound to the share, and leave the URL.

    Only what a stolen signing key could produce is counted by axes: a correctly signed token
    that opens nothing (unknown, expired, revoked, used up). A request that is not a top-level
    navigation (an <img>, a script, a fetch: any web page can make its visitors' browsers send
    them) and a link whose signature is bad or stale (it can never open anything) get the same
    "not valid" answer uncounted, so no page on the web can lock a hospital's address out."""
    started = time.perf_counter()
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode is not None and mode != "navigate":
        return redirect("accounts:access")
    _hide_path_from_axes(request)
    raw = credentials.unsign_link_token(token)
    if raw is None:
        services.audit(AuditEvent.Action.LINK_FAILED, request=request, reason="bad-signature")
        _refusal_pace.wait_since(started)
        return _link_not_valid(request)
    scope = credentials.lockout_key_for_link(raw)
    with throttle.attempt_slot(ip_address=net.axes_client_ip(request), scope=scope) as slot:
        if not slot.allowed:
            return _no_slot(request, AuditEvent.Action.LINK_FAILED)
        share = authenticate(request, link_token=token, lockout_scope=scope)
    if isinstance(share, Share):
        if selectors.share_is_locked(share):
            request.session[_LOCKED_SHARE] = share.pk
            return redirect("accounts:locked")
        return _opened(request, share, via="link")
    _audit_failure(request, AuditEvent.Action.LINK_FAILED)
    if not getattr(request, "axes_locked_out", False):
        _refusal_pace.record(started)
    return _link_not_valid(request)


@require_http_methods(["GET", "POST"])
def access_code(request: HttpRequest) -> HttpResponse:
    """/access/: the typed access code (field `code`)."""
    # Counted as axes counts (an IPv6 client's whole /64).
    ip = net.client_limit_key(request)
    needs_captcha = selectors.failures_from_ip(ip) >= CAPTCHA_AFTER
    notice = _notice(request)
    invalid = notice == "invalid"
    if request.method == "POST":
        # The form strips the code as this does: the slot is taken for what is checked.
        typed = request.POST.get("code", "").strip()
        scope = credentials.lockout_key_for_code(credentials.normalize_code(typed), typed)
        with throttle.attempt_slot(ip_address=net.axes_client_ip(request), scope=scope) as slot:
            if not slot.allowed:
                return _no_slot(request, AuditEvent.Action.CODE_FAILED)
            # Attempts from this address checked before this one, those in progress included:
            # parallel requests cannot all slip in under the captcha threshold.
            needs_captcha = slot.before_from_address >= CAPTCHA_AFTER
            form = AccessCodeForm(request.POST, captcha=needs_captcha)
            checked = form.is_valid()
            share = None
            if checked:
                share = authenticate(request, access_code_secret=typed, lockout_scope=scope)
        if checked:
            if isinstance(share, Share):
                return _opened(request, share, via="code")
            _audit_failure(request, AuditEvent.Action.CODE_FAILED)
            invalid = True
            # The form shown next asks for a captcha as soon as this address needs one.
            needs_captcha = selectors.failures_from_ip(ip) >= CAPTCHA_AFTER
            form = AccessCodeForm(captcha=needs_captcha)
    else:
        form = AccessCodeForm(captcha=needs_captcha)
    response = render(
        request,
        "accounts/access.html",
        {"form": form, "invalid": invalid, "notice": notice},
    )
    if NOTICE_COOKIE in request.COOKIES:
        response.delete_cookie(NOTICE_COOKIE, samesite="Lax")
    return response


@require_http_methods(["GET", "POST"])
def verify(request: HttpRequest) -> HttpResponse:
    """/access/verify: where the one-time code goes; a GET never sends anything nor uses up a
    share (mail scanners and link previews follow links). POST action=send sends it; POST otp
    checks it."""
    share = access.pending_share(request)
    if share is None:
        if access.recipient_share(request) is not None:
            return redirect("dicomweb:viewer")
        locked = access.bound_locked_share(request)
        if locked is not None:
            return _locked_response(request, locked)
        return _to_access(_notice(request) or "start")
    form = OtpForm()
    if request.method == "POST" and request.POST.get("action") == "send":
        sent = services.otp_send(share=share, request=request)
        if sent.outcome == services.OtpSend.SENT:
            messages.success(
                request,
                _("We have sent you a code. It is valid for %(minutes)d minutes.")
                % {"minutes": settings.OTP_VALIDITY // 60},
            )
        elif sent.outcome == services.OtpSend.COOLDOWN:
            messages.warning(
                request,
                ngettext(
                    "A code was sent a moment ago. You can ask for another one in %(n)d second.",
                    "A code was sent a moment ago. You can ask for another one in %(n)d seconds.",
                    sent.wait_seconds,
                )
                % {"n": sent.wait_seconds},
            )
        elif sent.outcome == services.OtpSend.LOCKED:
            return _locked_response(request, share)
        elif sent.outcome == services.OtpSend.LIMIT:
            messages.error(request, _limit_message())
        else:
            messages.error(
                request, _("We could not send the code just now. Please try again in a minute.")
            )
        return redirect("accounts:verify")
    if request.method == "POST":
        form = OtpForm(request.POST)
        if form.is_valid():
            result = services.otp_verify(share=share, otp=form.cleaned_data["otp"], request=request)
            if result.outcome == services.OtpVerify.OK:
                access.mark_verified(request, by=access.BY_OTP)
                if passkeys.should_offer(share):
                    return redirect("accounts:passkey_offer")
                return redirect("dicomweb:viewer")
            if result.outcome == services.OtpVerify.LOCKED:
                return _locked_response(request, Share.objects.get(pk=share.pk))
            if result.outcome == services.OtpVerify.REFUSED:
                access.end(request)
                return _to_access("invalid")
            if result.outcome == services.OtpVerify.WAIT:
                form.add_error(
                    "otp",
                    ngettext(
                        "Please wait %(n)d second before trying again.",
                        "Please wait %(n)d seconds before trying again.",
                        result.wait_seconds,
                    )
                    % {"n": result.wait_seconds},
                )
            else:
                form.add_error(
                    "otp",
                    ngettext(
                        "This code is not right. You have %(n)d more try.",
                        "This code is not right. You have %(n)d more tries.",
                        result.remaining,
                    )
                    % {"n": result.remaining},
                )
    context = {
        "share": share,
        "form": form,
        "destination": selectors.masked_contact(share),
        "code_sent": selectors.otp_pending(share),
        "passkey": passkeys.can_sign_in(share),
        "minutes": settings.OTP_VALIDITY // 60,
    }
    return render(request, "accounts/verify.html", context)


def _limit_message() -> str:
    if settings.SUPPORT_CONTACT:
        return _(
            "You have asked for many codes today, so for your safety no more can be sent "
            "before tomorrow. If you need your images sooner, call %(contact)s."
        ) % {"contact": settings.SUPPORT_CONTACT}
    return _(
        "You have asked for many codes today, so for your safety no more can be sent before "
        "tomorrow. If you need your images sooner, call the department that gave you the link "
        "or the code."
    )


@require_POST
def logout(request: HttpRequest) -> HttpResponse:
    share = access.recipient_share(request) or access.pending_share(request)
    if share is not None:
        services.audit(AuditEvent.Action.LOGOUT, request=request, share=share)
    access.end(request)
    return _to_access("signed-out")


@require_GET
@access.recipient_required
def history(request: access.RecipientRequest) -> HttpResponse:
    share = request.share
    entries = selectors.recipient_history(share)
    return render(
        request,
        "accounts/history.html",
        {"share": share, "entries": entries, "now": timezone.now()},
    )


# --- passkeys (referring physicians) ------------------------------------------------------


def _json(data: dict[str, Any], status: int = 200) -> HttpResponse:
    return JsonResponse(data, status=status)


def _may_enrol(request: HttpRequest, share: Share) -> bool:
    return (
        share.recipient == Share.Recipient.PHYSICIAN
        and access.may_enrol_passkey(request)
        and passkeys.may_add(share)
    )


@require_GET
@access.recipient_required
def passkey_offer(request: access.RecipientRequest) -> HttpResponse:
    share = request.share
    if not _may_enrol(request, share):
        return redirect("dicomweb:viewer")
    return render(request, "accounts/passkey_offer.html", {"share": share})


@require_POST
@access.recipient_required
def passkey_register_options(request: access.RecipientRequest) -> HttpResponse:
    share = request.share
    if not _may_enrol(request, share):
        return _json({"error": "not allowed"}, status=404)
    return HttpResponse(
        passkeys.registration_options(share, request.session),
        content_type="application/json",
    )


@require_POST
@access.recipient_required
def passkey_register(request: access.RecipientRequest) -> HttpResponse:
    share = request.share
    if not _may_enrol(request, share):
        return _json({"error": "not allowed"}, status=404)
    try:
        passkeys.register(share, request.session, request.body.decode())
    except (passkeys.PasskeyError, UnicodeDecodeError):
        services.audit(AuditEvent.Action.PASSKEY_FAILED, request=request, share=share, step="enrol")
        return _json({"error": _("Your passkey could not be saved.")}, status=400)
    access.mark_passkey_added(request)
    services.passkey_enrolled(share=share, request=request)
    return _json({"ok": True, "next": reverse("dicomweb:viewer")})


@require_POST
def passkey_login_options(request: HttpRequest) -> HttpResponse:
    share = access.pending_share(request)
    if share is None or not passkeys.can_sign_in(share):
        return _json({"error": "not found"}, status=404)
    return HttpResponse(
        passkeys.authentication_options(share, request.session),
        content_type="application/json",
    )


@require_POST
def passkey_login(request: HttpRequest) -> HttpResponse:
    share = access.pending_share(request)
    if share is None or not passkeys.can_sign_in(share):
        return _json({"error": "not found"}, status=404)
    try:
        passkeys.authenticate(share, request.session, request.body.decode())
    except (passkeys.PasskeyError, UnicodeDecodeError):
        services.audit(AuditEvent.Action.PASSKEY_FAILED, request=request, share=share, step="login")
        return _json({"error": _("Your passkey was not accepted.")}, status=400)
    if not services.share_consume(share):
        access.end(request)
        return _json({"error": _("This link is no longer valid.")}, status=400)
    services.audit(AuditEvent.Action.PASSKEY_OK, request=request, share=share)
    access.mark_verified(request, by=access.BY_PASSKEY)
    return _json({"ok": True, "next": reverse("dicomweb:viewer")})


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    """/: where a patient with a letter starts (the access-code form, posting to /access/),
    and a line for staff. A recipient already signed in goes back to where they were."""
    if access.recipient_share(request) is not None:
        return redirect("dicomweb:viewer")
    if access.pending_share(request) is not None:
        return redirect("accounts:verify")
    try:
        staff_url = reverse("staff:home")
    except NoReverseMatch:
        staff_url = ""  # the staff workspace is not installed
    return render(request, "accounts/home.html", {"form": AccessCodeForm(), "staff_url": staff_url})
