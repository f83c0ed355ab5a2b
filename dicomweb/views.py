"""What recipients get. For now the landing page of a recipient session: the study's summary.
(The image viewer, DICOMweb and download build on the same share check.)"""

import datetime

from django.http import HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from accounts import access, services
from accounts.models import AuditEvent
from dicomweb import selectors


def _dicom_date(value: str) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        return None


def _person_name(value: str) -> str:
    # DICOM PN: Family^Given^Middle^Prefix^Suffix, with "=" separating ideographic forms.
    family, _sep, rest = value.split("=", 1)[0].partition("^")
    given = rest.split("^", 1)[0]
    return " ".join(part for part in (given, family) if part)


@require_GET
@access.recipient_required
def viewer(request: access.RecipientRequest) -> HttpResponse:
    share = request.share
    study = selectors.viewer_study(share)
    if study is not None and not request.session.get("recipient.viewed"):
        # One event per session, not one per page load.
        services.audit(AuditEvent.Action.VIEW, request=request, share=share)
        request.session["recipient.viewed"] = True
    return render(
        request,
        "dicomweb/viewer.html",
        {
            "share": share,
            "study": study,
            "patient_name": _person_name(study.patient_name) if study else "",
            "study_date": _dicom_date(study.study_date) if study else None,
        },
    )
