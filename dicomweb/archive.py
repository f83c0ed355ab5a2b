"""The study download: a ZIP streamed straight from the store, laid out like an IHE PDI medium.

Layout (IHE RAD TF-2 PDI, and PS3.10 §8 / PS3.11 for the DICOM part):

    DICOMDIR                         the File-set's directory, at its root (PS3.10 §8.6)
    README.TXT                       what the folder holds and how to open it
    INDEX.HTM                        a static page: the series with a preview each, no script
    IHE_PDI/STnnnnnn/SEnnnnnn.JPG    the previews (PDI keeps web content under IHE_PDI/)
    DICOM/STnnnnnn/SEnnnnnn/IMnnnnnn the instances, byte for byte as stored

File IDs are at most 8 components of at most 8 characters from A-Z, 0-9 and "_"
(PS3.10 §8.2, §8.5), so any media reader can follow them.

Speed and memory: the instances are STORED (no compression: DICOM pixel data is either already
compressed or barely compressible, and deflate would cost more than the network gains). A stored
ZIP entry needs its CRC-32 before its data, so each file is read twice in 1 MiB chunks, the CRC
pass just before the copy pass, which the page cache then serves; no more than one chunk of an
instance is ever held. Everything that can fail (a missing file, an index that disagrees with the
store, a value a directory record cannot hold) fails when `study_zip` is called, before the first
byte, so the view can still answer with an error page.
"""

import html
import logging
import stat
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from django.utils import translation
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.fileset import DIRECTORY_RECORDERS
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid
from stream_zip import NO_COMPRESSION_32, NO_COMPRESSION_64, MemberFile, Method, stream_zip

from studies import dicom

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
# Past this many bytes (or 65,535 entries) a ZIP needs the ZIP64 extensions (APPNOTE 4.3.14).
ZIP32_LIMIT = 0xFFFFFFFF
_ZIP32_MAX_ENTRIES = 0xFFFF
# A generous bound on what one entry adds besides its data and name: local header (30), data
# descriptor (24), central directory header (46), ZIP64 and timestamp extras (2 × 37).
_ZIP_ENTRY_OVERHEAD = 256
_FILE_MODE = stat.S_IFREG | 0o644

# Type 1 keys of the PATIENT, STUDY and SERIES records (PS3.3 F.5.1-F.5.3) that the index may
# hold empty (they are Type 2 in the instances): the media standard still wants a value.
_UNKNOWN_PATIENT_ID = "UNKNOWN"
_UNKNOWN_DATE = "19000101"
_UNKNOWN_TIME = "000000"

# The leaf record of an instance that is not an IMAGE (PS3.3 Table F.4-1), by its Modality
# (PS3.3 C.7.3.1.1.1). These records need keys only the file holds (an SR's Completion Flag,
# an RT Dose's Dose Summation Type...), so for them the file's header is read.
_LEAF_RECORD_TYPES = {
    "SR": "SR DOCUMENT",
    "KO": "KEY OBJECT DOC",
    "PR": "PRESENTATION",
    "DOC": "ENCAP DOC",
    "RTDOSE": "RT DOSE",
    "RTSTRUCT": "RT STRUCTURE SET",
    "RTPLAN": "RT PLAN",
    "RTRECORD": "RT TREAT RECORD",
    "REG": "REGISTRATION",
    "FID": "FIDUCIAL",
}


class ArchiveError(Exception):
    """The study cannot be packed as the index describes it (a file missing or changed)."""


@dataclass(frozen=True, slots=True)
class ArchiveInstance:
    """One stored Part 10 file and the index's keys that its directory records need."""

    path: Path
    size: int
    patient_name: str
    patient_id: str
    study_instance_uid: str
    study_date: str
    study_time: str
    study_description: str
    accession_number: str
    series_instance_uid: str
    series_number: int | None
    modality: str
    series_description: str
    sop_class_uid: str
    sop_instance_uid: str
    instance_number: int | None
    transfer_syntax_uid: str


@dataclass(frozen=True, slots=True)
class _Member:
    """An instance and where it goes in the ZIP."""

    instance: ArchiveInstance
    name: str


@dataclass(slots=True)
class _Series:
    folder: str
    instances: list[ArchiveInstance]
    preview_name: str = ""
    preview: bytes | None = None

    @property
    def first(self) -> ArchiveInstance:
        return self.instances[0]


@dataclass(slots=True)
class _Study:
    folder: str
    series: list[_Series]

    @property
    def first(self) -> ArchiveInstance:
        return self.series[0].first


def study_zip(
    instances: Iterable[ArchiveInstance],
    *,
    previews: Callable[[ArchiveInstance], bytes | None] | None,
    language: str,
    on_complete: Callable[[], None] | None = None,
    zip64_threshold: int = ZIP32_LIMIT,
) -> Iterator[bytes]:
    """The ZIP of `instances`, as an iterator of chunks of about `CHUNK_SIZE` bytes.

    Everything but the instances' bytes is prepared now (DICOMDIR, README.TXT, INDEX.HTM, one
    JPEG preview per series from `previews`, which returns None for an instance it cannot render),
    so errors raise here, before the response starts.

    `on_complete` is called once the consumer has taken the last chunk and asked for more: a
    download that ran to its end. A consumer that stops early (a client gone, the generator closed)
    never triggers it, so the caller counts only complete downloads.

    The archive uses ZIP64 for every entry when it could exceed `zip64_threshold` bytes or 65,535
    entries, and plain ZIP otherwise (for the oldest unzip tools).
    """
    studies = _arrange(list(instances))
    members = [
        _Member(instance, f"{series.folder}/IM{number:06d}")
        for study in studies
        for series in study.series
        for number, instance in enumerate(series.instances, start=1)
    ]
    _check_store(members)
    dicomdir = _dicomdir(studies, members)
    if previews is not None:
        for study in studies:
            for series in study.series:
                series.preview = previews(series.instances[len(series.instances) // 2])
    with translation.override(language):
        readme = _readme().encode()
        index = _index(studies).encode()

    small = [("DICOMDIR", dicomdir), ("README.TXT", readme), ("INDEX.HTM", index)]
    small += [
        (series.preview_name, series.preview)
        for study in studies
        for series in study.series
        if series.preview is not None
    ]
    total = sum(len(data) + len(name) for name, data in small) + sum(
        m.instance.size + len(m.name) for m in members
    )
    count = len(small) + len(members)
    zip64 = total + count * _ZIP_ENTRY_OVERHEAD > zip64_threshold or count > _ZIP32_MAX_ENTRIES
    return _stream(small, members, zip64=zip64, on_complete=on_complete)


def _arrange(instances: list[ArchiveInstance]) -> list[_Study]:
    """Group by study and series (studies in the order given, series by number, instances by
    number) and give each its folder."""
    by_study: dict[str, dict[str, list[ArchiveInstance]]] = {}
    seen: set[str] = set()
    for instance in instances:
        if instance.sop_instance_uid in seen:
            raise ArchiveError(f"instance {instance.sop_instance_uid} given twice")
        seen.add(instance.sop_instance_uid)
        by_study.setdefault(instance.study_instance_uid, {}).setdefault(
            instance.series_instance_uid, []
        ).append(instance)
    if not by_study:
        raise ArchiveError("no instances to pack")

    def number(value: int | None) -> tuple[bool, int]:
        return (value is None, value or 0)

    studies = []
    for study_number, series_by_uid in enumerate(by_study.values(), start=1):
        study_folder = f"ST{study_number:06d}"
        ordered = sorted(series_by_uid.values(), key=lambda s: number(s[0].series_number))
        series_list = []
        for series_number, series_instances in enumerate(ordered, start=1):
            series_instances.sort(key=lambda i: number(i.instance_number))
            series_list.append(
                _Series(
                    folder=f"DICOM/{study_folder}/SE{series_number:06d}",
                    instances=series_instances,
                    preview_name=f"IHE_PDI/{study_folder}/SE{series_number:06d}.JPG",
                )
            )
        studies.append(_Study(folder=study_folder, series=series_list))
    return studies


def _check_store(members: list[_Member]) -> None:
    for member in members:
        try:
            size = member.instance.path.stat().st_size
        except OSError as exc:
            raise ArchiveError(f"{member.instance.sop_instance_uid}: {exc.strerror}") from exc
        if size != member.instance.size:
            raise ArchiveError(
                f"{member.instance.sop_instance_uid}: {size} bytes in the store, "
                f"{member.instance.size} in the index"
            )


# DICOMDIR ------------------------------------------------------------------------------------
#
# pydicom's FileSet writes a DICOMDIR only together with the instances it copies, and its
# bookkeeping grows with the square of the instance count (1.5 s for 300 instances, 35 s for
# 2,000 on the development machine). So the records come from pydicom's own record makers
# (`DIRECTORY_RECORDERS`, PS3.3 F.5) and the offsets are laid out here as FileSet lays them;
# the tests read the result back with FileSet and compare its records with FileSet's own.


@dataclass(slots=True)
class _Node:
    record: Dataset
    children: list["_Node"]
    offset: int = 0


def _dicomdir(studies: list[_Study], members: list[_Member]) -> bytes:
    file_ids = {m.instance.sop_instance_uid: m.name.split("/") for m in members}
    patients: dict[str, _Node] = {}
    for study_number, study in enumerate(studies, start=1):
        keys = _upper_keys(study.first, study_id=str(study_number), series_number=0)
        patient = patients.get(keys.PatientID)
        if patient is None:
            patient = patients[keys.PatientID] = _Node(_record("PATIENT", keys), [])
        study_node = _Node(_record("STUDY", keys), [])
        patient.children.append(study_node)
        for series_number, series in enumerate(study.series, start=1):
            keys = _upper_keys(
                series.first, study_id=str(study_number), series_number=series_number
            )
            series_node = _Node(_record("SERIES", keys), [])
            study_node.children.append(series_node)
            for instance_number, instance in enumerate(series.instances, start=1):
                leaf = _leaf_record(instance, instance_number)
                if leaf is None:
                    continue
                leaf.ReferencedFileID = file_ids[instance.sop_instance_uid]
                leaf.ReferencedSOPClassUIDInFile = instance.sop_class_uid
                leaf.ReferencedSOPInstanceUIDInFile = instance.sop_instance_uid
                leaf.ReferencedTransferSyntaxUIDInFile = instance.transfer_syntax_uid
                series_node.children.append(_Node(leaf, []))
    return _encode_dicomdir(list(patients.values()))


def _upper_keys(instance: ArchiveInstance, *, study_id: str, series_number: int) -> Dataset:
    """What the PATIENT, STUDY and SERIES records take, from the index."""
    ds = Dataset()
    values = (instance.patient_name, instance.study_description, instance.series_description)
    if not all(value.isascii() for value in values):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = instance.patient_name
    ds.PatientID = instance.patient_id or _UNKNOWN_PATIENT_ID
    ds.StudyDate = instance.study_date or _UNKNOWN_DATE
    ds.StudyTime = instance.study_time or _UNKNOWN_TIME
    ds.StudyDescription = instance.study_description
    ds.StudyInstanceUID = instance.study_instance_uid
    ds.StudyID = study_id
    ds.AccessionNumber = instance.accession_number
    ds.Modality = instance.modality
    ds.SeriesInstanceUID = instance.series_instance_uid
    ds.SeriesNumber = (
        instance.series_number if instance.series_number is not None else series_number
    )
    return ds


def _record(record_type: str, keys: Dataset) -> Dataset:
    record = DIRECTORY_RECORDERS[record_type](keys)
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = record_type
    if "SpecificCharacterSet" in keys:
        record.SpecificCharacterSet = keys.SpecificCharacterSet
    return record


def _leaf_record(instance: ArchiveInstance, position: int) -> Dataset | None:
    """The instance's own record: an IMAGE from the index, any other type from the file's
    header; None (the file stays in the ZIP, unlisted) when the header lacks a Type 1 key of
    its record."""
    record_type = _LEAF_RECORD_TYPES.get(instance.modality, "IMAGE")
    if record_type == "IMAGE":
        keys = Dataset()
        keys.InstanceNumber = (
            instance.instance_number if instance.instance_number is not None else position
        )
        return _record(record_type, keys)
    header = dcmread(instance.path, stop_before_pixels=True, defer_size=1024)
    try:
        return _record(record_type, header)
    except ValueError as exc:
        logger.warning(
            "%s left out of the DICOMDIR: %s", instance.sop_instance_uid, exc, exc_info=False
        )
        return None


def _encode_dicomdir(roots: list[_Node]) -> bytes:
    """The DICOMDIR file (PS3.10 §7, PS3.3 F.3) with its records in depth-first order and their
    offsets (PS3.3 F.3.2.1: from the first byte of the file, preamble included) filled in.

    pydicom encodes it once with the offsets at zero; the offsets, fixed-size UL values, are
    then written into the encoded bytes (encoding each record twice would double the cost)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.FileSetID = ""
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    nodes = list(_walk(roots))
    ds.DirectoryRecordSequence = [node.record for node in nodes]
    fp = DicomBytesIO()
    dcmwrite(fp, ds, enforce_file_format=True)
    encoded = bytearray(fp.getvalue())

    # The Directory Record Sequence is the data set's last element: its items follow its explicit
    # VR header (tag, VR, 2 reserved bytes, length: PS3.5 §7.1.2), each an item tag and a defined
    # length (PS3.5 §7.5) before its record.
    position = _value_position(encoded, 0, 0x00041220, b"SQ", 6)
    for node in nodes:
        if encoded[position : position + 4] != _ITEM_TAG:
            raise RuntimeError("unexpected DICOMDIR encoding: no item where a record starts")
        node.offset = position
        position += 8 + int.from_bytes(encoded[position + 4 : position + 8], "little")

    def link(siblings: list[_Node]) -> None:
        for index, node in enumerate(siblings):
            following = siblings[index + 1].offset if index + 1 < len(siblings) else 0
            lower = node.children[0].offset if node.children else 0
            _put_ul(encoded, node.offset + 8, 0x00041400, following)
            _put_ul(encoded, node.offset + 8, 0x00041420, lower)
            link(node.children)

    link(roots)
    _put_ul(encoded, 0, 0x00041200, roots[0].offset)
    _put_ul(encoded, 0, 0x00041202, roots[-1].offset)
    return bytes(encoded)


_ITEM_TAG = b"\xfe\xff\x00\xe0"


def _value_position(encoded: bytearray, start: int, tag: int, vr: bytes, header: int) -> int:
    """Where the value of the first element `tag` at or after `start` begins (explicit VR
    little endian: the tag, the VR, then `header` bytes of reserved bytes and length)."""
    key = tag.to_bytes(4, "big")
    marker = key[1::-1] + key[:1:-1] + vr
    found = encoded.find(marker, start)
    if found < 0:
        raise RuntimeError(f"unexpected DICOMDIR encoding: ({tag:08X}) not found")
    return found + 6 + header


def _put_ul(encoded: bytearray, start: int, tag: int, value: int) -> None:
    position = _value_position(encoded, start, tag, b"UL", 2)
    encoded[position : position + 4] = value.to_bytes(4, "little")


def _walk(nodes: list[_Node]) -> Iterator[_Node]:
    for node in nodes:
        yield node
        yield from _walk(node.children)


# README.TXT and INDEX.HTM --------------------------------------------------------------------


def _readme() -> str:
    lines = [
        _("Medical images"),
        "",
        _(
            "This folder holds imaging studies in the DICOM format, exactly as the hospital "
            "stored them, with a DICOMDIR file that lists them."
        ),
        "",
        _("To look at them:"),
        _("- in a DICOM viewer (for example Weasis, free): open the DICOMDIR file or this folder;"),
        _(
            "- in a web browser: open INDEX.HTM for an overview with one reduced image per "
            "series (not for diagnosis)."
        ),
        "",
        _("Contents:"),
        _("  DICOMDIR     the list of the images (DICOM media directory)"),
        _("  DICOM/       the images, one file each"),
        _("  INDEX.HTM    the overview page"),
        _("  IHE_PDI/     the overview's reduced images"),
        "",
    ]
    # CR LF: the convention of the PDI README, read by any text editor.
    return "\r\n".join(lines)


def _display_date(value: str) -> str:
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def _index(studies: list[_Study]) -> str:
    """A page that opens from the unzipped folder without a server: no script, relative links,
    every DICOM-derived string escaped."""
    e = html.escape
    notice = _(
        "Reduced images, not for diagnosis. Open DICOMDIR in a DICOM viewer to read the study."
    )
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="{e(translation.get_language())}">',
        '<head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(_('Medical images'))}</title>",
        "<style>body{font-family:sans-serif;margin:1em;max-width:60em}"
        "li{margin:0 0 1em}img{display:block;max-width:100%;height:auto}</style>",
        "</head><body>",
        f"<h1>{e(_('Medical images'))}</h1>",
        f"<p>{e(notice)}</p>",
    ]
    for study in studies:
        first = study.first
        heading = " — ".join(
            part
            for part in (
                dicom.display_name(first.patient_name),
                _display_date(first.study_date),
                first.study_description,
            )
            if part
        )
        parts.append(f"<h2>{e(heading)}</h2>")
        parts.append("<ul>")
        for series in study.series:
            s = series.first
            label = " — ".join(
                part
                for part in (
                    _("Series %(number)s") % {"number": s.series_number or ""},
                    s.modality,
                    s.series_description,
                    ngettext("%(count)d image", "%(count)d images", len(series.instances))
                    % {"count": len(series.instances)},
                )
                if part
            )
            parts.append(f'<li><a href="{e(series.folder)}/">{e(label)}</a>')
            if series.preview is not None:
                parts.append(f'<img src="{e(series.preview_name)}" alt="{e(label)}">')
            parts.append("</li>")
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


# The stream ----------------------------------------------------------------------------------


def _stream(
    small: list[tuple[str, bytes]],
    members: list[_Member],
    *,
    zip64: bool,
    on_complete: Callable[[], None] | None,
) -> Iterator[bytes]:
    modified_at = datetime.now()
    stored = NO_COMPRESSION_64 if zip64 else NO_COMPRESSION_32

    def entries() -> Iterator[MemberFile]:
        for name, data in small:
            method: Method = stored(len(data), zlib.crc32(data))
            yield name, modified_at, _FILE_MODE, method, (data,)
        for member in members:
            # Computed when stream-zip asks for this entry, just before its data is read.
            method = stored(member.instance.size, _crc32(member.instance))
            yield member.name, modified_at, _FILE_MODE, method, _chunks(member.instance.path)

    yield from stream_zip(entries(), chunk_size=CHUNK_SIZE)
    # Only reached when the consumer asked for more after the last chunk.
    if on_complete is not None:
        on_complete()


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(CHUNK_SIZE):
            yield chunk


def _crc32(instance: ArchiveInstance) -> int:
    crc = 0
    size = 0
    for chunk in _chunks(instance.path):
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
    if size != instance.size:
        raise ArchiveError(f"{instance.sop_instance_uid} changed in the store while being sent")
    return crc
