"""Staff sign-in, second factors and re-authentication, under /staff/ (namespace "staff",
shared with the workspace's URLs in studies.staff.urls; portal.urls joins them)."""

from django.urls import path

from accounts import staff_views

urlpatterns = [
    path("login/", staff_views.login, name="login"),
    path("logout/", staff_views.logout, name="logout"),
    path("reauth/", staff_views.reauth, name="reauth"),
    path("security/", staff_views.security, name="security"),
]
