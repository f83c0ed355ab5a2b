"""The form of a PACS node (add and edit). The rules (a valid AE title, a port, a DICOMweb URL
for WADO-RS retrieval) are the services' (studies.services.pacs_node_create/update): their
errors come back on the fields."""

from django import forms
from django.utils.translation import gettext_lazy as _

from studies.models import PacsNode


class PacsNodeForm(forms.Form):
    name = forms.SlugField(
        label=_("Name"),
        max_length=64,
        help_text=_("A short name: letters, digits, hyphens, e.g. main-pacs."),
    )
    ae_title = forms.CharField(
        label=_("AE title"), max_length=16, help_text=_("The node's own AE title.")
    )
    host = forms.CharField(label=_("Host"), max_length=255)
    port = forms.IntegerField(label=_("Port"), min_value=1, max_value=65535)
    dicomweb_url = forms.URLField(
        assume_scheme="https",
        label=_("DICOMweb URL"),
        required=False,
        help_text=_("Optional; needed for WADO-RS retrieval."),
    )
    retrieve_method = forms.ChoiceField(
        label=_("Retrieve method"),
        choices=PacsNode.Retrieve.choices,
        initial=PacsNode.Retrieve.MOVE,
    )

    @classmethod
    def of(cls, node: PacsNode) -> "PacsNodeForm":
        return cls(
            initial={
                "name": node.name,
                "ae_title": node.ae_title,
                "host": node.host,
                "port": node.port,
                "dicomweb_url": node.dicomweb_url,
                "retrieve_method": node.retrieve_method,
            }
        )
