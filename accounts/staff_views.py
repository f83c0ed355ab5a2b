"""Staff sign-in (placeholder views: the staff authentication work replaces them)."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_http_methods

from accounts.staff import staff_required


@require_http_methods(["GET", "POST"])
def login(request: HttpRequest) -> HttpResponse:
    return render(request, "staff/placeholder.html", {"title": "Sign in"})


@require_http_methods(["POST"])
def logout(request: HttpRequest) -> HttpResponse:
    return render(request, "staff/placeholder.html", {"title": "Sign out"})


@require_http_methods(["GET", "POST"])
def reauth(request: HttpRequest) -> HttpResponse:
    return render(request, "staff/placeholder.html", {"title": "Confirm it is you"})


@staff_required()
def security(request: HttpRequest) -> HttpResponse:
    return render(request, "staff/placeholder.html", {"title": "Your security"})
