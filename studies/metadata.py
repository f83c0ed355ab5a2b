"""The DICOM JSON model (PS3.18 F.2) of stored instances: what WADO-RS `/metadata` returns.

Computed once per instance and kept in the index (`Instance.metadata`), so that the metadata of
a whole study is one query and a string join rather than the parse of every file at every
request. Values larger than BULK_THRESHOLD bytes (pixel data, overlays, waveforms, embedded
documents) are not inlined: they get a BulkDataURI (PS3.18 F.2.6), written here relative to
the instance (`BULK_BASE` + "/bulk/<path>") and made absolute by the server that answers, which
alone knows its own address.
"""

import json
import logging
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.valuerep import VR

from studies.models import Instance
from studies.store import instance_file

logger = logging.getLogger(__name__)

# Stands for the instance's own WADO-RS URL in a stored BulkDataURI.
BULK_BASE = "{instance}"
# How a stored BulkDataURI begins in the compact JSON text (a text value cannot contain it: its
# quotes would be escaped), to be replaced with `bulk_prefix(url)` when it is served.
STORED_BULK_PREFIX = '"BulkDataURI":"' + BULK_BASE
# Binary values above this size are referenced rather than inlined (base64 would make the
# metadata of a CT study weigh as much as its images).
BULK_THRESHOLD = 1024
# Pixel data is always referenced, however small: viewers fetch it by frame, never inline.
_PIXEL_DATA = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_BINARY_VRS = frozenset({VR.OB, VR.OD, VR.OF, VR.OL, VR.OV, VR.OW, VR.UN, VR.OB_OW})


def _bulk_path(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _element_json(element: DataElement, path: tuple[str, ...]) -> dict[str, Any]:
    if element.VR == VR.SQ:
        return {
            "vr": "SQ",
            "Value": [
                _dataset_json(item, (*path, str(index))) for index, item in enumerate(element.value)
            ],
        }
    if element.VR in _BINARY_VRS and not element.is_empty:
        value = element.value
        large = isinstance(value, bytes | bytearray) and len(value) > BULK_THRESHOLD
        if large or element.tag in _PIXEL_DATA:
            return {"vr": element.VR, "BulkDataURI": f"{BULK_BASE}/bulk/{_bulk_path(path)}"}
    return element.to_json_dict(None, 0)


def _dataset_json(ds: Dataset, path: tuple[str, ...] = ()) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for element in ds:
        if element.tag.group == 0x0002:
            continue
        tag = f"{element.tag:08X}"
        result[tag] = _element_json(element, (*path, tag))
    return result


def instance_metadata_json(path: Path) -> str:
    """The DICOM JSON object of one stored Part 10 file, with relative BulkDataURIs."""
    ds = dcmread(path)
    return json.dumps(_dataset_json(ds), separators=(",", ":"), ensure_ascii=False)


def bulk_prefix(instance_url: str) -> str:
    """What replaces STORED_BULK_PREFIX in a served document, for the instance at that URL."""
    return '"BulkDataURI":' + json.dumps(instance_url)[:-1]


def bulk_value(path: Path, bulk_path: str) -> bytes | None:
    """The value a stored BulkDataURI points at, or None if the path names nothing binary."""
    parts = bulk_path.split("/")
    ds: Dataset = dcmread(path)
    element: DataElement | None = None
    for position, part in enumerate(parts):
        if position % 2 == 0:
            try:
                tag = int(part, 16)
            except ValueError:
                return None
            if len(part) != 8 or tag not in ds:
                return None
            element = ds[tag]
        else:
            if element is None or element.VR != VR.SQ or not part.isdigit():
                return None
            index = int(part)
            if index >= len(element.value):
                return None
            ds, element = element.value[index], None
    if element is None or element.VR not in _BINARY_VRS:
        return None
    value = element.value
    return bytes(value) if isinstance(value, bytes | bytearray) else None


class NoSuchFrame(LookupError):
    pass


def stored_frames(path: Path, numbers: list[int]) -> list[bytes]:
    """Frames (1-based) of a stored instance in its stored encoding: slices of native pixel
    data, or the fragments of encapsulated pixel data (PS3.5 A.4)."""
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise NoSuchFrame("no pixel data")
    count = int(ds.get("NumberOfFrames") or 1)
    if any(not 1 <= n <= count for n in numbers):
        raise NoSuchFrame(f"frames are numbered 1 to {count}")
    data = ds.PixelData
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return [get_frame(data, n - 1, number_of_frames=count) for n in numbers]
    size = len(data) // count
    return [data[(n - 1) * size : n * size] for n in numbers]


def instances_metadata(instances: list[Instance]) -> list[str]:
    """The stored DICOM JSON of each instance, computing and keeping what is missing."""
    missing = [instance for instance in instances if not instance.metadata]
    computed = []
    for instance in missing:
        try:
            instance.metadata = instance_metadata_json(instance_file(instance))
        except Exception:  # pydicom raises many types on what it cannot encode as JSON
            # The store kept the object because it is well-formed; its metadata is then what
            # the index knows, until someone looks at why (the log says which).
            logger.exception("no DICOM JSON for instance %s", instance.sop_instance_uid)
            instance.metadata = _index_only_json(instance)
            continue
        computed.append(instance)
    if computed:
        Instance.objects.bulk_update(computed, ["metadata"], batch_size=500)
    return [instance.metadata for instance in instances]


def _index_only_json(instance: Instance) -> str:
    return json.dumps(
        {
            "00080016": {"vr": "UI", "Value": [instance.sop_class_uid]},
            "00080018": {"vr": "UI", "Value": [instance.sop_instance_uid]},
        },
        separators=(",", ":"),
    )


def study_metadata_fill(study_instance_uid: str) -> int:
    """Compute and keep the DICOM JSON of every instance of a study that lacks it (after a
    retrieval or an import, before anyone asks); returns how many were computed."""
    missing = list(
        Instance.objects.filter(
            series__study__study_instance_uid=study_instance_uid, metadata=""
        ).order_by("pk")
    )
    instances_metadata(missing)
    return len(missing)
