"""The audit log (auditors, administrators): events filtered by patient, share, member of
staff, kind and dates, page by page, and exported as CSV with the same writer as
`manage.py audit export` (accounts.audit). The export is itself an audit event."""

import json
from datetime import datetime, time, timedelta
from typing import Any

from django import forms
from django.core.paginator import Paginator
from django.db.models import Max, QuerySet
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.shortcuts import render
from django.urls import path
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.translation import gettext_lazy as _

from accounts import audit as audit_trail
from accounts import selectors as account_selectors
from accounts import services as account_services
from accounts.models import AuditEvent, User
from accounts.staff import staff_required
from studies.selectors import study_uids_of_patient

PAGE_SIZE = 50


class AuditFilterForm(forms.Form):
    patient = forms.CharField(
        label=_("Patient"),
        help_text=_("Patient ID, or words of the name"),
        max_length=64,
        required=False,
    )
    share = forms.IntegerField(label=_("Share number"), min_value=1, required=False)
    staff = forms.CharField(label=_("Staff user name"), max_length=150, required=False)
    action = forms.ChoiceField(
        label=_("Event"),
        choices=[("", _("Any event")), *AuditEvent.Action.choices],
        required=False,
    )
    since = forms.DateField(
        label=_("From"), required=False, widget=forms.DateInput(attrs={"type": "date"})
    )
    until = forms.DateField(
        label=_("To (inclusive)"), required=False, widget=forms.DateInput(attrs={"type": "date"})
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        if since and until and until < since:
            self.add_error("until", _("The end date is before the start date."))
        return data


def _day_start(day: Any) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))


def _filtered(form: AuditFilterForm) -> QuerySet[AuditEvent]:
    data = form.cleaned_data
    patient = data.get("patient", "").strip()
    return account_selectors.audit_events(
        share_id=data.get("share"),
        actor_username=data.get("staff", "").strip(),
        action=data.get("action", ""),
        since=_day_start(data["since"]) if data.get("since") else None,
        until=_day_start(data["until"] + timedelta(days=1)) if data.get("until") else None,
        study_uids=study_uids_of_patient(patient) if patient else None,
    )


def _filters_used(form: AuditFilterForm) -> dict[str, Any]:
    """The filters of an export, for its audit event. A patient's name never enters the trail:
    the studies it matched stand for it."""
    used: dict[str, Any] = {
        key: str(value)
        for key, value in form.cleaned_data.items()
        if value not in ("", None) and key != "patient"
    }
    patient = form.cleaned_data.get("patient", "").strip()
    if patient:
        used["patient_studies"] = list(study_uids_of_patient(patient)[:50])
    return used


def _details(event: AuditEvent) -> list[tuple[str, str]]:
    """An event's details as "key: value" lines (lists and numbers as JSON)."""
    return [
        (key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        for key, value in sorted(event.detail.items())
    ]


@staff_required(User.Role.AUDITOR)
def audit_log(request: HttpRequest) -> HttpResponse:
    form = AuditFilterForm(request.GET)  # bound even when empty: no filter is valid too
    events: QuerySet[AuditEvent] = AuditEvent.objects.none()
    status = 200
    if form.is_valid():
        events = _filtered(form)
    else:
        status = 400
    page = Paginator(events, PAGE_SIZE).get_page(request.GET.get("page"))
    rows = [(event, _details(event)) for event in page]
    query = request.GET.copy()
    query.pop("page", None)
    response = render(
        request,
        "studies/staff/audit_log.html",
        {
            "staff_section": "audit",
            "form": form,
            "page": page,
            "rows": rows,
            "query": query.urlencode(),
        },
        status=status,
    )
    add_never_cache_headers(response)
    return response


@staff_required(User.Role.AUDITOR)
def audit_export_csv(request: HttpRequest) -> HttpResponseBase:
    form = AuditFilterForm(request.GET)
    if not form.is_valid():
        refused = render(
            request,
            "studies/staff/audit_log.html",
            {"staff_section": "audit", "form": form, "page": None, "query": ""},
            status=400,
        )
        add_never_cache_headers(refused)
        return refused
    # Oldest first, as `audit export` writes them; what exists now, not what comes meanwhile.
    events = _filtered(form).order_by("pk")
    last = events.aggregate(last=Max("pk"))["last"] or 0
    events = events.filter(pk__lte=last)
    account_services.audit(
        AuditEvent.Action.AUDIT_EXPORTED,
        request=request,
        format="csv",
        events=events.count(),
        filters=_filters_used(form),
    )
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    # Streamed: a year of events need not fit in memory.
    response = StreamingHttpResponse(
        audit_trail.csv_lines(events.iterator(chunk_size=2000)),
        content_type="text/csv; charset=utf-8",
    )
    response["Content-Disposition"] = f'attachment; filename="audit-{stamp}.csv"'
    add_never_cache_headers(response)
    return response


urlpatterns = [
    path("audit/", audit_log, name="audit"),
    path("audit/export.csv", audit_export_csv, name="audit_export"),
]
