"""The list of shares and, for each, its access log and the staff's actions on it: revoke,
extend, unlock; and the revocation of every share of a patient at once. (The share page with
its retrieval progress and handout, and regenerating or resending a link, are in
studies.staff.sharing.)

Thin views: reads from the selectors of studies and accounts, writes through their services;
every action is a POST of its own, answered by a redirect and a message."""

from datetime import datetime
from urllib.parse import urlencode

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.utils import formats, timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts import selectors as account_selectors
from accounts import services as account_services
from accounts.models import Share, User
from accounts.staff import recent_second_factor_required, staff_required
from studies import selectors, services
from studies.staff.share_forms import PatientRevokeForm, ShareExtendForm, ShareFilterForm

PAGE_SIZE = 25


def _staff_user(request: HttpRequest) -> User:
    # staff_required has checked it.
    assert isinstance(request.user, User)
    return request.user


def _get_share(pk: int) -> Share:
    share = selectors.share_with_status(pk)
    if share is None:
        raise Http404
    return share


def _back_to_log(share: Share) -> HttpResponse:
    return redirect("staff:share_log", pk=share.pk)


@staff_required(User.Role.SHARER)
@require_GET
def share_list(request: HttpRequest) -> HttpResponse:
    form = ShareFilterForm(request.GET or None)
    status = patient = ""
    if form.is_bound and form.is_valid():
        status = form.cleaned_data["status"]
        patient = form.cleaned_data["patient"]
    shares = selectors.share_list_with_status(status=status, patient=patient)
    page = Paginator(shares, PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "studies/staff/shares_list.html",
        {
            "staff_section": "shares",
            "form": form,
            "page": page,
            "query": query.urlencode(),
            "patient": patient,
        },
    )


@staff_required(User.Role.SHARER)
@require_GET
def share_log(request: HttpRequest, pk: int) -> HttpResponse:
    share = _get_share(pk)
    return render(
        request,
        "studies/staff/shares_log.html",
        {
            "staff_section": "shares",
            "share": share,
            "contact": account_selectors.masked_contact(share),
            "events": account_selectors.share_events(share)[:500],
            "extend_form": ShareExtendForm(),
            "extend_limit": account_selectors.share_extend_limit(share),
            "locked": account_selectors.share_is_locked(share),
            "lost_studies": selectors.share_studies_lost(share),
        },
    )


@staff_required(User.Role.SHARER)
@require_POST
def share_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    share = _get_share(pk)
    account_services.share_revoke(share=share, by=_staff_user(request), request=request)
    messages.success(
        request,
        _("Share %(id)s is revoked: its link and code no longer open anything.") % {"id": pk},
    )
    return _back_to_log(share)


@staff_required(User.Role.SHARER)
@require_POST
def share_rearm(request: HttpRequest, pk: int) -> HttpResponse:
    """Retrieve again the studies a live share lost to the purge (or to a restored store)."""
    share = _get_share(pk)
    try:
        jobs = services.share_rearm(share=share, by=_staff_user(request), request=request)
    except ValidationError as exc:
        for message in exc.messages:
            messages.error(request, message)
        return _back_to_log(share)
    if jobs:
        messages.success(
            request,
            _("The portal is retrieving the share's studies again: follow it on the share page."),
        )
    else:
        messages.success(request, _("The portal already holds every study of this share."))
    return redirect("staff:share_detail", pk=share.pk)


@staff_required(User.Role.SHARER)
@require_POST
def share_extend(request: HttpRequest, pk: int) -> HttpResponse:
    share = _get_share(pk)
    form = ShareExtendForm(request.POST)
    if not form.is_valid():
        for error in form.errors.get("days", []):
            messages.error(request, str(error))
        return _back_to_log(share)
    try:
        share = account_services.share_extend(
            share=share, days=form.cleaned_data["days"], by=_staff_user(request), request=request
        )
    except ValidationError as exc:
        for message in exc.messages:
            messages.error(request, message)
        return _back_to_log(share)
    messages.success(
        request,
        _("Share %(id)s now expires on %(date)s.")
        % {"id": pk, "date": _short_datetime(share.expires_at)},
    )
    return _back_to_log(share)


def _short_datetime(value: datetime) -> str:
    return str(formats.date_format(timezone.localtime(value), "SHORT_DATETIME_FORMAT"))


@staff_required(User.Role.SHARER)
@require_POST
@recent_second_factor_required
def share_unlock(request: HttpRequest, pk: int) -> HttpResponse:
    share = _get_share(pk)
    account_services.share_unlock(share=share, by=_staff_user(request), request=request)
    messages.success(
        request,
        _("Share %(id)s is unlocked: its recipient may ask for a new code.") % {"id": pk},
    )
    return _back_to_log(share)


@staff_required(User.Role.SHARER)
@require_http_methods(["GET", "POST"])
def shares_revoke_patient(request: HttpRequest) -> HttpResponse:
    """GET: the live shares of a patient, listed before anything happens; POST: revoke them
    all (those live at that moment, so one created meanwhile goes too)."""
    source = request.POST if request.method == "POST" else request.GET
    form = PatientRevokeForm(source or None)
    shares = None
    if form.is_bound and form.is_valid():
        patient_id = form.cleaned_data["patient_id"]
        if request.method == "POST":
            ids = services.patient_shares_revoke(
                patient_id=patient_id, by=_staff_user(request), request=request
            )
            messages.success(
                request,
                ngettext(
                    "%(count)d share of patient %(patient)s is revoked.",
                    "%(count)d shares of patient %(patient)s are revoked.",
                    len(ids),
                )
                % {"count": len(ids), "patient": patient_id},
            )
            return redirect(f"{reverse('staff:shares')}?{_patient_query(patient_id)}")
        shares = list(selectors.patient_live_shares(patient_id))
    return render(
        request,
        "studies/staff/shares_revoke_patient.html",
        {
            "staff_section": "shares",
            "form": form,
            "shares": shares,
            "unknown": list(selectors.live_shares_of_unknown_patient()) if form.is_bound else [],
        },
    )


def _patient_query(patient_id: str) -> str:
    return urlencode({"patient": patient_id})


urlpatterns = [
    path("shares/", share_list, name="shares"),
    path("shares/revoke-patient/", shares_revoke_patient, name="shares_revoke_patient"),
    path("shares/<int:pk>/log/", share_log, name="share_log"),
    path("shares/<int:pk>/revoke/", share_revoke, name="share_revoke"),
    path("shares/<int:pk>/extend/", share_extend, name="share_extend"),
    path("shares/<int:pk>/unlock/", share_unlock, name="share_unlock"),
    path("shares/<int:pk>/rearm/", share_rearm, name="share_rearm"),
]
