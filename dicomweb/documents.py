"""What the viewer shows of storage objects that are not images: an encapsulated PDF (often the
radiology report) as the PDF it holds, a structured report as readable text. Everything else
stays in the download.

Both read a file the store holds; a structured report is walked with bounds (items and depth)
so that a hostile one cannot make a page of any size.
"""

import datetime
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.utils import formats
from django.utils.translation import gettext as _
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    AcquisitionContextSRStorage,
    BasicTextSRStorage,
    ChestCADSRStorage,
    ColonCADSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    EnhancedXRayRadiationDoseSRStorage,
    ExtensibleSRStorage,
    ImplantationPlanSRStorage,
    MammographyCADSRStorage,
    PatientRadiationDoseSRStorage,
    PerformedImagingAgentAdministrationSRStorage,
    PlannedImagingAgentAdministrationSRStorage,
    ProcedureLogStorage,
    RadiopharmaceuticalRadiationDoseSRStorage,
    SimplifiedAdultEchoSRStorage,
    WaveformAnnotationSRStorage,
    XRayRadiationDoseSRStorage,
)

from studies import dicom


class Kind(enum.StrEnum):
    PDF = "pdf"
    REPORT = "report"


# The SR storage SOP classes (PS3.4 Annex B.5) whose content tree reads as a document. Key
# Object Selection (…88.59) is left out: its tree is a list of references to images, which
# says nothing read as text, so it is one of the objects that stay in the download.
REPORT_SOP_CLASSES = frozenset(
    {
        BasicTextSRStorage,
        EnhancedSRStorage,
        ComprehensiveSRStorage,
        Comprehensive3DSRStorage,
        ExtensibleSRStorage,
        ProcedureLogStorage,
        MammographyCADSRStorage,
        ChestCADSRStorage,
        ColonCADSRStorage,
        XRayRadiationDoseSRStorage,
        EnhancedXRayRadiationDoseSRStorage,
        RadiopharmaceuticalRadiationDoseSRStorage,
        PatientRadiationDoseSRStorage,
        ImplantationPlanSRStorage,
        AcquisitionContextSRStorage,
        SimplifiedAdultEchoSRStorage,
        PlannedImagingAgentAdministrationSRStorage,
        PerformedImagingAgentAdministrationSRStorage,
        WaveformAnnotationSRStorage,
    }
)


def document_kind(sop_class_uid: str) -> Kind | None:
    """How the viewer opens an instance of this SOP class, or None: not at all."""
    if sop_class_uid == EncapsulatedPDFStorage:
        return Kind.PDF
    if sop_class_uid in REPORT_SOP_CLASSES:
        return Kind.REPORT
    return None


class UnreadableDocument(Exception):
    """The file does not hold the document its SOP class promises."""


def _read(path: Path, **kwargs: Any) -> Dataset:
    try:
        return dcmread(path, **kwargs)
    except Exception as exc:  # pydicom raises many types on garbage (and RecursionError)
        raise UnreadableDocument(f"{type(exc).__name__} reading {path.name}") from exc


# --- Encapsulated PDF (PS3.3 A.45.1, C.24.2) ----------------------------------------------------


def encapsulated_pdf(path: Path) -> bytes:
    """The PDF an Encapsulated PDF instance holds, exactly as it was encapsulated.

    Encapsulated Document (0042,0011) is OB, so an odd-length document was padded with one
    NUL byte (PS3.3 C.24.2.1); Encapsulated Document Length (0042,0015), when present, is the
    length without that pad. Without it, a trailing NUL is dropped: a PDF ends with its
    `%%EOF` marker and an end of line, never with a NUL.
    """
    ds = _read(path)
    value = ds.get("EncapsulatedDocument")
    if not isinstance(value, bytes) or not value:
        raise UnreadableDocument(f"no Encapsulated Document in {path.name}")
    length = ds.get("EncapsulatedDocumentLength")
    if isinstance(length, int) and 0 < length <= len(value):
        return value[:length]
    if value.endswith(b"\x00"):
        return value[:-1]
    return value


# --- Structured reports (PS3.3 C.17.3, the SR Document Content Module) --------------------------

# Bounds of what one page shows: a report of a few hundred items is long already, and a dose
# report of a long fluoroscopy is rarely more than a few thousand. Beyond, the page says so.
MAX_ITEMS = 5000
MAX_DEPTH = 32


class Entry(enum.StrEnum):
    OPEN = "open"  # a CONTAINER: a section with a heading
    CLOSE = "close"  # the end of that section
    ITEM = "item"  # any other content item: its name and value


@dataclass
class ReportLine:
    entry: Entry
    name: str = ""
    value: str = ""
    # Heading level of a section (h2 to h6; deeper sections keep h6): the title is the h1.
    level: int = 2
    # Depth in the tree: the page indents the first levels only (a phone is narrow).
    depth: int = 0


@dataclass
class Report:
    title: str
    complete: bool | None
    verified: bool | None
    verifier: str
    content_date: datetime.date | None
    lines: list[ReportLine] = field(default_factory=list)
    # Items left out past MAX_ITEMS or below MAX_DEPTH.
    truncated: bool = False


def _code_meaning(ds: Dataset, keyword: str) -> str:
    sequence = ds.get(keyword)
    if not sequence:
        return ""
    return str(sequence[0].get("CodeMeaning", "") or sequence[0].get("CodeValue", ""))


def _datetime_text(value: object) -> str:
    text = str(value)
    try:
        moment = datetime.datetime.strptime(text[:14], "%Y%m%d%H%M%S")
    except ValueError:
        try:
            moment = datetime.datetime.strptime(text[:12], "%Y%m%d%H%M")
        except ValueError:
            return text
    return formats.date_format(moment, "DATETIME_FORMAT")


def _time_text(value: object) -> str:
    text = str(value)
    digits = text.split(".", 1)[0]
    if len(digits) >= 4 and digits.isdigit():
        seconds = f":{digits[4:6]}" if len(digits) >= 6 else ""
        return f"{digits[:2]}:{digits[2:4]}{seconds}"
    return text


# UCUM's "1" is a pure number (a count, a ratio): no unit to write after it.
_NO_UNITS = {("UCUM", "1")}


def _numeric(item: Dataset) -> str:
    measured = item.get("MeasuredValueSequence")
    if not measured:
        # An empty measurement says why in its qualifier ("not a number", "not measured"…).
        return _code_meaning(item, "NumericValueQualifierCodeSequence") or "—"
    value = measured[0]
    number = str(value.get("NumericValue", "")).strip()
    units = value.get("MeasurementUnitsCodeSequence")
    if units and (units[0].get("CodingSchemeDesignator"), units[0].get("CodeValue")) in _NO_UNITS:
        return number
    unit = _code_meaning(value, "MeasurementUnitsCodeSequence")
    return f"{number} {unit}".strip()


def _other_text(value_type: str) -> str:
    return _("(%(type)s, not shown here)") % {"type": value_type.lower() or _("reference")}


def _value_text(item: Dataset, value_type: str) -> str:
    """The value of a content item (PS3.3 Table C.17.3-7), as text."""
    if value_type == "TEXT":
        return str(item.get("TextValue", ""))
    if value_type == "CODE":
        return _code_meaning(item, "ConceptCodeSequence")
    if value_type == "NUM":
        return _numeric(item)
    if value_type == "DATETIME":
        return _datetime_text(item.get("DateTime", ""))
    if value_type == "DATE":
        day = dicom.date_value(item.get("Date", ""))
        return formats.date_format(day, "DATE_FORMAT") if day else str(item.get("Date", ""))
    if value_type == "TIME":
        return _time_text(item.get("Time", ""))
    if value_type == "PNAME":
        return dicom.display_name(item.get("PersonName", ""))
    if value_type == "UIDREF":
        return str(item.get("UID", ""))
    return _other_text(value_type)


def _flag(ds: Dataset, keyword: str, yes: str, no: str) -> bool | None:
    value = str(ds.get(keyword, "")).strip().upper()
    return True if value == yes else False if value == no else None


def structured_report(path: Path) -> Report:
    """The content tree of an SR document as the lines of a page: a section per CONTAINER,
    one line per other item, in document order, within MAX_ITEMS and MAX_DEPTH."""
    ds = _read(path, stop_before_pixels=True)
    observers = ds.get("VerifyingObserverSequence")
    report = Report(
        title=_code_meaning(ds, "ConceptNameCodeSequence"),
        complete=_flag(ds, "CompletionFlag", "COMPLETE", "PARTIAL"),
        verified=_flag(ds, "VerificationFlag", "VERIFIED", "UNVERIFIED"),
        verifier=(
            dicom.display_name(observers[-1].get("VerifyingObserverName", "")) if observers else ""
        ),
        content_date=dicom.date_value(ds.get("ContentDate", "")),
    )
    # An explicit stack rather than recursion: the depth of a file is the sender's choice.
    # Each frame is the iterator over one container's children.
    stack: list[Any] = [iter(ds.get("ContentSequence") or ())]
    items = 0
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            if stack:
                report.lines.append(ReportLine(Entry.CLOSE, depth=len(stack)))
            continue
        items += 1
        if items > MAX_ITEMS:
            report.truncated = True
            break
        depth = len(stack) - 1
        try:
            name = _code_meaning(item, "ConceptNameCodeSequence")
            value_type = str(item.get("ValueType", "")).strip().upper()
        except Exception:  # an element pydicom cannot decode: the item is shown without it
            name, value_type = "", ""
        if value_type == "CONTAINER":
            level = min(2 + depth, 6)
            if len(stack) >= MAX_DEPTH:
                report.truncated = True
                continue
            report.lines.append(ReportLine(Entry.OPEN, name=name, level=level, depth=depth))
            stack.append(iter(item.get("ContentSequence") or ()))
            continue
        try:
            value = _value_text(item, value_type)
        except Exception:  # likewise: the item is there, its value unreadable
            value = "?"
        report.lines.append(ReportLine(Entry.ITEM, name=name, value=value, depth=depth))
        # Items under a non-container (the properties of a finding, PS3.3 C.17.3.2.4) follow
        # it one level further in.
        children = item.get("ContentSequence")
        if children:
            if len(stack) >= MAX_DEPTH:
                report.truncated = True
                continue
            report.lines.append(ReportLine(Entry.OPEN, level=min(2 + depth, 6), depth=depth))
            stack.append(iter(children))
    while len(stack) > 1:
        stack.pop()
        report.lines.append(ReportLine(Entry.CLOSE, depth=len(stack)))
    return report
