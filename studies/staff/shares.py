"""The list of shares and their actions: revoke, extend, unlock, regenerate, resend; revoke
every share of a patient (placeholder: the workspace work replaces it)."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path

from accounts.models import User
from accounts.staff import staff_required


@staff_required(User.Role.SHARER)
def share_list(request: HttpRequest) -> HttpResponse:
    return render(request, "staff/placeholder.html", {"title": "Shares"})


urlpatterns = [
    path("shares/", share_list, name="shares"),
]
