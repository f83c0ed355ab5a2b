from typing import Any

from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.utils.translation import gettext_lazy as _
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts import selectors, services, staff_auth
from accounts.models import (
    AuditEvent,
    PhysicianPasskey,
    RecipientAccess,
    Share,
    SharedStudy,
    User,
)

# django-otp's TOTP device admin would let an admin session read any staff member's key, add
# a device with a key of its choosing or remove someone's last one, all unaudited: second
# factors are managed on "Your security", through accounts.staff_auth, and nowhere else.
if admin.site.is_registered(TOTPDevice):
    admin.site.unregister(TOTPDevice)


@admin.register(User)
class PortalUserAdmin(UserAdmin):
    list_display = ("username", "email", "role", "is_active", "locked_at", "last_login")
    list_filter = (*UserAdmin.list_filter, "role")
    fieldsets = (  # type: ignore[misc]
        *UserAdmin.fieldsets,
        ("Portal", {"fields": ("role", "locked_at", "second_factor_failures")}),
    )
    readonly_fields = ("locked_at", "second_factor_failures")
    actions = ["unlock"]

    @admin.action(description=_("Unlock the selected staff accounts"))
    def unlock(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        """The only way out of the hard lock after too many wrong second factors."""
        for user in queryset:
            staff_auth.staff_unlock(user=user, by=request.user, request=request)  # type: ignore[arg-type]
        messages.success(request, _("Unlocked."))


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


@admin.register(RecipientAccess)
class RecipientAccessAdmin(admin.ModelAdmin):
    """The emergency close of recipient access: one page with the state, a message and a
    button (the same services as `manage.py recipients close|open`)."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            if not self.has_change_permission(request):
                raise PermissionDenied
            user: Any = request.user
            if request.POST.get("action") == "close":
                message = request.POST.get("message", "")
                services.recipients_close(message=message, by=user, request=request)
                messages.warning(request, _("Recipient access is closed."))
            elif request.POST.get("action") == "open":
                services.recipients_open(by=user, request=request)
                messages.success(request, _("Recipient access is open."))
            return HttpResponseRedirect(request.path)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": _("Recipient access"),
            "state": selectors.recipient_access(),
            "can_change": self.has_change_permission(request),
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/accounts/recipient_access.html", context)


@admin.register(PhysicianPasskey)
class PhysicianPasskeyAdmin(admin.ModelAdmin):
    """Physicians' passkeys: staff look and delete (the physician is told by email); they are
    only ever added by the physician, after an emailed code."""

    list_display = ("id", "email", "created_at", "last_used_at", "usable")
    search_fields = ("email",)
    fields = ("email", "created_at", "last_used_at", "enrolled_with", "sign_count")
    readonly_fields = fields
    actions = ["delete_passkeys"]

    @admin.display(description=_("usable"), boolean=True)
    def usable(self, obj: PhysicianPasskey) -> bool:
        return selectors.passkey_is_usable(obj)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_actions(self, request: HttpRequest) -> Any:
        # Django's bulk delete would skip the audit event and the email.
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def delete_model(self, request: HttpRequest, obj: PhysicianPasskey) -> None:
        services.passkey_delete(passkey=obj, by=request.user, request=request)  # type: ignore[arg-type]

    @admin.action(description=_("Delete the selected passkeys"), permissions=["delete"])
    def delete_passkeys(self, request: HttpRequest, queryset: QuerySet[PhysicianPasskey]) -> None:
        for passkey in queryset:
            services.passkey_delete(passkey=passkey, by=request.user, request=request)  # type: ignore[arg-type]
        messages.success(request, _("Deleted; each physician was told by email."))
