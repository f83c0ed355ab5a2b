"""Reads of the studies domain."""

from studies.models import Study


def study_in_store(study_instance_uid: str) -> bool:
    """Whether the store holds the study (see `StudyQuerySet.in_store`)."""
    return Study.objects.in_store().filter(study_instance_uid=study_instance_uid).exists()
