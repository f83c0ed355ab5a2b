"""The multipart/related answers of WADO-RS, as servers really write their Content-Type."""

import pytest

from studies.wado import DicomwebError, iter_multipart, multipart_boundary


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        ('multipart/related; type="application/dicom"; boundary=abc123', b"abc123"),
        # Parameter names are case-insensitive (RFC 2045 5.1), and so is the media type.
        ('Multipart/Related; Type="application/dicom"; BOUNDARY=abc123', b"abc123"),
        ('multipart/related;type="application/dicom";Boundary="abc123"', b"abc123"),
        # A quoted boundary may hold spaces (RFC 2046 5.1.1).
        ('multipart/related; boundary="a boundary with spaces"; type="application/dicom"',
         b"a boundary with spaces"),
        ("multipart/related; boundary = spaced-out ; type=application/dicom", b"spaced-out"),
    ],
)  # fmt: skip
def test_it_finds_the_boundary(content_type: str, boundary: bytes) -> None:
    assert multipart_boundary(content_type) == boundary


@pytest.mark.parametrize(
    "content_type",
    [
        'multipart/related; type="application/dicom"',
        "multipart/related; boundary=",
        'multipart/related; boundary=""',
        "application/dicom; boundary=abc",
        "multipart/related; boundary=café",
    ],
)
def test_it_refuses_an_answer_without_a_usable_boundary(content_type: str) -> None:
    with pytest.raises(DicomwebError):
        multipart_boundary(content_type)


def test_it_splits_a_body_whose_quoted_boundary_has_spaces() -> None:
    content_type = 'multipart/related; type="application/dicom"; BOUNDARY="my parts"'
    body = (
        b"--my parts\r\nContent-Type: application/dicom\r\n\r\nfirst\r\n"
        b"--my parts\r\nContent-Type: application/dicom\r\n\r\nsecond part\r\n"
        b"--my parts--\r\n"
    )
    # Delivered in small pieces, as a network would.
    chunks = iter([body[i : i + 7] for i in range(0, len(body), 7)])

    parts = list(iter_multipart(chunks, multipart_boundary(content_type)))

    assert parts == [b"first", b"second part"]
