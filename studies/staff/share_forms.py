"""Forms of the shares list and of the actions on a share."""

from django import forms
from django.conf import settings
from django.utils.translation import gettext_lazy as _

from studies.selectors import ShareStatus


class ShareFilterForm(forms.Form):
    status = forms.ChoiceField(
        label=_("Status"),
        choices=[("", _("Any status")), *ShareStatus.choices],
        required=False,
    )
    patient = forms.CharField(
        label=_("Patient"),
        help_text=_("Patient ID, or part of the name"),
        max_length=64,
        required=False,
    )


class ShareExtendForm(forms.Form):
    days = forms.IntegerField(
        label=_("Extend by (days)"),
        min_value=1,
        max_value=settings.SHARE_MAX_DAYS,
        initial=7,
    )


class PatientRevokeForm(forms.Form):
    patient_id = forms.CharField(
        label=_("Patient ID"),
        help_text=_("Exactly as the PACS records it."),
        max_length=64,
    )
