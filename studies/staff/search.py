"""Search across the PACS nodes and the local archive (placeholder: the workspace work
replaces it)."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path

from accounts.models import User
from accounts.staff import staff_required


@staff_required(User.Role.SHARER)
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "staff/placeholder.html", {"title": "Search"})


urlpatterns = [
    path("", home, name="home"),
]
