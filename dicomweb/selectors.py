"""Reads for recipients: what the session's share lets them see."""

from dataclasses import dataclass, field

from django.db.models import Count, QuerySet

from accounts.models import Share
from dicomweb.archive import ArchiveInstance
from studies.models import Instance, Series, Study
from studies.store import instance_file


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


def archive_instances(instances: QuerySet[Instance]) -> list[ArchiveInstance]:
    """The index's records of granted instances, as the study download packs them."""
    rows = instances.select_related("series__study").order_by(
        "series__series_number", "series_id", "instance_number", "pk"
    )
    return [
        ArchiveInstance(
            path=instance_file(i),
            size=i.size,
            patient_name=i.series.study.patient_name,
            patient_id=i.series.study.patient_id,
            study_instance_uid=i.series.study.study_instance_uid,
            study_date=i.series.study.study_date,
            study_time=i.series.study.study_time,
            study_description=i.series.study.study_description,
            accession_number=i.series.study.accession_number,
            series_instance_uid=i.series.series_instance_uid,
            series_number=i.series.series_number,
            modality=i.series.modality,
            series_description=i.series.series_description,
            sop_class_uid=i.sop_class_uid,
            sop_instance_uid=i.sop_instance_uid,
            instance_number=i.instance_number,
            transfer_syntax_uid=i.transfer_syntax_uid,
        )
        for i in rows
    ]
