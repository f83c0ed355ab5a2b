from django.contrib.auth.models import AbstractUser
from django.db import models
from django.utils.translation import gettext_lazy as _


class User(AbstractUser):
    """A member of hospital staff. Recipients (patients, physicians) are not users."""

    class Role(models.TextChoices):
        SHARER = "sharer", _("Sharer")
        AUDITOR = "auditor", _("Auditor")
        ADMIN = "admin", _("Administrator")

    role = models.CharField(_("role"), max_length=16, choices=Role.choices, default=Role.SHARER)
