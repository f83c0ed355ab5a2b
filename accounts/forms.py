from typing import Any

from captcha.fields import CaptchaField
from django import forms
from django.utils.translation import gettext_lazy as _


class AccessCodeForm(forms.Form):
    code = forms.CharField(
        label=_("Access code"),
        help_text=_("The code printed on your letter, for example K7RM-9XQ2-HT4P-2B6D."),
        max_length=64,
        strip=True,
        widget=forms.TextInput(
            attrs={
                "autocomplete": "off",
                "autocapitalize": "characters",
                "spellcheck": "false",
                "autocorrect": "off",
                "autofocus": True,
            }
        ),
    )

    def __init__(self, *args: Any, captcha: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if captcha:
            # After a few failures from one address: people pass, scripts are slowed down.
            self.fields["captcha"] = CaptchaField(
                label=_("Type the characters in the picture"),
                help_text=_("This check appears after several wrong codes."),
            )


class OtpForm(forms.Form):
    otp = forms.CharField(
        label=_("One-time code"),
        help_text=_("6 digits."),
        max_length=16,
        strip=True,
        widget=forms.TextInput(
            attrs={
                "autocomplete": "one-time-code",
                "inputmode": "numeric",
                "pattern": "[0-9 ]*",
                "autofocus": True,
            }
        ),
    )
