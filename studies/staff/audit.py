"""The audit log (auditors, administrators): filters and CSV export (placeholder: the
workspace work replaces it)."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path

from accounts.models import User
from accounts.staff import staff_required


@staff_required(User.Role.AUDITOR)
def audit_log(request: HttpRequest) -> HttpResponse:
    return render(request, "staff/placeholder.html", {"title": "Audit log"})


urlpatterns = [
    path("audit/", audit_log, name="audit"),
]
