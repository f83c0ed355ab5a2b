"""Reads for recipients: what the session's share lets them see."""

from dataclasses import dataclass, field

from django.db.models import F, QuerySet

from accounts.models import Share
from dicomweb.archive import ArchiveInstance
from dicomweb.documents import Kind, document_kind
from studies.models import Instance, Study
from studies.store import instance_file


@dataclass
class ViewerDocument:
    """An instance the viewer opens for what it is: a PDF, or a structured report as text."""

    sop_instance_uid: str
    kind: Kind


@dataclass
class ViewerSeries:
    series_instance_uid: str
    modality: str
    number: int | None
    description: str
    # Instances of the series the share grants (images or not).
    instances: int = 0
    # What the viewer pages through, in display order: (SOP Instance UID, frame number), one
    # entry per frame of each instance that has pixels (Rows present, PS3.3 C.7.6.3).
    slices: list[tuple[str, int]] = field(default_factory=list)
    # Its instances without pixels that the viewer opens (dicomweb.documents), and how many
    # others it cannot show (they are in the download).
    documents: list[ViewerDocument] = field(default_factory=list)
    others: int = 0

    @property
    def displayable(self) -> bool:
        """Whether the viewer can show it: a structured report, an encapsulated PDF or a key
        object selection has no pixels to render."""
        return bool(self.slices)


@dataclass
class ViewerStudy:
    study_instance_uid: str
    patient_name: str
    study_date: str
    description: str
    series: list[ViewerSeries] = field(default_factory=list)

    @property
    def image_count(self) -> int:
        return sum(s.instances for s in self.series)


def viewer_studies(share: Share) -> list[ViewerStudy]:
    """The share's studies as the viewer pages through them, newest first: series by series
    number, their instances by instance number, restricted to what the share grants; the
    instances without pixels as documents to open, or others to download. One query, whatever
    the number of instances. Empty while the store does not hold the study
    yet."""
    rows = (
        share_instances(share)
        .order_by(
            # Newest study first: the current exam, then the priors it is compared with.
            F("series__study__study_date").desc(nulls_last=True),
            "series__study_id",
            F("series__series_number").asc(nulls_last=True),
            "series_id",
            F("instance_number").asc(nulls_last=True),
            "pk",
        )
        .values_list(
            "series__study__study_instance_uid",
            "series__study__patient_name",
            "series__study__study_date",
            "series__study__study_description",
            "series__series_instance_uid",
            "series__modality",
            "series__series_number",
            "series__series_description",
            "sop_instance_uid",
            "rows",
            "number_of_frames",
            "sop_class_uid",
        )
    )
    studies: dict[str, ViewerStudy] = {}
    series: dict[str, ViewerSeries] = {}
    for (
        study_uid,
        patient_name,
        study_date,
        study_description,
        series_uid,
        modality,
        series_number,
        series_description,
        sop_uid,
        image_rows,
        frames,
        sop_class_uid,
    ) in rows:
        study = studies.get(study_uid)
        if study is None:
            study = studies[study_uid] = ViewerStudy(
                study_instance_uid=study_uid,
                patient_name=patient_name,
                study_date=study_date,
                description=study_description,
            )
        current = series.get(series_uid)
        if current is None:
            current = series[series_uid] = ViewerSeries(
                series_instance_uid=series_uid,
                modality=modality,
                number=series_number,
                description=series_description,
            )
            study.series.append(current)
        current.instances += 1
        if image_rows:
            current.slices.extend((sop_uid, n) for n in range(1, (frames or 1) + 1))
            continue
        kind = document_kind(sop_class_uid)
        if kind is None:
            current.others += 1
        else:
            current.documents.append(ViewerDocument(sop_instance_uid=sop_uid, kind=kind))
    return list(studies.values())


def share_study_uids(share: Share) -> list[str]:
    """The Study Instance UIDs a share grants (`Share.study_uids`)."""
    return share.study_uids


def share_instances(share: Share) -> QuerySet[Instance]:
    """Every indexed instance the share grants: its studies, restricted to its series when it
    names some. The one scope of every DICOMweb answer and download."""
    # Only studies in the store (`StudyQuerySet.in_store`): one still being retrieved shows
    # nothing rather than part of itself.
    studies = Study.objects.in_store().filter(study_instance_uid__in=share_study_uids(share))
    instances = Instance.objects.filter(series__study__in=studies.values("pk"))
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
