"""The staff search: studies on every configured PACS node and in the local archive at once.

A read (a selector): it asks each node (C-FIND through studies.dimse.pacs, or QIDO-RS through
studies.wado for a node retrieved from by WADO-RS) in a thread of its own, waits at most
settings.SEARCH_TIMEOUT seconds for all of them together, and reads the index meanwhile. A node
that fails or is still silent at the deadline is reported as such; the others' matches come all
the same. Matches are merged by Study Instance UID (one row however many sources hold the study)
and grouped by patient, so that the share form can offer a patient's other studies as priors.

Nothing here writes: auditing the search is the caller's (the view's) business.
"""

import logging
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from django.conf import settings
from django.db.models import Count, QuerySet
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from pydicom.dataset import Dataset

from studies import wado
from studies.dimse import pacs
from studies.models import Instance, PacsNode, Series, Study

logger = logging.getLogger(__name__)

# Matches per source at most: a search is for finding a patient's studies, not for a dump.
MATCH_LIMIT = 200
# The name of the local archive among the sources (node names are slugs: no clash).
LOCAL = "local"
# What QIDO-RS is asked to return on top of its defaults.
_QIDO_FIELDS = (
    "PatientBirthDate",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
# DICOM matching (PS3.4 C.2.2.2.4) gives "*", "?" and "\\" a meaning: typed by staff, they would
# widen a search they did not mean to widen.
_WILDCARDS = re.compile(r"[*?\\]")


class QueryError(ValueError):
    """The search cannot be run as asked (nothing to search for, wildcards…)."""


@dataclass(frozen=True)
class StudyQuery:
    """What staff search for. The birth date narrows a search; it is never a credential."""

    patient_id: str = ""
    patient_name: str = ""
    birth_date: date | None = None
    accession_number: str = ""
    date_from: date | None = None
    date_to: date | None = None
    modality: str = ""
    # One study by its UID: what the share form asks for (never typed by staff).
    study_instance_uid: str = ""

    def check(self) -> None:
        """Raise QueryError unless the query names something: a patient, an accession number,
        a birth date, a date range or a study. A modality alone would list a PACS's whole
        content."""
        if not (
            self.patient_id
            or self.patient_name
            or self.birth_date
            or self.accession_number
            or self.date_from
            or self.date_to
            or self.study_instance_uid
        ):
            raise QueryError(
                _(
                    "Say whom or what you are looking for: a patient ID, a name, a birth date, "
                    "an accession number or a date range."
                )
            )
        for value in (self.patient_id, self.patient_name, self.accession_number, self.modality):
            if _WILDCARDS.search(value):
                raise QueryError(_("Type names and numbers without * ? or \\ ."))
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise QueryError(_("The date range ends before it begins."))

    def dicom_filters(self) -> dict[str, str]:
        """The matching keys of a study-level C-FIND or QIDO-RS search (PS3.4 C.6.2.1)."""
        filters: dict[str, str] = {}
        if self.study_instance_uid:
            filters["StudyInstanceUID"] = self.study_instance_uid
        if self.patient_id:
            filters["PatientID"] = self.patient_id
        if self.patient_name:
            # Words in that order, each the start of a name component: "dupont ma" finds
            # DUPONT^MARIE. Person names match case-insensitively on most PACSs.
            filters["PatientName"] = "*".join(self.patient_name.split()) + "*"
        if self.birth_date:
            filters["PatientBirthDate"] = _da(self.birth_date)
        if self.accession_number:
            filters["AccessionNumber"] = self.accession_number
        if self.date_from or self.date_to:
            # A DA range; either end may be open (PS3.4 C.2.2.2.5).
            start = _da(self.date_from) if self.date_from else ""
            end = _da(self.date_to) if self.date_to else ""
            filters["StudyDate"] = start if start == end else f"{start}-{end}"
        if self.modality:
            filters["ModalitiesInStudy"] = self.modality
        return filters


def _da(value: date) -> str:
    return value.strftime("%Y%m%d")


@dataclass
class StudyHit:
    """One study, as every source that has it describes it (the first to answer wins)."""

    study_instance_uid: str
    patient_id: str
    patient_name: str
    birth_date: str
    study_date: str
    accession_number: str
    description: str
    modalities: list[str]
    series_count: int | None
    instance_count: int | None
    sources: list[str] = field(default_factory=list)
    in_store: bool = False

    @property
    def node_sources(self) -> list[str]:
        """The PACS nodes that have it (the local archive left out)."""
        return [name for name in self.sources if name != LOCAL]


@dataclass(frozen=True)
class SourceOutcome:
    """How one source answered: `answered` False when it failed or stayed silent."""

    name: str
    label: str
    answered: bool
    matches: int = 0
    truncated: bool = False
    problem: str = ""


@dataclass
class PatientGroup:
    patient_id: str
    patient_name: str
    birth_date: str
    studies: list[StudyHit]


@dataclass
class SearchResult:
    groups: list[PatientGroup]
    sources: list[SourceOutcome]

    @property
    def studies(self) -> list[StudyHit]:
        return [hit for group in self.groups for hit in group.studies]

    @property
    def silent(self) -> list[SourceOutcome]:
        return [source for source in self.sources if not source.answered]


def studies_search(
    query: StudyQuery,
    *,
    nodes: Sequence[PacsNode] | None = None,
    local: bool = True,
    timeout: float | None = None,
) -> SearchResult:
    """Search the nodes (every configured one by default) and, with `local`, the local archive.

    Raises QueryError for a query that names nothing (see StudyQuery.check)."""
    query.check()
    nodes = list(PacsNode.objects.all()) if nodes is None else list(nodes)
    timeout = settings.SEARCH_TIMEOUT if timeout is None else timeout
    filters = query.dicom_filters()
    outcomes: list[SourceOutcome] = []
    hits: dict[str, StudyHit] = {}
    # One thread per node; nothing in them touches the database (each would hold a connection
    # of its own). A node still silent at the deadline keeps its thread until its own network
    # timeouts end it: shutdown(wait=False) lets the page go without it.
    executor = ThreadPoolExecutor(max_workers=max(1, len(nodes)), thread_name_prefix="search")
    try:
        futures = {
            node.name: executor.submit(_search_node, _NodeAddress.of(node), filters)
            for node in nodes
        }
        local_hits = _search_local(query) if local else []
        wait(futures.values(), timeout=timeout)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    if local:
        outcomes.append(
            SourceOutcome(
                name=LOCAL,
                label=_("Local archive"),
                answered=True,
                matches=len(local_hits),
                truncated=len(local_hits) >= MATCH_LIMIT,
            )
        )
        _merge(hits, local_hits, LOCAL)
    for node in nodes:
        outcome, node_hits = _outcome(node, futures[node.name], timeout)
        outcomes.append(outcome)
        _merge(hits, node_hits, node.name)
    in_store = set(
        Study.objects.in_store()
        .filter(study_instance_uid__in=list(hits))
        .values_list("study_instance_uid", flat=True)
    )
    for uid, hit in hits.items():
        hit.in_store = uid in in_store
    return SearchResult(groups=_by_patient(hits.values()), sources=outcomes)


@dataclass(frozen=True)
class _NodeAddress:
    """What a search thread needs of a node, read before the thread starts."""

    peer: pacs.Peer
    dicomweb_url: str
    qido: bool

    @classmethod
    def of(cls, node: PacsNode) -> "_NodeAddress":
        return cls(
            peer=pacs.Peer.of(node),
            dicomweb_url=node.dicomweb_url,
            # A node retrieved from by WADO-RS speaks DICOMweb: it is searched by QIDO-RS.
            qido=node.retrieve_method == PacsNode.Retrieve.WADO and bool(node.dicomweb_url),
        )


def _search_node(address: _NodeAddress, filters: dict[str, str]) -> list[StudyHit]:
    if address.qido:
        found = wado.search_studies(
            address.dicomweb_url, filters, limit=MATCH_LIMIT, fields=_QIDO_FIELDS
        )
        return [_hit_from_json(match) for match in found]
    return [
        _hit_from_dataset(match)
        for match in pacs.find_studies(address.peer, filters, limit=MATCH_LIMIT)
    ]


def _outcome(
    node: PacsNode, future: "Future[list[StudyHit]]", timeout: float
) -> tuple[SourceOutcome, list[StudyHit]]:
    label = node.name
    if not future.done():
        seconds = max(1, round(timeout))
        problem = ngettext(
            "still silent after %(seconds)d second",
            "still silent after %(seconds)d seconds",
            seconds,
        ) % {"seconds": seconds}
        return SourceOutcome(node.name, label, answered=False, problem=problem), []
    try:
        node_hits = future.result()
    except (pacs.PacsError, wado.DicomwebError) as exc:
        # Their texts are written for people and hold no patient data.
        logger.warning("search on %s failed: %s", node.name, exc)
        return SourceOutcome(node.name, label, answered=False, problem=str(exc)), []
    except Exception as exc:
        # A PACS answering something a library chokes on must not take the page down.
        logger.exception("search on %s failed unexpectedly", node.name)
        problem = _("its answer could not be read (%(error)s)") % {"error": type(exc).__name__}
        return SourceOutcome(node.name, label, answered=False, problem=problem), []
    outcome = SourceOutcome(
        node.name,
        label,
        answered=True,
        matches=len(node_hits),
        truncated=len(node_hits) >= MATCH_LIMIT,
    )
    return outcome, node_hits


def _merge(hits: dict[str, StudyHit], found: Iterable[StudyHit], source: str) -> None:
    for hit in found:
        if not hit.study_instance_uid:
            continue
        known = hits.get(hit.study_instance_uid)
        if known is None:
            hit.sources = [source]
            hits[hit.study_instance_uid] = hit
        elif source not in known.sources:
            known.sources.append(source)


def _by_patient(hits: Iterable[StudyHit]) -> list[PatientGroup]:
    groups: dict[str, PatientGroup] = {}
    for hit in sorted(hits, key=lambda h: (h.study_date, h.study_instance_uid), reverse=True):
        # Studies without a patient ID each stand alone: nothing says whose they are.
        key = hit.patient_id or "\0" + hit.study_instance_uid
        group = groups.get(key)
        if group is None:
            group = groups[key] = PatientGroup(
                patient_id=hit.patient_id,
                patient_name=hit.patient_name,
                birth_date=hit.birth_date,
                studies=[],
            )
        group.studies.append(hit)
    return sorted(groups.values(), key=lambda g: (g.patient_name.casefold(), g.patient_id))


# --- the local archive --------------------------------------------------------------------------


def _search_local(query: StudyQuery) -> list[StudyHit]:
    studies: QuerySet[Study] = Study.objects.in_store()
    if query.study_instance_uid:
        studies = studies.filter(study_instance_uid=query.study_instance_uid)
    if query.patient_id:
        studies = studies.filter(patient_id=query.patient_id)
    if query.patient_name:
        for word in query.patient_name.split():
            studies = studies.filter(patient_name__icontains=word)
    if query.birth_date:
        studies = studies.filter(patient_birth_date=_da(query.birth_date))
    if query.accession_number:
        studies = studies.filter(accession_number=query.accession_number)
    if query.date_from:
        studies = studies.filter(study_date__gte=_da(query.date_from))
    if query.date_to:
        studies = studies.filter(study_date__lte=_da(query.date_to)).exclude(study_date="")
    if query.modality:
        studies = studies.filter(series__modality=query.modality)
    rows = list(
        studies.annotate(
            n_series=Count("series", distinct=True),
            n_instances=Count("series__instances", distinct=True),
        ).order_by("-study_date", "-created_at")[:MATCH_LIMIT]
    )
    modalities: dict[int, list[str]] = {}
    for study_id, modality in (
        Series.objects.filter(study__in=[s.pk for s in rows])
        .exclude(modality="")
        .values_list("study_id", "modality")
        .distinct()
    ):
        modalities.setdefault(study_id, []).append(modality)
    return [
        StudyHit(
            study_instance_uid=s.study_instance_uid,
            patient_id=s.patient_id,
            patient_name=s.patient_name,
            birth_date=s.patient_birth_date,
            study_date=s.study_date,
            accession_number=s.accession_number,
            description=s.study_description,
            modalities=sorted(modalities.get(s.pk, [])),
            series_count=getattr(s, "n_series", None),
            instance_count=getattr(s, "n_instances", None),
        )
        for s in rows
    ]


def stored_instance_count(study_instance_uid: str) -> int:
    """Instances of a study the store holds."""
    return Instance.objects.filter(series__study__study_instance_uid=study_instance_uid).count()


# --- reading the answers ------------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(value).strip()


def _number(value: Any) -> int | None:
    try:
        return int(str(value).strip()) if value not in (None, "") else None
    except ValueError:
        return None


def _modalities(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        values: Iterable[Any] = value.split("\\")
    else:
        values = value
    return sorted({str(v).strip() for v in values if str(v).strip()})


def _hit_from_dataset(ds: Dataset) -> StudyHit:
    return StudyHit(
        study_instance_uid=_text(ds.get("StudyInstanceUID")),
        patient_id=_text(ds.get("PatientID")),
        patient_name=_text(ds.get("PatientName")),
        birth_date=_text(ds.get("PatientBirthDate")),
        study_date=_text(ds.get("StudyDate")),
        accession_number=_text(ds.get("AccessionNumber")),
        description=_text(ds.get("StudyDescription")),
        modalities=_modalities(ds.get("ModalitiesInStudy")),
        series_count=_number(ds.get("NumberOfStudyRelatedSeries")),
        instance_count=_number(ds.get("NumberOfStudyRelatedInstances")),
    )


def _json_value(match: dict[str, Any], tag: str) -> list[Any]:
    value = match.get(tag, {}).get("Value", [])
    return value if isinstance(value, list) else []


def _json_text(match: dict[str, Any], tag: str) -> str:
    values = _json_value(match, tag)
    if not values:
        return ""
    first = values[0]
    if isinstance(first, dict):  # a person name (PS3.18 F.2.2)
        return _text(first.get("Alphabetic"))
    return _text(first)


def _hit_from_json(match: dict[str, Any]) -> StudyHit:
    return StudyHit(
        study_instance_uid=_json_text(match, "0020000D"),
        patient_id=_json_text(match, "00100020"),
        patient_name=_json_text(match, "00100010"),
        birth_date=_json_text(match, "00100030"),
        study_date=_json_text(match, "00080020"),
        accession_number=_json_text(match, "00080050"),
        description=_json_text(match, "00081030"),
        modalities=_modalities(_json_value(match, "00080061")),
        series_count=_number(_json_text(match, "00201206")),
        instance_count=_number(_json_text(match, "00201208")),
    )
