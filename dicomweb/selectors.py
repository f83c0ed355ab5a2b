"""Reads for recipients: what the session's share lets them see."""

from dataclasses import dataclass, field

from django.db.models import Count, QuerySet

from accounts.models import Share
from studies.models import Instance, Series, Study


@dataclass(frozen=True)
class SeriesSummary:
    series_instance_uid: str
    modality: str
    number: int | None
    description: str
    images: int


@dataclass(frozen=True)
class StudySummary:
    study_instance_uid: str
    patient_name: str
    study_date: str
    description: str
    series: list[SeriesSummary] = field(default_factory=list)

    @property
    def image_count(self) -> int:
        return sum(s.images for s in self.series)


def viewer_study(share: Share) -> StudySummary | None:
    """The share's study from the index, restricted to the share's series; None while the store
    does not hold it yet."""
    study = Study.objects.filter(study_instance_uid=share.study_instance_uid).first()
    if study is None:
        return None
    series = Series.objects.filter(study=study).annotate(images=Count("instances"))
    if share.series_instance_uids:
        series = series.filter(series_instance_uid__in=share.series_instance_uids)
    summaries = [
        SeriesSummary(
            series_instance_uid=s.series_instance_uid,
            modality=s.modality,
            number=s.series_number,
            description=s.series_description,
            images=s.images,
        )
        for s in series
        if s.images
    ]
    if not summaries:
        return None
    return StudySummary(
        study_instance_uid=study.study_instance_uid,
        patient_name=study.patient_name,
        study_date=study.study_date,
        description=study.study_description,
        series=summaries,
    )


def share_study_uids(share: Share) -> list[str]:
    """The Study Instance UIDs a share grants (`Share.study_uids`)."""
    return share.study_uids


def share_instances(share: Share) -> QuerySet[Instance]:
    """Every indexed instance the share grants: its studies, restricted to its series when it
    names some. The one scope of every DICOMweb answer and download."""
    instances = Instance.objects.filter(
        series__study__study_instance_uid__in=share_study_uids(share)
    )
    if share.series_instance_uids:
        instances = instances.filter(series__series_instance_uid__in=share.series_instance_uids)
    return instances
