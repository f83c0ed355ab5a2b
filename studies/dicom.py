"""Small DICOM helpers shared by the store, the storage SCP and the PACS clients.

Nothing here talks to the network or the database.
"""

import datetime
import functools
import re
import struct
import warnings
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO

from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import PersonName
from pydicom.values import convert_string

# UIDs become directory and file names in the store: only this shape is ever accepted, which
# rules out path traversal by construction.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# A UUID-derived UID (PS3.5 B.2): unique without registering an organisation root.
IMPLEMENTATION_CLASS_UID = "2.25.204586120159834600976043815149901655366"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
IMPLEMENTATION_VERSION_NAME = "IMAGE_PORTAL_01"


class InvalidDicom(ValueError):
    """A dataset that the portal refuses to store or index."""


class DatasetMismatch(InvalidDicom):
    """A data set that contradicts what came with it or what the store holds: a SOP Instance
    or Class UID other than its C-STORE request's, or an instance UID of another study."""


def is_valid_uid(value: object) -> bool:
    # fullmatch: with match, `$` would also accept a trailing newline.
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.fullmatch(value))


def is_valid_ae_title(value: object) -> bool:
    """1 to 16 characters of the AE VR's repertoire (PS3.5 6.2): printable ASCII, no
    backslash; leading and trailing spaces are padding."""
    if not isinstance(value, str):
        return False
    stripped = value.strip()
    return 0 < len(stripped) <= 16 and "\\" not in value and value.isascii() and value.isprintable()


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of the file meta group."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(
    *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str = ""
) -> bytes:
    """The 128-byte preamble, 'DICM' and the file meta group of a Part 10 file.

    Encoded by hand: it runs once per received instance and pydicom's general writer costs
    more than the rest of storing a slice.
    """
    for uid in (sop_class_uid, sop_instance_uid, transfer_syntax_uid):
        if not is_valid_uid(uid):
            raise InvalidDicom(f"invalid UID {uid[:80]!r} in the file meta information")
    body = b"".join(
        [
            _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, 0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
            _element(0x0002, 0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _element(0x0002, 0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
            _element(0x0002, 0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
            _element(0x0002, 0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
        ]
    )
    ae = source_ae.strip()
    if ae and is_valid_ae_title(ae):
        body += _element(0x0002, 0x0016, b"AE", _padded(ae, b" "))
    group_length = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


def read_header(source: bytes | BinaryIO) -> Dataset:
    """Parse a Part 10 file up to its pixel data, refusing what cannot be indexed."""
    stream = BytesIO(source) if isinstance(source, bytes) else source
    try:
        ds = dcmread(stream, stop_before_pixels=True, force=False)
    except Exception as exc:  # pydicom raises many types on garbage input
        raise InvalidDicom(f"not a readable DICOM file: {exc}") from exc
    return _checked(ds)


def _checked(ds: Dataset) -> Dataset:
    try:
        # Touch the identifying elements now, so that a truncated or garbled dataset fails
        # here rather than later in the middle of indexing.
        uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)
    except AttributeError as exc:
        raise InvalidDicom(f"missing a required element: {exc}") from exc
    except Exception as exc:
        raise InvalidDicom(f"not a readable DICOM file: {exc}") from exc
    for uid in uids:
        if not is_valid_uid(str(uid)):
            raise InvalidDicom(f"invalid UID {str(uid)[:80]!r}")
    transfer_syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
    if not transfer_syntax or not is_valid_uid(str(transfer_syntax)):
        raise InvalidDicom("the file meta information has no valid transfer syntax")
    return ds


def _stops_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in _PIXEL_DATA_TAGS


@dataclass(frozen=True)
class InstanceKeys:
    """What placing an instance in the store and writing its index row need of its header."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    rows: int | None
    columns: int | None
    number_of_frames: int


class Header:
    """An instance's header: its keys, and the whole data set up to its pixel data.

    The storage SCP reads the keys straight from the bytes of each slice; pydicom parses the
    rest only when a study or series new to the index needs its descriptive elements, once per
    series rather than once per slice.
    """

    def __init__(self, keys: InstanceKeys, *, dataset: Dataset | None = None, raw: bytes = b""):
        self.keys = keys
        self._dataset = dataset
        self._raw = raw

    @classmethod
    def of(cls, ds: Dataset) -> "Header":
        """The header of a data set pydicom has parsed (and `_checked`)."""
        keys = InstanceKeys(
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            instance_number=integer(ds, "InstanceNumber"),
            rows=integer(ds, "Rows", minimum=0),
            columns=integer(ds, "Columns", minimum=0),
            number_of_frames=integer(ds, "NumberOfFrames", minimum=1) or 1,
        )
        return cls(keys, dataset=ds)

    def dataset(self) -> Dataset:
        if self._dataset is None:
            syntax = self.keys.transfer_syntax_uid
            try:
                ds = read_dataset(
                    BytesIO(self._raw),
                    is_implicit_VR=syntax == ImplicitVRLittleEndian,
                    is_little_endian=True,
                    stop_when=_stops_at_pixels,
                )
            except Exception as exc:
                raise InvalidDicom(f"not a readable DICOM header: {exc}") from exc
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = UID(syntax)
            ds = _checked(ds)
            parsed = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            keys = (self.keys.study_uid, self.keys.series_uid, self.keys.sop_instance_uid)
            if tuple(str(uid) for uid in parsed) != keys:
                raise InvalidDicom("the header reads differently from its keys")
            self._dataset = ds
        return self._dataset


def read_leading_header(data: bytes, transfer_syntax_uid: str) -> tuple[Header, int] | None:
    """The header of a data set (no file meta) still arriving, and where its pixel data starts.

    Returns None unless `data` holds everything before the pixel data, and whenever anything
    is unusual: the caller then parses the whole file with pydicom, which also says precisely
    what is wrong. Walking the element headers and decoding eight values by hand costs a tenth
    of a pydicom parse, which matters once per received slice.

    The keys must be those pydicom reads from the same bytes, whatever a hostile sender
    crafts, or an instance could be filed under another study than its own bytes name. So the
    walk declines every layout on which pydicom might read otherwise: tags out of order or
    repeated, delimiters out of place, groups 0000 to 0007 (pydicom folds file meta elements
    into the file meta), undefined lengths on anything but a sequence, an encoding that looks
    like the other VR mode (pydicom switches), keys in other than their standard VR or form.
    """
    if transfer_syntax_uid in {ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}:
        return None
    values: dict[int, bytes] = {}
    implicit = transfer_syntax_uid == ImplicitVRLittleEndian
    try:
        position = _walk(data, 0, implicit, depth=0, values=values)
    except (struct.error, RecursionError):
        return None
    if position is None:
        return None
    keys = _keys(values, transfer_syntax_uid)
    if keys is None:
        return None
    return Header(keys, raw=data[:position]), position


# Sequences nested deeper than this go to pydicom (real headers nest two or three levels).
_MAX_DEPTH = 8
# Deeper than this, a data set is refused as malformed.
_MAX_NESTING = 64
_VR_LETTERS = frozenset(range(ord("A"), ord("Z") + 1))


def _walk(
    data: bytes, position: int, implicit: bool, *, depth: int, values: dict[int, bytes] | None
) -> int | None:
    """Walk one data set from `position`: the top level (`values` given: the key elements are
    collected there) up to its pixel data, or an item up to its delimiter. Returns where it
    stopped (the pixel data element, or just after the item delimiter), None to decline."""
    end, previous = len(data), -1
    while True:
        if position + 8 > end:
            return None
        group, element, length = struct.unpack_from("<HHI", data, position)
        tag = group << 16 | element
        if values is not None and tag in _PIXEL_DATA_TAGS:
            return position
        if values is None and tag == _ITEM_DELIMITER:
            return position + 8
        if tag <= previous or group < 0x0008 or group == 0xFFFE:
            return None
        looks_explicit = data[position + 4] in _VR_LETTERS and data[position + 5] in _VR_LETTERS
        if previous == -1 and looks_explicit != (not implicit):
            return None  # pydicom would switch to the other VR mode
        previous = tag
        if implicit:
            vr, start = b"", position + 8
        else:
            vr = data[position + 4 : position + 6]
            if not looks_explicit:
                return None
            if vr in _LONG_VRS:
                if position + 12 > end:
                    return None
                length, start = struct.unpack_from("<I", data, position + 8)[0], position + 12
            else:
                length, start = struct.unpack_from("<H", data, position + 6)[0], position + 8
        if length == _UNDEFINED_LENGTH:
            is_sequence = vr == b"SQ" if not implicit else _dictionary_vr(tag) == "SQ"
            if not is_sequence or depth >= _MAX_DEPTH:
                return None
            after = _skip_sequence(data, start, implicit, depth=depth + 1)
            if after is None:
                return None
            position = after
            continue
        position = start + length
        if position > end:
            return None
        expected_vr = _KEY_TAGS.get(tag)
        if values is not None and expected_vr is not None:
            if vr and vr != expected_vr:
                return None
            values[tag] = data[start:position]


def _skip_sequence(data: bytes, position: int, implicit: bool, *, depth: int) -> int | None:
    """Where an undefined-length sequence whose items start at `position` ends."""
    end = len(data)
    while True:
        if position + 8 > end:
            return None
        group, element, length = struct.unpack_from("<HHI", data, position)
        tag = group << 16 | element
        position += 8
        if tag == _SEQUENCE_DELIMITER:
            return position if length == 0 else None
        if tag != _ITEM:
            return None
        if length == _UNDEFINED_LENGTH:
            after = _walk(data, position, implicit, depth=depth, values=None)
            if after is None:
                return None
            position = after
        else:
            position += length
            if position > end:
                return None


def _dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""  # private or unknown: not known to be a sequence


# The elements `read_leading_header` decodes, with their VR.
_STUDY_UID, _SERIES_UID, _SOP_UID = 0x0020000D, 0x0020000E, 0x00080018
_INSTANCE_NUMBER, _COLUMNS, _FRAMES = 0x00200013, 0x00280011, 0x00280008
_CHARACTER_SET = 0x00080005
_KEY_TAGS = {
    _CHARACTER_SET: b"CS",
    _STUDY_UID: b"UI",
    _SERIES_UID: b"UI",
    _SOP_UID: b"UI",
    0x00080016: b"UI",  # SOP Class UID
    _INSTANCE_NUMBER: b"IS",
    0x00280010: b"US",  # Rows
    _COLUMNS: b"US",
    _FRAMES: b"IS",
}


_PLAIN_INTEGER = re.compile(rb" *[+-]?[0-9]{1,10} *")


@functools.lru_cache(maxsize=64)
def _readable_character_set(raw: bytes) -> bool:
    """Whether pydicom can read a data set with this Specific Character Set: it decodes the
    value as soon as it meets it, and a value it cannot look up makes the whole file
    unreadable to it (and so to viewers)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert_encodings(convert_string(raw, True))
    except Exception:
        return False
    return True


def _keys(values: dict[int, bytes], transfer_syntax_uid: str) -> InstanceKeys | None:
    if _CHARACTER_SET in values and not _readable_character_set(values[_CHARACTER_SET]):
        return None
    uids = []
    for tag in (_STUDY_UID, _SERIES_UID, _SOP_UID, 0x00080016):
        try:
            uid = values.get(tag, b"").rstrip(b"\0 ").decode("ascii")
        except UnicodeDecodeError:
            return None
        if not is_valid_uid(uid):
            return None
        uids.append(uid)

    def unsigned_short(tag: int) -> int | None:
        raw = values.get(tag)
        return struct.unpack("<H", raw)[0] if raw is not None and len(raw) == 2 else None

    def integer_string(tag: int, minimum: int) -> int | None:
        raw = values.get(tag)
        if raw is None:
            return None
        number = int(raw)  # the caller checked its form
        return number if minimum <= number < 2**31 else None

    for tag in (_INSTANCE_NUMBER, _FRAMES):
        # Only the plain form: pydicom reads "3.0" or "1e1" too, and so must whoever else
        # reads the key, so anything else goes to pydicom.
        if tag in values and not _PLAIN_INTEGER.fullmatch(values[tag]):
            return None

    return InstanceKeys(
        study_uid=uids[0],
        series_uid=uids[1],
        sop_instance_uid=uids[2],
        sop_class_uid=uids[3],
        transfer_syntax_uid=transfer_syntax_uid,
        instance_number=integer_string(_INSTANCE_NUMBER, -(2**31)),
        rows=unsigned_short(0x00280010),
        columns=unsigned_short(_COLUMNS),
        number_of_frames=integer_string(_FRAMES, 1) or 1,
    )


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
    # Only real multi-values are joined: PersonName and str are iterable too, character by
    # character.
    if isinstance(value, MultiValue | list | tuple):
        result = "\\".join(str(v) for v in value)
    else:
        result = str(value)
    # Control characters (NUL above all, which PostgreSQL refuses) have no place in a name
    # or a description; a hostile data set must not make its index row fail.
    return _CONTROL.sub("", result).strip()[:max_length]


def integer(ds: Dataset, keyword: str, minimum: int = -(2**31)) -> int | None:
    """A dataset element as an integer that fits the index's columns, else None."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        number = int(value)
    except Exception:  # a garbled value: pydicom's conversion may raise many types
        return None
    return number if minimum <= number < 2**31 else None


# --- Completeness -------------------------------------------------------------------------
# A file cut short (an interrupted copy, a sender that died mid-transfer) parses perfectly up to
# its pixel data, and pydicom reads a short last value without complaint: only walking the
# element headers to the end of the file tells a whole data set from a truncated one.

# Explicit VRs whose length is a 32-bit field after two reserved bytes (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
# Pixel Data, Float Pixel Data, Double Float Pixel Data.
_PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


class _ElementWalker:
    """Reads element headers and skips values, never past the end of the file."""

    def __init__(self, handle: BinaryIO, end: int, little_endian: bool) -> None:
        self.handle = handle
        self.end = end
        self.order = "<" if little_endian else ">"
        self.depth = 0

    def _read(self, size: int) -> bytes:
        data = self.handle.read(size)
        if len(data) < size:
            raise InvalidDicom("the data set is truncated: the file ends inside an element")
        return data

    def _skip(self, length: int) -> None:
        target = self.handle.tell() + length
        if target > self.end:
            raise InvalidDicom("the data set is truncated: an element is longer than the file")
        self.handle.seek(target)

    def _header(self, implicit: bool) -> tuple[int, bytes, int]:
        group, element = struct.unpack(f"{self.order}HH", self._read(4))
        tag = group << 16 | element
        if implicit or group == 0xFFFE:  # items and delimiters never carry a VR
            return tag, b"", struct.unpack(f"{self.order}I", self._read(4))[0]
        vr = self._read(2)
        if vr in _LONG_VRS:
            self._read(2)
            return tag, vr, struct.unpack(f"{self.order}I", self._read(4))[0]
        return tag, vr, struct.unpack(f"{self.order}H", self._read(2))[0]

    def data_set(self, implicit: bool, stop: int | None, delimiter: int | None = None) -> None:
        """Walk elements up to `stop` (a position) or up to the `delimiter` tag."""
        while stop is None or self.handle.tell() < stop:
            tag, vr, length = self._header(implicit)
            if delimiter is not None and tag == delimiter:
                return
            if length == _UNDEFINED_LENGTH:
                # A sequence, or encapsulated pixel data; an undefined length UN holds
                # implicit VR little endian data (PS3.5 6.2.2).
                self._items(implicit or vr == b"UN")
            else:
                self._skip(length)
        if stop is not None and self.handle.tell() != stop:
            raise InvalidDicom("the data set is malformed: an element overruns its item")

    def _items(self, implicit: bool) -> None:
        self.depth += 1
        if self.depth > _MAX_NESTING:
            # Far beyond any real header, and a recursion the interpreter would refuse.
            raise InvalidDicom("the data set is malformed: sequences nested too deeply")
        try:
            self._walk_items(implicit)
        finally:
            self.depth -= 1

    def _walk_items(self, implicit: bool) -> None:
        while True:
            tag, _vr, length = self._header(implicit=True)
            if tag == _SEQUENCE_DELIMITER:
                return
            if tag != _ITEM:
                raise InvalidDicom(f"the data set is malformed: tag {tag:08X} inside a sequence")
            if length == _UNDEFINED_LENGTH:
                self.data_set(implicit, stop=None, delimiter=_ITEM_DELIMITER)
            else:
                self._skip(length)


# Tag, VR, two reserved bytes and a 32-bit length: the longest element header.
LONGEST_ELEMENT_HEADER = 12


def pixel_data_ends_data_set(element: bytes, *, transfer_syntax_uid: str, remaining: int) -> bool:
    """Whether a little endian pixel data element of defined length, whose first bytes are
    `element`, spans exactly the `remaining` bytes of its data set.

    The quick form of `check_complete` for the usual layout of uncompressed images, pixel
    data last. False means "not shown": the caller runs the full check.
    """
    if transfer_syntax_uid in {ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}:
        return False
    if transfer_syntax_uid == ImplicitVRLittleEndian:
        if len(element) < 8:
            return False
        header, length = 8, struct.unpack_from("<I", element, 4)[0]
    else:
        if len(element) < 12 or element[4:6] not in _LONG_VRS:
            return False
        header, length = 12, struct.unpack_from("<I", element, 8)[0]
    if length == _UNDEFINED_LENGTH:
        return False  # encapsulated: its fragments are few, the full walk is cheap
    return header + length == remaining


def check_complete(handle: BinaryIO, transfer_syntax_uid: str) -> None:
    """Raise InvalidDicom unless the Part 10 file in `handle` holds a whole data set: every
    element fits in the file and the last one ends where the file ends. Reads element headers
    only (values are skipped), so it costs little even for large images."""
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        return  # the data set is a zlib stream: pydicom's inflate would notice a cut
    end = handle.seek(0, 2)
    handle.seek(0)
    offset = dataset_offset(handle.read(144))
    if offset > end:
        raise InvalidDicom("the file is truncated inside its file meta information")
    handle.seek(offset)
    walker = _ElementWalker(handle, end, little_endian=transfer_syntax_uid != ExplicitVRBigEndian)
    walker.data_set(implicit=transfer_syntax_uid == ImplicitVRLittleEndian, stop=end)
    # A cut that falls exactly between two elements leaves a well-formed data set, which only
    # the transport can tell (over DIMSE, the last fragment is flagged). A well-formed object
    # without pixel data (a dose report, a presentation state, some image IODs as real
    # archives hold them) is kept: Orthanc and dcmtk keep it too.


# --- Values as people read them ---------------------------------------------------------------


def display_name(value: object) -> str:
    """A DICOM PN as people write it: given name, then family name (the alphabetic group)."""
    name = PersonName(str(value))
    return " ".join(part for part in (name.given_name, name.family_name) if part) or str(value)


def date_value(value: object) -> datetime.date | None:
    """A DICOM DA (YYYYMMDD) as a date, or None when it is empty or malformed."""
    try:
        return datetime.datetime.strptime(str(value), "%Y%m%d").date()
    except ValueError:
        return None
