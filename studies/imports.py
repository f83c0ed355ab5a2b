"""Imports into the local archive: files, folders, and CDs (a folder with a DICOMDIR, or the
DICOMDIR itself). What staff import is the archive's, whatever brought it first."""

import io
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MediaStorageDirectoryStorage

from studies import dicom, metadata
from studies.store import Indexer, StoreError, studies_keep_in_archive

logger = logging.getLogger(__name__)


@dataclass
class ImportReport:
    imported: int = 0
    already_present: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    studies: set[str] = field(default_factory=set)
    # Why the import stopped before the end (the store cannot take more files), or "".
    error: str = ""


def dicom_import(paths: Iterable[Path]) -> ImportReport:
    """Import files and folders (a CD, or its DICOMDIR) into the local archive.

    Every file is tried; what cannot be imported is listed with its reason and nothing else
    is affected. Only a store that cannot take more files (a full disk…) stops the import,
    with `error` set: every further file would fail the same way.
    """
    report = ImportReport()
    indexer = Indexer(source=None)
    for path in _walk(paths, report):
        try:
            data = _read_part10(path)
            if _is_dicomdir(data):
                continue
            instance, changed = indexer.add_file_bytes(data)
        except OSError as exc:
            report.skipped.append((str(path), f"cannot read: {exc.strerror or exc}"))
            continue
        except dicom.InvalidDicom as exc:
            report.skipped.append((str(path), str(exc)))
            continue
        except StoreError as exc:
            report.error = str(exc)
            break
        except Exception as exc:
            # The database refusing a row, say: this file is not imported, the others may be.
            logger.exception("could not import %s", path)
            report.skipped.append(
                (str(path), f"could not be imported: {type(exc).__name__}: {str(exc)[:300]}")
            )
            continue
        if changed:
            report.imported += 1
        else:
            report.already_present += 1
        report.studies.add(instance.series.study.study_instance_uid)
    # Staff imported these: they are the local archive now, whatever brought them first.
    studies_keep_in_archive(report.studies)
    for study_uid in sorted(report.studies):
        # Computed now, in the importing process, rather than for the first viewer.
        metadata.study_metadata_fill(study_uid)
    return report


# The first two bytes of a data set without file meta information: the group of its first
# element, little endian. Identifying elements (group 0008) come first in every storage object.
_BARE_DATA_SET_GROUP = b"\x08\x00"
_FILE_META_GROUP = b"\x02\x00"


def _read_part10(path: Path) -> bytes:
    """A file's bytes as a Part 10 file. Older systems wrote CDs whose files lack the 128-byte
    preamble and "DICM" (PS3.10 7.1), or hold a bare data set with no file meta information
    at all: the data set is kept byte for byte, and the missing parts are written for it.

    Anything else (CDs also carry viewers and installers of hundreds of megabytes) is refused
    from its first bytes, before the rest is read."""
    with path.open("rb") as handle:
        head = handle.read(132)
        if len(head) == 132 and head[128:132] == b"DICM":
            return head + handle.read()
        if head[:2] == _FILE_META_GROUP:
            return b"\x00" * 128 + b"DICM" + head + handle.read()
        if head[:2] == _BARE_DATA_SET_GROUP:
            return _with_file_meta(head + handle.read())
    raise dicom.InvalidDicom(
        "not a readable DICOM file: no DICOM File Meta Information ('DICM' at byte 128) "
        "and no data set at its start"
    )


def _with_file_meta(data_set: bytes) -> bytes:
    """A bare data set (implicit or explicit VR little endian) with a file meta group naming
    its SOP class, instance and transfer syntax."""
    try:
        ds = dcmread(io.BytesIO(data_set), force=True, stop_before_pixels=True)
        implicit, little_endian = ds.original_encoding
        sop_class_uid, sop_instance_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    except Exception as exc:  # pydicom raises many types on garbage
        raise dicom.InvalidDicom(
            "not a readable DICOM file: a data set without file meta information that does "
            f"not parse ({type(exc).__name__})"
        ) from exc
    if not little_endian:
        raise dicom.InvalidDicom("a big endian data set without file meta information")
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta = dicom.encode_file_meta(
        sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid, transfer_syntax_uid=syntax
    )
    return meta + data_set


def _walk(paths: Iterable[Path], report: ImportReport) -> Iterator[Path]:
    def unreadable(exc: OSError) -> None:
        report.skipped.append((str(exc.filename), f"cannot read: {exc.strerror or exc}"))

    for path in paths:
        if path.is_dir():
            folder = path
        elif path.is_file() and _is_dicomdir_file(path):
            # A CD given by its DICOMDIR: what it describes is the folder it sits in.
            folder = path.parent
        elif path.is_file():
            yield path
            continue
        else:
            report.skipped.append((str(path), "no such file or folder"))
            continue
        for root, dirs, files in os.walk(folder, onerror=unreadable):
            dirs.sort()
            for name in sorted(files):
                yield Path(root) / name


def _is_dicomdir(data: bytes) -> bool:
    # Cheap test before a parse: the SOP class UID of a DICOMDIR (it describes a CD rather
    # than being an image) appears in its file meta.
    return MediaStorageDirectoryStorage.encode() in data[:512] and (data[128:132] == b"DICM")


def _is_dicomdir_file(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return _is_dicomdir(handle.read(512))
    except OSError:
        return False
