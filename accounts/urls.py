from django.urls import path

from accounts import views

app_name = "accounts"

urlpatterns = [
    path("", views.home, name="home"),
    path("s/", views.link_page, name="link_page"),
    # Links issued before the fragment form (`/s/#<token>`).
    path("s/<str:token>", views.link, name="link"),
    path("access/", views.access_code, name="access"),
    path("access/verify", views.verify, name="verify"),
    path("access/logout", views.logout, name="logout"),
    path("access/history", views.history, name="history"),
    path("access/locked", views.locked, name="locked"),
    path("access/passkey", views.passkey_offer, name="passkey_offer"),
    path(
        "access/passkey/register/options",
        views.passkey_register_options,
        name="passkey_register_options",
    ),
    path("access/passkey/register", views.passkey_register, name="passkey_register"),
    path("access/passkey/login/options", views.passkey_login_options, name="passkey_login_options"),
    path("access/passkey/login", views.passkey_login, name="passkey_login"),
]
