from typing import Any

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from accounts import selectors, services
from accounts.models import AuditEvent, Share, SharedStudy, User


@admin.register(User)
class PortalUserAdmin(UserAdmin):
    list_display = ("username", "email", "role", "is_active", "last_login")
    fieldsets = (*UserAdmin.fieldsets, ("Portal", {"fields": ("role",)}))  # type: ignore[misc]


class SharedStudyInline(admin.TabularInline):
    model = SharedStudy
    fields = ("study_instance_uid",)
    readonly_fields = ("study_instance_uid",)
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Share)
class ShareAdmin(admin.ModelAdmin):
    """Shares are created through the share form or command (the only moment the link and code
    exist); here staff look, revoke and unlock."""

    list_display = ("id", "study_instance_uid", "recipient", "channel", "expires_at", "status")
    list_filter = ("recipient", "channel")
    search_fields = ("study_instance_uid", "shared_studies__study_instance_uid")
    readonly_fields = [f.name for f in Share._meta.fields]
    inlines = [SharedStudyInline]
    actions = ["revoke", "unlock"]

    @admin.display(description=_("status"))
    def status(self, obj: Share) -> str:
        locked = _(" (locked)") if selectors.share_is_locked(obj) else ""
        return f"{selectors.share_status(obj)}{locked}"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description=_("Revoke the selected shares"))
    def revoke(self, request: HttpRequest, queryset: QuerySet[Share]) -> None:
        for share in queryset:
            services.share_revoke(share=share, by=request.user, request=request)  # type: ignore[arg-type]
        messages.success(request, _("Revoked."))

    @admin.action(description=_("Unlock the selected shares"))
    def unlock(self, request: HttpRequest, queryset: QuerySet[Share]) -> None:
        for share in queryset:
            services.share_unlock(share=share, by=request.user, request=request)  # type: ignore[arg-type]
        messages.success(request, _("Unlocked."))


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only: the audit log is append-only."""

    list_display = ("at", "action", "share", "actor", "ip_address")
    list_filter = ("action",)
    date_hierarchy = "at"
    readonly_fields = [f.name for f in AuditEvent._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
