"""Synthetic DICOM studies: the demo's data, the test suite's PACS content, the benchmark's CT.

Everything here is made up (names, UIDs, pixels) and needs only pydicom: pixels are built with
bytes arithmetic, so a 300-slice 512×512 CT takes seconds without numpy. Compression goes
through pydicom's encoders and is only possible where one is installed (JPEG-LS needs pyjpegls,
a development dependency); `can_compress` says whether it is.
"""

import math
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
    generate_uid,
)


@dataclass(frozen=True)
class _Modality:
    sop_class_uid: str
    series_description: str
    body_part: str
    window_center: int
    window_width: int
    rescale_intercept: int
    slice_thickness: float
    # Stored pixel values of air, soft tissue, an organ and bone (or their MR look-alikes).
    air: int
    tissue: int
    organ: int
    bone: int


_MODALITIES = {
    "CT": _Modality(
        sop_class_uid=CTImageStorage,
        series_description="Thorax-abdomen, coupes axiales",
        body_part="CHEST",
        window_center=40,
        window_width=400,
        rescale_intercept=-1024,
        slice_thickness=1.25,
        air=24,
        tissue=1064,
        organ=1124,
        bone=2200,
    ),
    "MR": _Modality(
        sop_class_uid=MRImageStorage,
        series_description="T2 axial, séquence turbo spin écho",
        body_part="ABDOMEN",
        window_center=400,
        window_width=800,
        rescale_intercept=0,
        slice_thickness=5.0,
        air=3,
        tissue=420,
        organ=760,
        bone=90,
    ),
}


def can_compress(transfer_syntax: str = JPEGLSLossless) -> bool:
    """Whether pydicom has an encoder for this transfer syntax on this machine."""
    from pydicom.pixels import get_encoder

    try:
        return bool(get_encoder(transfer_syntax).is_available)
    except (NotImplementedError, ValueError):  # pydicom's answers for "no such encoder"
        return False


def iter_study(
    *,
    patient_name: str,
    patient_id: str,
    modalities: Iterable[tuple[str, int]] = (("CT", 3), ("MR", 2)),
    rows: int = 64,
    columns: int = 64,
    charset: str = "ISO_IR 192",
    compress_series: int | Collection[int] | None = None,
    compression: str = JPEGLSLossless,
    transfer_syntax: str = ExplicitVRLittleEndian,
    study_uid: str | None = None,
    patient_birth_date: str = "19700101",
    patient_sex: str = "O",
    accession_number: str = "",
    study_date: str = "",
    study_description: str = "Scanner et IRM thoraco-abdominaux",
    referring_physician_name: str = "Dupré^Anaïs^^Dr",
) -> Iterator[Dataset]:
    """Yield the instances of one study, series after series, as Part 10 ready data sets.

    `modalities` lists (modality, number of slices) per series, "CT" or "MR". The series whose
    indexes are in `compress_series` are encoded with `compression`; the others use
    `transfer_syntax` (an uncompressed one). `charset` is the Specific Character Set: names and
    descriptions are encoded with it when written, "ISO_IR 100" (Latin-1) or "ISO_IR 192" (UTF-8).
    """
    if isinstance(compress_series, int):
        compress_series = {compress_series}
    compressed = set(compress_series or ())
    if compressed and not can_compress(compression):
        raise RuntimeError(f"no encoder for transfer syntax {compression} is installed")
    now = datetime.now()
    study_uid = study_uid or generate_uid()
    study_date = study_date or date.today().strftime("%Y%m%d")
    study: dict[str, object] = {
        "SpecificCharacterSet": charset,
        "PatientName": patient_name,
        "PatientID": patient_id,
        "PatientBirthDate": patient_birth_date,
        "PatientSex": patient_sex,
        "StudyInstanceUID": study_uid,
        "StudyDate": study_date,
        "StudyTime": "083000",
        "StudyID": "1",
        "AccessionNumber": accession_number or f"ACC{int(now.timestamp()) % 10**8:08d}",
        "StudyDescription": study_description,
        "ReferringPhysicianName": referring_physician_name,
        "InstitutionName": "Hôpital de démonstration",
        "Manufacturer": "Image portal synthetic data",
    }
    frame_of_reference = generate_uid()
    for index, (modality, count) in enumerate(modalities):
        kind = _MODALITIES[modality]
        series: dict[str, object] = {
            "Modality": modality,
            "SeriesInstanceUID": generate_uid(),
            "SeriesNumber": index + 1,
            "SeriesDescription": kind.series_description,
            "SeriesDate": study_date,
            "SeriesTime": f"08{30 + index:02d}00",
            "BodyPartExamined": kind.body_part,
            "FrameOfReferenceUID": frame_of_reference,
            "PositionReferenceIndicator": "",
            "PatientPosition": "HFS",
        }
        for number in range(count):
            ds = _instance(study, series, kind, number, count, rows, columns, transfer_syntax)
            if index in compressed:
                ds.compress(compression, generate_instance_uid=False)
            yield ds


def make_study(**kwargs: object) -> list[Dataset]:
    """All the instances of one study (see `iter_study` for the arguments)."""
    return list(iter_study(**kwargs))  # type: ignore[arg-type]


def _instance(
    study: dict[str, object],
    series: dict[str, object],
    kind: _Modality,
    number: int,
    count: int,
    rows: int,
    columns: int,
    transfer_syntax: str,
) -> Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(kind.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)

    ds = Dataset()
    ds.file_meta = meta
    for keyword, value in study.items():
        setattr(ds, keyword, value)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = kind.sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = study["StudyDate"]
    ds.InstanceCreationTime = "083100"
    for keyword, value in series.items():
        setattr(ds, keyword, value)
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number + 1
    ds.ContentDate = study["StudyDate"]
    ds.ContentTime = f"0831{number % 60:02d}"
    spacing = round(350.0 / columns, 4)
    z = -number * kind.slice_thickness
    ds.ImagePositionPatient = [-spacing * columns / 2, -spacing * rows / 2, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = kind.slice_thickness
    ds.SliceLocation = z
    if ds.Modality == "CT":
        ds.KVP = 120
        ds.ConvolutionKernel = "STANDARD"
        ds.RescaleIntercept = kind.rescale_intercept
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SK"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 4000
        ds.EchoTime = 90
        ds.EchoTrainLength = 16
        ds.MagneticFieldStrength = 1.5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = kind.window_center
    ds.WindowWidth = kind.window_width
    ds.PixelData = slice_pixels(rows, columns, number, count, kind)
    return ds


def slice_pixels(rows: int, columns: int, number: int, count: int, kind: _Modality) -> bytes:
    """One slice of a phantom, 16-bit little endian: a body, an organ that grows and shrinks
    along the series, a spine, and a faint row texture so that no two rows are alike."""
    organ_radius = 0.18 + 0.10 * math.sin(math.pi * (number + 0.5) / max(count, 1))
    body = _Ellipse(cx=0.5, cy=0.5, rx=0.42, ry=0.33)
    organ = _Ellipse(cx=0.42, cy=0.45, rx=organ_radius * 0.9, ry=organ_radius * 0.7)
    spine = _Ellipse(cx=0.5, cy=0.74, rx=0.05, ry=0.05)
    air = kind.air.to_bytes(2, "little")
    out = bytearray()
    for y in range(rows):
        row = bytearray(air * columns)
        fy = (y + 0.5) / rows
        texture = (y * 7 + number * 3) % 24
        for shape, value in ((body, kind.tissue), (organ, kind.organ), (spine, kind.bone)):
            span = shape.span(fy, columns)
            if span is not None:
                x0, x1 = span
                row[2 * x0 : 2 * x1] = (value + texture).to_bytes(2, "little") * (x1 - x0)
        out += row
    return bytes(out)


@dataclass(frozen=True)
class _Ellipse:
    cx: float
    cy: float
    rx: float
    ry: float

    def span(self, fy: float, columns: int) -> tuple[int, int] | None:
        """The columns [x0, x1) this ellipse covers on the row at relative height fy."""
        dy = (fy - self.cy) / self.ry
        if abs(dy) >= 1:
            return None
        half = self.rx * math.sqrt(1 - dy * dy)
        x0 = max(0, round((self.cx - half) * columns))
        x1 = min(columns, round((self.cx + half) * columns))
        return (x0, x1) if x1 > x0 else None


def to_bytes(ds: Dataset) -> bytes:
    """The Part 10 file of a data set (preamble, file meta, data set)."""
    buffer = DicomBytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def write_study(datasets: Iterable[Dataset], folder: Path) -> list[Path]:
    """Write each data set as <folder>/<series number>/<instance number>.dcm; return the paths."""
    paths = []
    for ds in datasets:
        path = Path(folder) / f"{int(ds.SeriesNumber):03d}" / f"{int(ds.InstanceNumber):04d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(to_bytes(ds))
        paths.append(path)
    return paths
