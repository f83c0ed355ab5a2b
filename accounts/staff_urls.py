"""Staff sign-in, second factors and re-authentication, under /staff/ (namespace "staff",
shared with the workspace's URLs in studies.staff.urls; portal.urls joins them)."""

from django.urls import path

from accounts import staff_views

urlpatterns = [
    path("login/", staff_views.login, name="login"),
    path("login/second-factor/", staff_views.second_factor, name="second_factor"),
    path("login/passkey/options/", staff_views.passkey_options, name="passkey_options"),
    path("login/passkey/", staff_views.passkey_verify, name="passkey_verify"),
    path("enrol/", staff_views.enrol, name="enrol"),
    path("logout/", staff_views.logout, name="logout"),
    path("reauth/", staff_views.reauth, name="reauth"),
    path("security/", staff_views.security, name="security"),
    path("security/password/", staff_views.password_change, name="password_change"),
    path(
        "security/recovery-codes/",
        staff_views.recovery_codes_regenerate,
        name="recovery_codes",
    ),
    path(
        "security/devices/<str:kind>/<int:pk>/remove/",
        staff_views.device_remove,
        name="device_remove",
    ),
    path(
        "security/passkeys/options/",
        staff_views.passkey_add_options,
        name="passkey_add_options",
    ),
    path("security/passkeys/", staff_views.passkey_add, name="passkey_add"),
]
