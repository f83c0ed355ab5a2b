"""Display helpers of the staff pages: DICOM dates and person names as people read them."""

from django import template

from studies.search import LOCAL, StudyHit
from studies.staff import sharing

register = template.Library()


@register.filter
def dicom_date(value: str) -> str:
    """A DA value (YYYYMMDD) as DD/MM/YYYY; anything else as it is."""
    value = (value or "").strip()
    if len(value) == 8 and value.isdigit():
        return f"{value[6:8]}/{value[4:6]}/{value[0:4]}"
    return value


@register.filter
def person_name(value: str) -> str:
    """A PN value (FAMILY^Given^Middle^Prefix^Suffix, PS3.5 6.2) as "FAMILY Given Middle"."""
    parts = [part.strip() for part in (value or "").split("=")[0].split("^")]
    family, given = ([*parts, "", ""])[:2]
    rest = [p for p in parts[2:3] if p]
    return " ".join(p for p in [family.upper(), given, *rest] if p)


@register.simple_tag
def share_new_url(hit: StudyHit) -> str:
    """The share form for a study: from the first PACS node that has it (priors are
    searched there, and what the store lacks is retrieved from it), else the local archive."""
    nodes = hit.node_sources
    return sharing.share_new_url(hit.study_instance_uid, nodes[0] if nodes else LOCAL)


@register.filter
def code_groups(code: str) -> list[str]:
    """An access code (K7RM-9XQ2-…) in its groups of four, to print them apart."""
    return [group for group in (code or "").split("-") if group]
