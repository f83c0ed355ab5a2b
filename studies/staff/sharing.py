"""The share form, the share page with live retrieval progress, and the printed handout."""

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
