"""PACS nodes (administrators): add, edit, remove, C-ECHO, and the check of the way back
(placeholder: the workspace work replaces it)."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path

from accounts.models import User
from accounts.staff import staff_required


@staff_required(User.Role.ADMIN)
def node_list(request: HttpRequest) -> HttpResponse:
    return render(request, "staff/placeholder.html", {"title": "PACS nodes"})


urlpatterns = [
    path("nodes/", node_list, name="nodes"),
]
