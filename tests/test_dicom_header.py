"""The storage SCP's quick header reader against pydicom's full parse.

`read_leading_header` decodes a few elements by hand from a data set still arriving: whatever
the bytes, it must either agree with pydicom or decline (None), never give other keys.
"""

import io
import struct

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless

from studies import dicom
from studies.demo import synthetic


def _one_instance(transfer_syntax: str = ExplicitVRLittleEndian, **kwargs: object) -> Dataset:
    return synthetic.make_study(
        patient_name="Lefèvre^Zoé",
        patient_id="HDR-1",
        modalities=(("CT", 1),),
        rows=8,
        columns=8,
        transfer_syntax=transfer_syntax,
        **kwargs,
    )[0]


def _data_set_bytes(ds: Dataset) -> bytes:
    part10 = synthetic.to_bytes(ds)
    return part10[dicom.dataset_offset(part10) :]


def _with_sequence_of_undefined_length(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    nested = Dataset()
    nested.CodeValue = "T-D0050"
    item.PurposeOfReferenceCodeSequence = Sequence([nested])
    ds.ReferencedImageSequence = Sequence([item])
    ds["ReferencedImageSequence"].is_undefined_length = True
    for element in (ds.ReferencedImageSequence[0], nested):
        element.is_undefined_length_sequence_item = True
    return ds


def _expected(ds: Dataset) -> dicom.InstanceKeys:
    whole = dicom.read_header(synthetic.to_bytes(ds))
    return dicom.Header.of(whole).keys


@pytest.mark.parametrize(
    "make",
    [
        lambda: _one_instance(),
        lambda: _one_instance(ImplicitVRLittleEndian),
        lambda: _with_sequence_of_undefined_length(_one_instance()),
        lambda: _with_sequence_of_undefined_length(_one_instance(ImplicitVRLittleEndian)),
    ],
    ids=["explicit", "implicit", "explicit-sequence", "implicit-sequence"],
)
def test_it_agrees_with_pydicom_or_declines_at_every_cut(make: object) -> None:
    ds = make()  # type: ignore[operator]
    syntax = str(ds.file_meta.TransferSyntaxUID)
    data = _data_set_bytes(ds)
    expected = _expected(ds)
    if "ReferencedImageSequence" in ds:
        assert b"\xfe\xff\xdd\xe0" in data  # the sequence delimiter: undefined lengths
    found = dicom.read_leading_header(data, syntax)
    assert found is not None
    header, pixel_offset = found
    assert header.keys == expected
    assert data[pixel_offset : pixel_offset + 4] == b"\xe0\x7f\x10\x00"
    # The descriptive elements, parsed on demand, are pydicom's.
    assert str(header.dataset().PatientName) == "Lefèvre^Zoé"
    assert header.dataset().SeriesDescription == ds.SeriesDescription
    # A data set cut anywhere before its pixel data: declined, never misread.
    for cut in range(pixel_offset + 8):
        partial = dicom.read_leading_header(data[:cut], syntax)
        assert partial is None or partial[0].keys == expected, cut


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the bad UID, on purpose
def test_it_declines_what_it_does_not_read_as_pydicom_would() -> None:
    ds = _one_instance()
    syntax = str(ds.file_meta.TransferSyntaxUID)
    missing = _one_instance()
    del missing.SeriesInstanceUID
    assert dicom.read_leading_header(_data_set_bytes(missing), syntax) is None
    bad_uid = _one_instance()
    bad_uid.SOPInstanceUID = "1.2.3.abc"
    assert dicom.read_leading_header(_data_set_bytes(bad_uid), syntax) is None
    # Rows in a VR other than its standard one: pydicom decides what it means.
    odd_vr = _data_set_bytes(_one_instance())
    rows_at = odd_vr.index(b"\x28\x00\x10\x00US")
    odd_vr = odd_vr[: rows_at + 4] + b"SS" + odd_vr[rows_at + 6 :]
    assert dicom.read_leading_header(odd_vr, syntax) is None
    # Big endian and deflate go to pydicom.
    data = _data_set_bytes(ds)
    assert dicom.read_leading_header(data, "1.2.840.10008.1.2.2") is None
    assert dicom.read_leading_header(data, "1.2.840.10008.1.2.1.99") is None


def test_it_reads_the_header_of_a_compressed_instance() -> None:
    ds = _one_instance(compress_series=0)
    data = _data_set_bytes(ds)
    found = dicom.read_leading_header(data, str(ds.file_meta.TransferSyntaxUID))
    assert found is not None
    assert found[0].keys == _expected(ds)
    assert found[0].keys.transfer_syntax_uid == JPEGLSLossless


def test_odd_integer_values_are_left_out_as_pydicom_leaves_them() -> None:
    ds = _one_instance()
    ds.InstanceNumber = "7"
    ds.NumberOfFrames = "0"  # below the minimum: one frame
    data = _data_set_bytes(ds)
    found = dicom.read_leading_header(data, ExplicitVRLittleEndian)
    assert found is not None
    keys = found[0].keys
    assert (keys.instance_number, keys.number_of_frames) == (7, 1)
    assert keys == _expected(ds)


# --- Crafted data sets: a sender that wants an instance filed under another study ------------


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"SQ", b"UN"):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\x00" if len(raw) % 2 else raw


def _keys_of(study: str) -> bytes:
    return b"".join(
        [
            _explicit(0x0008, 0x0016, b"UI", _uid("1.2.840.10008.5.1.4.1.1.2")),
            _explicit(0x0008, 0x0018, b"UI", _uid("1.2.3.4.5.6")),
            _explicit(0x0020, 0x000D, b"UI", _uid(study)),
            _explicit(0x0020, 0x000E, b"UI", _uid(study + ".1")),
        ]
    )


_PIXELS = _explicit(0x7FE0, 0x0010, b"OB", b"\x00" * 8)
_ITEM_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)


@pytest.mark.parametrize(
    "data",
    [
        # pydicom stops at a top-level item delimiter: it would read study A, not B.
        _keys_of("1.2.3.111")[:-30] + _ITEM_DELIMITER + _keys_of("1.2.3.999")[-60:] + _PIXELS,
        # A key repeated: which one counts is pydicom's business.
        _keys_of("1.2.3.111") + _explicit(0x0020, 0x000D, b"UI", _uid("1.2.3.999")) + _PIXELS,
        # A file meta element in the data set: pydicom folds it into the file meta.
        _explicit(0x0002, 0x0010, b"UI", _uid("1.2.840.10008.1.2")) + _keys_of("1.2.3") + _PIXELS,
        # An undefined length on something other than a sequence.
        _explicit(0x0008, 0x0005, b"CS", b"ISO_IR 100")
        + struct.pack("<HH2sHI", 0x0008, 0x0010, b"OB", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        + _keys_of("1.2.3")
        + _PIXELS,
        # A character set pydicom cannot look up makes the file unreadable to it.
        _explicit(0x0008, 0x0005, b"CS", b"ISO_IR\x00100") + _keys_of("1.2.3") + _PIXELS,
        # Instance Number in a form pydicom reads otherwise ("3.0" is 3 to it).
        _keys_of("1.2.3") + _explicit(0x0020, 0x0013, b"IS", b"3.0 ") + _PIXELS,
    ],
    ids=["item-delimiter", "repeated-key", "file-meta", "undefined-ob", "charset", "is-form"],
)
def test_it_declines_layouts_pydicom_may_read_otherwise(data: bytes) -> None:
    assert dicom.read_leading_header(data, ExplicitVRLittleEndian) is None


def _implicit(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def test_an_implicit_data_set_that_looks_explicit_is_declined() -> None:
    """Read as implicit VR, its first element (0008,0054) is 0x4541 bytes long and hides the
    explicit keys of study B; pydicom, seeing "AE" where a VR would be, switches to explicit VR
    and reads B. Whatever it reads, the walker must not read A."""
    first = struct.pack("<HH2sH", 0x0008, 0x0054, b"AE", 0)
    hidden = _keys_of("1.2.3.999")
    implicit_keys = b"".join(
        [
            _implicit(0x0008, 0x0016, _uid("1.2.840.10008.5.1.4.1.1.2")),
            _implicit(0x0008, 0x0018, _uid("1.2.3.4.5.6")),
            _implicit(0x0020, 0x000D, _uid("1.2.3.111")),
            _implicit(0x0020, 0x000E, _uid("1.2.3.111.1")),
        ]
    )
    padding = 0x4541 - len(hidden) - 12
    data = (
        first
        + hidden
        + struct.pack("<HH2sHI", 0x0019, 0x1000, b"OB", 0, padding + len(implicit_keys))
        + b"\x00" * padding
        + implicit_keys
        + struct.pack("<HHI", 0x7FE0, 0x0010, 8)
        + b"\x00" * 8
    )
    assert dicom.read_leading_header(data, ImplicitVRLittleEndian) is None


def test_sequences_nested_without_end_are_declined_without_a_crash() -> None:
    nested = b""
    for _ in range(5000):  # far deeper than the interpreter's recursion limit
        nested = (
            struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
            + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
            + nested
        )
    data = _keys_of("1.2.3")[:20] + nested + _PIXELS
    assert dicom.read_leading_header(data, ExplicitVRLittleEndian) is None


def test_the_completeness_check_refuses_sequences_nested_without_end() -> None:
    nested = b""
    for _ in range(5000):
        nested = (
            struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
            + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
            + nested
        )
    meta = dicom.encode_file_meta(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.3",
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    with pytest.raises(dicom.InvalidDicom, match="nested too deeply"):
        dicom.check_complete(io.BytesIO(meta + nested), ExplicitVRLittleEndian)
