"""DICOM values as people read them, in templates: `{% load dicom_display %}`."""

from django import template

from studies import dicom

register = template.Library()


@register.filter
def person_name(value: object) -> str:
    """A DICOM PN ("DUPONT^Marie") as it is written: "Marie DUPONT"."""
    return dicom.display_name(value) if value else ""
