"""The storage SCP's quick header reader against pydicom's full parse.

`read_leading_header` decodes a few elements by hand from a data set still arriving: whatever
the bytes, it must either agree with pydicom or decline (None), never give other keys.
"""

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless

from studies import dicom, synthetic


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
