"""QIDO-RS (PS3.18 §10.6): search for the studies, series and instances a share grants.

Everything a search returns comes from the index, never from the files: one query for the
matches and one for their counts, whatever the size of the studies. Matching follows PS3.4
C.2.2.2: single values, `*`/`?` wildcards on text (case-insensitive for person names), UID
lists, date ranges. A matching key the index cannot match on is ignored, with the Warning
header PS3.18 §10.6.1.3.1 asks for; a malformed one is an error with its reason.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from django.db.models import Count, Q, QuerySet
from django.http import QueryDict
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from studies.models import Instance, Series, Study


class Level(StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


class QueryError(ValueError):
    """A malformed search: the message says what is wrong, for a 400 answer."""


class Match(StrEnum):
    TEXT = "text"  # single value or wildcards
    NAME = "name"  # the same, case-insensitive (person names)
    UIDS = "uids"  # a list of UIDs
    DATE = "date"  # a date or a range
    NUMBER = "number"
    MODALITY = "modality"  # ModalitiesInStudy: any series of the study


@dataclass(frozen=True)
class Key:
    lookup: str  # from Instance
    match: Match
    level: Level


# The matching keys the index answers (PS3.18 Table 10.6.1-5), by tag.
_KEYS: dict[int, Key] = {
    0x00100010: Key("series__study__patient_name", Match.NAME, Level.STUDY),
    0x00100020: Key("series__study__patient_id", Match.TEXT, Level.STUDY),
    0x0020000D: Key("series__study__study_instance_uid", Match.UIDS, Level.STUDY),
    0x00080020: Key("series__study__study_date", Match.DATE, Level.STUDY),
    0x00080050: Key("series__study__accession_number", Match.TEXT, Level.STUDY),
    0x00081030: Key("series__study__study_description", Match.TEXT, Level.STUDY),
    0x00080090: Key("series__study__referring_physician_name", Match.NAME, Level.STUDY),
    0x00080061: Key("series__modality", Match.MODALITY, Level.STUDY),
    0x0020000E: Key("series__series_instance_uid", Match.UIDS, Level.SERIES),
    0x00080060: Key("series__modality", Match.TEXT, Level.SERIES),
    0x00200011: Key("series__series_number", Match.NUMBER, Level.SERIES),
    0x0008103E: Key("series__series_description", Match.TEXT, Level.SERIES),
    0x00080018: Key("sop_instance_uid", Match.UIDS, Level.INSTANCE),
    0x00080016: Key("sop_class_uid", Match.UIDS, Level.INSTANCE),
    0x00200013: Key("instance_number", Match.NUMBER, Level.INSTANCE),
}
_DEPTH = {Level.STUDY: 0, Level.SERIES: 1, Level.INSTANCE: 2}
_CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}
_DATE = re.compile(r"[0-9]{8}")
_MAX_LIMIT = 1000


@dataclass
class Search:
    filters: Q
    limit: int | None
    offset: int
    ignored: list[str]


def _tag(key: str) -> int | None:
    """A query key (a keyword such as PatientID, or a tag such as 00100020) as a tag."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        return int(key, 16)
    tag = tag_for_keyword(key)
    return int(tag) if tag is not None else None


def _wildcard(value: str) -> str:
    return (
        "^" + "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value) + "$"
    )


# The longest text value a matching key takes (LO and each PN component group are 64 chars).
_MAX_TEXT = 64


def _condition(key: Key, value: str, name: str) -> Q:
    lookup = key.lookup
    if "\x00" in value:
        raise QueryError(f"{name}: a value may not hold a NUL character.")
    if key.match == Match.UIDS:
        uids = [uid for uid in re.split(r"[,\\]", value) if uid]
        if not all(re.fullmatch(r"[0-9.]{1,64}", uid) for uid in uids):
            raise QueryError(f"{name}: expected a list of UIDs.")
        return Q(**{f"{lookup}__in": uids})
    if key.match == Match.DATE:
        start, dash, end = value.partition("-")
        for part in (start, end):
            if part and not _DATE.fullmatch(part):
                raise QueryError(f"{name}: expected a date YYYYMMDD or a range of them.")
        if not dash:
            return Q(**{lookup: start})
        condition = Q()
        if start:
            condition &= Q(**{f"{lookup}__gte": start})
        if end:
            condition &= Q(**{f"{lookup}__lte": end})
        return condition & ~Q(**{lookup: ""})
    if key.match == Match.NUMBER:
        if not re.fullmatch(r"[+-]?[0-9]{1,9}", value):
            raise QueryError(f"{name}: expected a number.")
        return Q(**{lookup: int(value)})
    if key.match == Match.MODALITY:
        return Q(**{f"{lookup}__in": [m for m in re.split(r"[,\\]", value) if m]})
    # Runs of "*" match as one; past _MAX_TEXT characters nothing stored could match anyway, and
    # the database's regular expressions have their own limits.
    value = re.sub(r"\*+", "*", value)
    if len(value) > _MAX_TEXT:
        raise QueryError(f"{name}: at most {_MAX_TEXT} characters.")
    if "*" in value or "?" in value:
        suffix = "iregex" if key.match == Match.NAME else "regex"
        return Q(**{f"{lookup}__{suffix}": _wildcard(value)})
    if key.match == Match.NAME:
        return Q(**{f"{lookup}__iexact": value})
    return Q(**{lookup: value})


def _integer(params: QueryDict, name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 9:
        raise QueryError(f"{name}: expected a whole number of 0 or more.")
    return int(value)


def parse(params: QueryDict, level: Level) -> Search:
    """The filters, paging and ignored keys of a QIDO-RS query string."""
    filters, ignored = Q(), []
    for name in params:
        if name in _CONTROL:
            continue
        tag = _tag(name)
        if tag is None:
            raise QueryError(f"{name}: not a DICOM attribute keyword or tag.")
        key = _KEYS.get(tag)
        if (
            key is None
            or _DEPTH[key.level] > _DEPTH[level]
            or (key.match == Match.MODALITY and (level != Level.STUDY))
        ):
            ignored.append(name)
            continue
        for value in params.getlist(name):
            if value:
                filters &= _condition(key, value, name)
    limit = _integer(params, "limit")
    return Search(
        filters=filters,
        limit=min(limit, _MAX_LIMIT) if limit is not None else _MAX_LIMIT,
        offset=_integer(params, "offset") or 0,
        ignored=ignored,
    )


# --- DICOM JSON of index rows ----------------------------------------------------------------


def _element(tag: int, value: Any) -> tuple[str, dict[str, Any]]:
    vr = dictionary_VR(tag)
    element: dict[str, Any] = {"vr": vr}
    if value in (None, "", []):
        return f"{tag:08X}", element
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        element["Value"] = [{"Alphabetic": v} for v in values]
    else:
        element["Value"] = values
    return f"{tag:08X}", element


def _json(attributes: dict[int, Any]) -> dict[str, Any]:
    return dict(_element(tag, value) for tag, value in sorted(attributes.items()))


def _study_attributes(study: Study, series: int, instances: int, modalities: list[str]) -> dict:
    return {
        0x00080005: "ISO_IR 192",
        0x00080020: study.study_date,
        0x00080030: study.study_time,
        0x00080050: study.accession_number,
        0x00080061: sorted(modalities),
        0x00080090: study.referring_physician_name,
        0x00081030: study.study_description,
        0x00100010: study.patient_name,
        0x00100020: study.patient_id,
        0x00100030: study.patient_birth_date,
        0x00100040: study.patient_sex,
        0x0020000D: study.study_instance_uid,
        0x00201206: series,
        0x00201208: instances,
    }


def _series_attributes(series: Series, instances: int) -> dict:
    return {
        0x00080005: "ISO_IR 192",
        0x00080060: series.modality,
        0x0008103E: series.series_description,
        0x00180015: series.body_part_examined,
        0x0020000D: series.study.study_instance_uid,
        0x0020000E: series.series_instance_uid,
        0x00200011: series.series_number,
        0x00201209: instances,
    }


def _instance_attributes(instance: Instance) -> dict:
    return {
        0x00080016: instance.sop_class_uid,
        0x00080018: instance.sop_instance_uid,
        0x00083002: instance.transfer_syntax_uid,
        0x0020000D: instance.series.study.study_instance_uid,
        0x0020000E: instance.series.series_instance_uid,
        0x00200013: instance.instance_number,
        0x00280008: instance.number_of_frames,
        0x00280010: instance.rows,
        0x00280011: instance.columns,
    }


RetrieveUrl = Callable[..., str]


def search_studies(
    granted: QuerySet[Instance], search: Search, retrieve_url: RetrieveUrl
) -> list[dict[str, Any]]:
    matched = granted.filter(search.filters).values("series__study")
    studies = Study.objects.filter(pk__in=matched).order_by("-study_date", "pk")
    page = list(studies[search.offset : search.offset + (search.limit or _MAX_LIMIT)])
    in_page = granted.filter(series__study__in=page)
    counts = {
        row["series__study"]: row
        for row in in_page.order_by()
        .values("series__study")
        .annotate(series=Count("series", distinct=True), instances=Count("pk"))
    }
    modalities: dict[int, list[str]] = {}
    pairs = in_page.order_by().values_list("series__study", "series__modality").distinct()
    for study_id, modality in pairs:
        if modality:
            modalities.setdefault(study_id, []).append(modality)
    results = []
    for study in page:
        count = counts.get(study.pk, {"series": 0, "instances": 0})
        attributes = _study_attributes(
            study, count["series"], count["instances"], modalities.get(study.pk, [])
        )
        attributes[0x00081190] = retrieve_url(study.study_instance_uid)
        results.append(_json(attributes))
    return results


def search_series(
    granted: QuerySet[Instance], search: Search, retrieve_url: RetrieveUrl
) -> list[dict[str, Any]]:
    matched = granted.filter(search.filters).values("series")
    series_rows = (
        Series.objects.filter(pk__in=matched)
        .select_related("study")
        .order_by("study__study_date", "study_id", "series_number", "pk")
    )
    page = list(series_rows[search.offset : search.offset + (search.limit or _MAX_LIMIT)])
    counts = dict(
        granted.filter(series__in=page)
        .order_by()
        .values("series")
        .annotate(n=Count("pk"))
        .values_list("series", "n")
    )
    results = []
    for series in page:
        attributes = _series_attributes(series, counts.get(series.pk, 0))
        attributes[0x00081190] = retrieve_url(
            series.study.study_instance_uid, series.series_instance_uid
        )
        results.append(_json(attributes))
    return results


def search_instances(
    granted: QuerySet[Instance], search: Search, retrieve_url: RetrieveUrl
) -> list[dict[str, Any]]:
    instances = (
        granted.filter(search.filters)
        .select_related("series__study")
        .order_by("series__series_number", "series_id", "instance_number", "pk")
    )
    page = instances[search.offset : search.offset + (search.limit or _MAX_LIMIT)]
    results = []
    for instance in page:
        attributes = _instance_attributes(instance)
        attributes[0x00081190] = retrieve_url(
            instance.series.study.study_instance_uid,
            instance.series.series_instance_uid,
            instance.sop_instance_uid,
        )
        results.append(_json(attributes))
    return results


def ignored_warning(search: Search) -> str | None:
    """The Warning header for matching keys that were not used (PS3.18 §10.6.1.3.1)."""
    if not search.ignored:
        return None
    names = ", ".join(keyword_for_tag(_tag(n) or 0) or n for n in search.ignored)
    return f'299 portal "The following attributes were not used for matching: {names}"'
