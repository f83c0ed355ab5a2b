"""Small DICOM helpers shared by the store, the storage SCP and the PACS clients.

Nothing here talks to the network or the database.
"""

import re
from io import BytesIO
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

# UIDs become directory and file names in the store: only this shape is ever accepted, which
# rules out path traversal by construction.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1455.1"
IMPLEMENTATION_VERSION_NAME = "IMAGE_PORTAL_01"


class InvalidDicom(ValueError):
    """A dataset that the portal refuses to store or index."""


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def is_valid_ae_title(value: object) -> bool:
    if not isinstance(value, str):
        return False
    stripped = value.strip()
    return 0 < len(stripped) <= 16 and "\\" not in value and value.isprintable()


def encode_file_meta(
    *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str = ""
) -> bytes:
    """The 128-byte preamble, 'DICM' and the file meta group of a Part 10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae.strip()
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buffer.getvalue()


def read_header(source: bytes | BinaryIO) -> Dataset:
    """Parse a Part 10 file up to its pixel data, refusing what cannot be indexed."""
    stream = BytesIO(source) if isinstance(source, bytes) else source
    try:
        ds = dcmread(stream, stop_before_pixels=True, force=False)
        # Touch the identifying elements now, so that a truncated or garbled dataset fails
        # here rather than later in the middle of indexing.
        uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)
    except InvalidDicom:
        raise
    except AttributeError as exc:
        raise InvalidDicom(f"missing a required element: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on garbage input
        raise InvalidDicom(f"not a readable DICOM file: {exc}") from exc
    for uid in uids:
        if not is_valid_uid(str(uid)):
            raise InvalidDicom(f"invalid UID {str(uid)[:80]!r}")
    transfer_syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
    if not transfer_syntax or not is_valid_uid(str(transfer_syntax)):
        raise InvalidDicom("the file meta information has no valid transfer syntax")
    return ds


def dataset_offset(data: bytes) -> int:
    """Where the data set starts in a Part 10 file: the end of its file meta group."""
    if len(data) < 144 or data[128:132] != b"DICM":
        raise InvalidDicom("not a DICOM Part 10 file")
    # (0002,0000) File Meta Information Group Length, explicit VR little endian, UL.
    if data[132:136] != b"\x02\x00\x00\x00" or data[136:138] != b"UL":
        raise InvalidDicom("file meta information has no group length")
    group_length = int.from_bytes(data[140:144], "little")
    return 144 + group_length


def text(ds: Dataset, keyword: str, max_length: int = 255) -> str:
    """A dataset element as display text: '' when absent, multi-values joined, bounded."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple) or hasattr(value, "__iter__") and not isinstance(
        value, str | bytes
    ):
        result = "\\".join(str(v) for v in value)
    else:
        result = str(value)
    return result.strip()[:max_length]


def integer(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
