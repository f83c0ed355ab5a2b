"""Staff sign-in: the password, then a second factor (an authenticator app's code, a passkey or
a recovery code), enrolment for an account that has none, re-authentication before sensitive
actions, sign-out, and the "Your security" page.

The rules live in accounts.staff (the session's stages and clocks) and accounts.staff_auth
(checking second factors, the hard lock, recovery codes); these views only call them.
"""

from base64 import b32encode
from typing import Any
from urllib.parse import urlencode

import django_otp
import segno
from axes.helpers import get_cool_off
from django.contrib import messages
from django.contrib.auth import authenticate, update_session_auth_hash
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.cache import add_never_cache_headers
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts import services, staff, staff_auth, staff_passkeys
from accounts.models import AuditEvent, StaffPasskey, User
from accounts.staff import recent_second_factor_required, staff_required
from accounts.staff_auth import Check, Outcome
from accounts.staff_forms import (
    PasswordForm,
    RecoveryCodeForm,
    StaffPasswordChangeForm,
    TotpForm,
)

# What the sign-in page may say after a redirect (accounts.staff.NOTICE).
_NOTICES = {"expired", "signed-out", "locked"}


def _signed_in(request: HttpRequest) -> User | None:
    """The member of staff of this session, if it passed a second factor."""
    user = request.user
    if isinstance(user, User) and staff.is_verified(user):
        return user
    return None


def _no_store(response: HttpResponse) -> HttpResponse:
    # Sign-in pages and recovery codes are never kept by a browser or proxy cache.
    add_never_cache_headers(response)
    return response


def _locked_page(request: HttpRequest) -> HttpResponse:
    return _no_store(render(request, "accounts/staff/locked.html", status=403))


def lockout_response(request: HttpRequest) -> HttpResponse:
    """The 429 page of the password step (django-axes' lockout by address or username)."""
    cool_off = get_cool_off(request)
    assert cool_off is not None  # accounts.E004
    minutes = int(cool_off.total_seconds() // 60)
    response = render(request, "accounts/staff/locked_out.html", {"minutes": minutes}, status=429)
    response["Retry-After"] = str(int(cool_off.total_seconds()))
    return _no_store(response)


# --- password -------------------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
def login(request: HttpRequest) -> HttpResponse:
    """/staff/login/: username and password. Failures go through Django's `authenticate`, so
    that django-axes counts them by address and by username and answers 429 past its limit."""
    next_url = staff.safe_next(request, request.POST.get("next") or request.GET.get("next"))
    user = _signed_in(request)
    if user is not None:
        return redirect(next_url or staff.home_url(user))
    notice = request.session.pop(staff.NOTICE, None)
    form = PasswordForm()
    if request.method == "POST":
        form = PasswordForm(request.POST)
        if form.is_valid():
            username = form.cleaned_data["username"]
            found = authenticate(request, username=username, password=form.cleaned_data["password"])
            locked_out = bool(getattr(request, "axes_locked_out", False))
            if isinstance(found, User) and not locked_out:
                if found.locked_at is not None:
                    return _locked_page(request)
                staff.begin_pending(request, found, next_url=next_url)
                if staff_auth.has_primary_device(found):
                    return redirect("staff:second_factor")
                return redirect("staff:enrol")
            staff_auth.password_failed(username=username, request=request, locked_out=locked_out)
            if locked_out:
                # AxesMiddleware turns this into the 429 page (accounts.views.lockout).
                return lockout_response(request)
            form.add_error(None, _("This username and password do not match."))
    if notice not in _NOTICES:
        notice = None
    context = {"form": form, "next": next_url or "", "notice": notice}
    return _no_store(render(request, "accounts/staff/login.html", context))


# --- the second factor ----------------------------------------------------------------------------


def _check_posted(
    request: HttpRequest, user: User, *, purpose: str
) -> tuple[Check | None, TotpForm, RecoveryCodeForm]:
    """Check the code or recovery code of a POST; the forms to show again, with their errors."""
    totp_form, recovery_form = TotpForm(), RecoveryCodeForm()
    check = None
    if "recovery_code" in request.POST:
        recovery_form = RecoveryCodeForm(request.POST)
        if recovery_form.is_valid():
            check = staff_auth.recovery_code_verify(
                user=user,
                code=recovery_form.cleaned_data["recovery_code"],
                request=request,
                purpose=purpose,
            )
            _explain(check, recovery_form, "recovery_code")
    else:
        totp_form = TotpForm(request.POST)
        if totp_form.is_valid():
            check = staff_auth.totp_verify(
                user=user, code=totp_form.cleaned_data["otp"], request=request, purpose=purpose
            )
            _explain(check, totp_form, "otp")
    return check, totp_form, recovery_form


def _explain(check: Check, form: Any, field: str) -> None:
    if check.outcome == Outcome.WRONG:
        form.add_error(
            field,
            ngettext(
                "This code is not right. After %(n)d more wrong try your account is locked.",
                "This code is not right. After %(n)d more wrong tries your account is locked.",
                check.remaining,
            )
            % {"n": check.remaining},
        )
    elif check.outcome == Outcome.WAIT:
        form.add_error(
            field,
            ngettext(
                "Please wait %(n)d second before trying again.",
                "Please wait %(n)d seconds before trying again.",
                check.wait_seconds,
            )
            % {"n": check.wait_seconds},
        )


def _factor_context(user: User, totp_form: TotpForm, recovery_form: RecoveryCodeForm) -> dict:
    return {
        "totp_form": totp_form,
        "recovery_form": recovery_form,
        "has_totp": any(not isinstance(d, StaffPasskey) for d in staff_auth.primary_devices(user)),
        "has_passkey": staff_auth.has_passkey(user),
        "has_recovery": staff_auth.recovery_codes_left(user) > 0,
    }


@require_http_methods(["GET", "POST"])
def second_factor(request: HttpRequest) -> HttpResponse:
    """/staff/login/second-factor/: after the password, the second factor."""
    user = staff.pending_user(request)
    if user is None:
        return redirect("staff:login")
    if not staff_auth.has_primary_device(user):
        return redirect("staff:enrol")
    totp_form, recovery_form = TotpForm(), RecoveryCodeForm()
    if request.method == "POST":
        check, totp_form, recovery_form = _check_posted(request, user, purpose="login")
        if check is not None and check.outcome == Outcome.LOCKED:
            staff.end(request)
            return _locked_page(request)
        if check is not None and check.outcome == Outcome.OK:
            assert check.device is not None
            target = staff.complete_login(request, user, check.device)
            staff_auth.login_succeeded(user=user, device=check.device, request=request)
            return redirect(target)
    context = _factor_context(user, totp_form, recovery_form)
    context["username"] = user.get_username()
    return _no_store(render(request, "accounts/staff/second_factor.html", context))


@require_http_methods(["GET", "POST"])
@staff_required()
def reauth(request: HttpRequest) -> HttpResponse:
    """/staff/reauth/: the second factor again before a sensitive action; back to `next`."""
    user = request.user
    assert isinstance(user, User)
    next_url = staff.safe_next(request, request.POST.get("next") or request.GET.get("next"))
    totp_form, recovery_form = TotpForm(), RecoveryCodeForm()
    if request.method == "POST":
        check, totp_form, recovery_form = _check_posted(request, user, purpose="reauth")
        if check is not None and check.outcome == Outcome.LOCKED:
            staff.end(request)
            return _locked_page(request)
        if check is not None and check.outcome == Outcome.OK:
            assert check.device is not None
            _reauthenticated(request, user, check.device)
            return redirect(next_url or staff.home_url(user))
    context = _factor_context(user, totp_form, recovery_form)
    context["next"] = next_url or ""
    return _no_store(render(request, "accounts/staff/reauth.html", context))


def _reauthenticated(request: HttpRequest, user: User, device: Any) -> None:
    request.session.cycle_key()
    staff.second_factor_mark(request)
    staff_auth.reauth_succeeded(user=user, device=device, request=request)


# --- passkeys at sign-in and re-authentication ----------------------------------------------------


def _json_error(message: str, status: int) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


@require_POST
def passkey_options(request: HttpRequest) -> HttpResponse:
    user = _signed_in(request) or staff.pending_user(request)
    if user is None or not staff_auth.has_passkey(user):
        return _json_error("not found", 404)
    return HttpResponse(
        staff_passkeys.authentication_options(user, request.session),
        content_type="application/json",
    )


@require_POST
def passkey_verify(request: HttpRequest) -> HttpResponse:
    """A passkey's signed answer: signs in a session past its password, or re-authenticates a
    signed-in one (then back to `next`)."""
    signed_in = _signed_in(request)
    user = signed_in or staff.pending_user(request)
    if user is None:
        return _json_error("not found", 404)
    try:
        device = staff_passkeys.authenticate(user, request.session, request.body.decode())
    except (staff_passkeys.PasskeyError, UnicodeDecodeError):
        failed = staff_auth.passkey_failed(
            user=user, request=request, purpose="reauth" if signed_in else "login"
        )
        if failed.outcome == Outcome.LOCKED:
            staff.end(request)
            return _json_error(_("Your account is locked. An administrator can unlock it."), 403)
        return _json_error(_("Your passkey was not accepted."), 400)
    check = staff_auth.passkey_verified(user=user, device=device, request=request)
    if check.outcome == Outcome.LOCKED:
        staff.end(request)
        return _json_error(_("Your account is locked. An administrator can unlock it."), 403)
    if signed_in is not None:
        _reauthenticated(request, user, device)
        target = staff.safe_next(request, request.GET.get("next")) or staff.home_url(user)
    else:
        target = staff.complete_login(request, user, device)
        staff_auth.login_succeeded(user=user, device=device, request=request)
    return JsonResponse({"ok": True, "next": target})


# --- enrolment ------------------------------------------------------------------------------------


def _enrolling_user(request: HttpRequest) -> tuple[User | None, HttpResponse | None]:
    """Who may enrol an authenticator app here: a session past its password whose account has
    no second factor yet, or a signed-in member of staff who just proved one."""
    user = _signed_in(request)
    if user is not None:
        if not staff.second_factor_is_recent(request):
            back = urlencode({"next": reverse("staff:enrol")})
            return None, redirect(f"{reverse('staff:reauth')}?{back}")
        return user, None
    pending = staff.pending_user(request)
    if pending is None:
        return None, redirect("staff:login")
    if staff_auth.has_primary_device(pending):
        # A password alone never adds a second factor to an account that has one.
        return None, redirect("staff:second_factor")
    return pending, None


def _qr_data_uri(text: str) -> str:
    return str(segno.make(text, error="m").svg_data_uri(scale=5, border=4, dark="#000"))


@require_http_methods(["GET", "POST"])
def enrol(request: HttpRequest) -> HttpResponse:
    """/staff/enrol/: an authenticator app, by its QR code (drawn here, as SVG) or its secret
    typed by hand, confirmed by a first code. After a first enrolment the account is signed in
    and its recovery codes are shown, once."""
    user, refusal = _enrolling_user(request)
    if refusal is not None:
        return refusal
    assert user is not None
    signed_in = _signed_in(request) is not None
    form = TotpForm()
    if request.method == "POST":
        form = TotpForm(request.POST)
        if form.is_valid():
            # The app whose secret this session was shown, and no other.
            shown = staff_auth.totp_device_enrolling(user, request.session)
            check = staff_auth.totp_enrol_confirm(
                user=user, device=shown, code=form.cleaned_data["otp"], request=request
            )
            if check.outcome == Outcome.OK:
                assert check.device is not None
                if signed_in:
                    messages.success(request, _("Your authenticator app is added."))
                    return redirect("staff:security")
                target = staff.complete_login(request, user, check.device)
                staff_auth.login_succeeded(user=user, device=check.device, request=request)
                codes = staff_auth.recovery_codes_create(user=user, request=request)
                return _recovery_codes_page(request, codes, target)
            if check.outcome == Outcome.WAIT:
                _explain(check, form, "otp")
            elif check.outcome == Outcome.EXPIRED:
                form.add_error(
                    "otp",
                    _("This QR code has expired. Scan the new one and type the code it gives."),
                )
            else:
                form.add_error(
                    "otp", _("This code is not right. Check the time of your phone and try again.")
                )
    # This session's secret (a new one if it has none yet or its own has expired).
    device = staff_auth.totp_device_to_enrol(user, request.session)
    secret = b32encode(device.bin_key).decode()
    context = {
        "form": form,
        "qr": _qr_data_uri(device.config_url),
        "secret_groups": [secret[i : i + 4] for i in range(0, len(secret), 4)],
        "secret": secret,
        "first": not signed_in,
    }
    return _no_store(render(request, "accounts/staff/enrol.html", context))


def _recovery_codes_page(request: HttpRequest, codes: list[str], continue_url: str) -> HttpResponse:
    context = {"codes": codes, "continue_url": continue_url}
    return _no_store(render(request, "accounts/staff/recovery_codes.html", context))


# --- sign-out -------------------------------------------------------------------------------------


@require_POST
def logout(request: HttpRequest) -> HttpResponse:
    """Ends the session server side: its cookie opens nothing afterwards."""
    user = request.user
    if isinstance(user, User):
        services.audit(AuditEvent.Action.LOGOUT, request=request, actor=user)
    staff.end(request, notice="signed-out")
    return redirect("staff:login")


# --- "Your security" ----------------------------------------------------------------------------


def _password_form(user: User, data: Any = None) -> StaffPasswordChangeForm:
    return StaffPasswordChangeForm(user, data)


def _security_page(
    request: HttpRequest, password_form: StaffPasswordChangeForm, *, status: int = 200
) -> HttpResponse:
    user = request.user
    assert isinstance(user, User)
    devices = []
    for device in staff_auth.primary_devices(user):
        kind = "passkey" if isinstance(device, StaffPasskey) else "totp"
        devices.append({"kind": kind, "device": device})
    context = {
        "staff_section": "security",
        "devices": devices,
        "removable": len(devices) > 1,
        "recovery_left": staff_auth.recovery_codes_left(user),
        "recent": staff.second_factor_is_recent(request),
        "reauth_url": f"{reverse('staff:reauth')}?{urlencode({'next': request.path})}",
        "password_form": password_form,
    }
    return _no_store(render(request, "accounts/staff/security.html", context, status=status))


@require_GET
@staff_required()
def security(request: HttpRequest) -> HttpResponse:
    user = request.user
    assert isinstance(user, User)
    return _security_page(request, _password_form(user))


@require_POST
@staff_required()
@recent_second_factor_required
def password_change(request: HttpRequest) -> HttpResponse:
    """/staff/security/password/: the old password, the new one twice (the configured
    validators). This session stays signed in; the user's other sessions end."""
    user = request.user
    assert isinstance(user, User)
    form = _password_form(user, request.POST)
    if not form.is_valid():
        # Nothing is changed; the page comes back with the errors (never the typed passwords).
        return _security_page(request, form)
    staff_auth.staff_password_change(
        user=user, new_password=form.cleaned_data["new_password1"], request=request
    )
    update_session_auth_hash(request, user)
    messages.success(request, _("Your password is changed. Your other sessions are signed out."))
    return redirect("staff:security")


@require_POST
@staff_required()
@recent_second_factor_required
def recovery_codes_regenerate(request: HttpRequest) -> HttpResponse:
    user = request.user
    assert isinstance(user, User)
    codes = staff_auth.recovery_codes_create(user=user, request=request)
    return _recovery_codes_page(request, codes, reverse("staff:security"))


@require_POST
@staff_required()
@recent_second_factor_required
def device_remove(request: HttpRequest, kind: str, pk: int) -> HttpResponse:
    user = request.user
    assert isinstance(user, User)
    verified_by = getattr(user, "otp_device", None)
    try:
        remaining = staff_auth.device_remove(user=user, kind=kind, pk=pk, request=request)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        if verified_by is not None and verified_by.persistent_id == _persistent_id(kind, pk):
            # The session was verified by the device just removed: it stays verified (the user
            # proved a second factor minutes ago), now by one that remains.
            django_otp.login(request, remaining)
        messages.success(request, _("The second factor is removed."))
    return redirect("staff:security")


def _persistent_id(kind: str, pk: int) -> str:
    model = StaffPasskey if kind == "passkey" else TOTPDevice
    return f"{model.model_label()}/{pk}"


@require_POST
@staff_required()
def passkey_add_options(request: HttpRequest) -> HttpResponse:
    user = request.user
    assert isinstance(user, User)
    if not staff.second_factor_is_recent(request):
        return _json_error(_("Please confirm it is you first."), 403)
    return HttpResponse(
        staff_passkeys.registration_options(user, request.session),
        content_type="application/json",
    )


@require_POST
@staff_required()
@never_cache
def passkey_add(request: HttpRequest) -> HttpResponse:
    user = request.user
    assert isinstance(user, User)
    if not staff.second_factor_is_recent(request):
        return _json_error(_("Please confirm it is you first."), 403)
    try:
        device = staff_passkeys.register(user, request.session, request.body.decode())
    except (staff_passkeys.PasskeyError, UnicodeDecodeError):
        return _json_error(_("Your passkey could not be saved."), 400)
    staff_auth.device_added(user=user, device=device, request=request)
    messages.success(request, _("Your passkey is added."))
    return JsonResponse({"ok": True, "next": reverse("staff:security")})
