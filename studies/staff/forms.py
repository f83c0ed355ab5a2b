"""Forms of the staff search and of the share form. They check what staff typed and turn it
into the arguments of selectors and services; the rules themselves (a valid contact, the
lifetime ceiling) are the services', which the forms call or mirror in their messages."""

from typing import Any

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils.translation import get_language
from django.utils.translation import gettext_lazy as _

from accounts import services as account_services
from accounts.models import Share
from studies.search import StudyQuery

# What the modality list offers (PS3.3 C.7.3.1.1.1's common ones); the search matches
# ModalitiesInStudy, so a study with a CT and an SR series is found under either.
MODALITIES = ("CT", "MR", "CR", "DX", "US", "MG", "PT", "NM", "XA", "RF", "OT", "SR")


class DateInput(forms.DateInput):
    input_type = "date"


class SearchForm(forms.Form):
    patient_id = forms.CharField(label=_("Patient ID"), max_length=64, required=False)
    patient_name = forms.CharField(
        label=_("Patient name"),
        help_text=_("Family name first, then given name; the beginning of each is enough."),
        max_length=64,
        required=False,
    )
    birth_date = forms.DateField(label=_("Birth date"), required=False, widget=DateInput)
    accession_number = forms.CharField(label=_("Accession number"), max_length=16, required=False)
    date_from = forms.DateField(label=_("Study date from"), required=False, widget=DateInput)
    date_to = forms.DateField(label=_("Study date to"), required=False, widget=DateInput)
    modality = forms.ChoiceField(
        label=_("Modality"),
        required=False,
        choices=[("", _("Any"))] + [(m, m) for m in MODALITIES],
    )

    def query(self) -> StudyQuery:
        data = self.cleaned_data
        return StudyQuery(
            patient_id=data["patient_id"],
            patient_name=data["patient_name"],
            birth_date=data["birth_date"],
            accession_number=data["accession_number"],
            date_from=data["date_from"],
            date_to=data["date_to"],
            modality=data["modality"],
        )


def _days_help() -> str:
    return str(
        _(
            "Leave empty for the usual %(patient)d days for a patient, %(physician)d for a "
            "physician; %(max)d at most."
        )
        % {
            "patient": settings.SHARE_DAYS_PATIENT,
            "physician": settings.SHARE_DAYS_PHYSICIAN,
            "max": settings.SHARE_MAX_DAYS,
        }
    )


class ShareForm(forms.Form):
    priors = forms.MultipleChoiceField(
        label=_("Earlier studies to compare with"),
        required=False,
        widget=forms.CheckboxSelectMultiple,
    )
    recipient = forms.ChoiceField(
        label=_("Share with"),
        choices=Share.Recipient.choices,
        initial=Share.Recipient.PATIENT,
        widget=forms.RadioSelect,
    )
    channel = forms.ChoiceField(
        label=_("One-time codes are sent by"),
        choices=Share.Channel.choices,
        initial=Share.Channel.SMS,
        widget=forms.RadioSelect,
        help_text=_("Referring physicians receive theirs by email."),
    )
    phone = forms.CharField(
        label=_("Mobile phone"),
        required=False,
        max_length=32,
        widget=forms.TextInput(attrs={"type": "tel", "autocomplete": "off", "inputmode": "tel"}),
    )
    email = forms.EmailField(
        label=_("Email address"),
        required=False,
        max_length=254,
        widget=forms.EmailInput(attrs={"autocomplete": "off"}),
    )
    days = forms.IntegerField(
        label=_("Days the share lasts"),
        required=False,
        min_value=1,
        widget=forms.NumberInput(attrs={"inputmode": "numeric"}),
    )
    allow_download = forms.BooleanField(
        label=_("The recipient may download the images"), required=False, initial=True
    )
    note = forms.CharField(
        label=_("Note for the recipient"),
        help_text=_(
            "Printed on the handout and written in the email with the link. 500 characters at most."
        ),
        required=False,
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3}),
    )
    language = forms.ChoiceField(
        label=_("Language of the handout and messages"), choices=settings.LANGUAGES
    )
    send_now = forms.BooleanField(
        label=_("Send the link to the recipient now"),
        help_text=_("By text message or email, to the contact above."),
        required=False,
        initial=False,
    )

    def __init__(self, *args: Any, prior_choices: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        priors = self.fields["priors"]
        assert isinstance(priors, forms.MultipleChoiceField)
        priors.choices = prior_choices
        days = self.fields["days"]
        assert isinstance(days, forms.IntegerField)
        days.help_text = _days_help()
        # Read at each form (tests and sites may change the ceiling), hence not in the field.
        days.validators.append(_at_most_max_days)
        days.widget.attrs["max"] = settings.SHARE_MAX_DAYS
        self.fields["language"].initial = (get_language() or settings.LANGUAGE_CODE)[:2]
        # Per-field help ids, so that the errors and help read with the field (WCAG 3.3.1).
        for name, field in self.fields.items():
            described = []
            if field.help_text:
                described.append(f"id_{name}_help")
            if self.is_bound and name in self.errors:
                described.append(f"id_{name}_error")
            if described:
                field.widget.attrs["aria-describedby"] = " ".join(described)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        recipient, channel = data.get("recipient"), data.get("channel")
        if recipient == Share.Recipient.PHYSICIAN and channel == Share.Channel.SMS:
            self.add_error("channel", _("Physicians receive their codes by email."))
            return data
        if channel == Share.Channel.SMS:
            phone = data.get("phone", "")
            if not phone:
                self.add_error("phone", _("Type the mobile number the codes are sent to."))
            else:
                try:
                    data["contact"] = account_services.phone_normalize(phone)
                except ValidationError as exc:
                    for message in exc.message_dict.get("contact", []):
                        self.add_error("phone", message)
        elif channel == Share.Channel.EMAIL:
            if not data.get("email"):
                if "email" not in self.errors:
                    self.add_error("email", _("Type the email address the codes are sent to."))
            else:
                data["contact"] = data["email"]
        return data

    def contact_field(self) -> str:
        return "phone" if self.cleaned_data.get("channel") == Share.Channel.SMS else "email"


def _at_most_max_days(value: int) -> None:
    if value > settings.SHARE_MAX_DAYS:
        raise ValidationError(
            _("A share lasts %(max)d days at most."),
            code="max_value",
            params={"max": settings.SHARE_MAX_DAYS},
        )
