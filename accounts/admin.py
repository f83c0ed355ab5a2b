from django.contrib import admin
from django.contrib.auth.admin import UserAdmin

from accounts.models import User


@admin.register(User)
class PortalUserAdmin(UserAdmin):
    list_display = ("username", "email", "role", "is_active", "last_login")
    fieldsets = (*UserAdmin.fieldsets, ("Portal", {"fields": ("role",)}))  # type: ignore[misc]
