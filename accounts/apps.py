from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps
from django.utils.translation import gettext_lazy as _


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = _("Accounts and shares")

    def ready(self) -> None:
        from accounts import checks  # noqa: F401  (registers the system checks)


class PortalAdminConfig(admin_apps.AdminConfig):
    """Django's admin app with the portal's site (behind the second factor) as its default."""

    # Named in INSTALLED_APPS; not the configuration Django picks for `accounts`.
    default = False
    default_site = "accounts.admin_site.PortalAdminSite"
