"""The streamed study ZIP: layout, DICOMDIR, byte identity, escaping, completion, ZIP64."""

import hashlib
import io
import re
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from dicomweb.archive import ArchiveError, ArchiveInstance, study_zip

HOSTILE_NAME = "<script>alert(1)</script>^Eve"
JPEG = b"\xff\xd8\xff\xe0fake-jpeg\xff\xd9"


def _ct(
    *, study_uid: str, series_uid: str, series_number: int, number: int, syntax: str
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = HOSTILE_NAME
    ds.PatientID = "PID-1"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240315"
    ds.StudyTime = "101500"
    ds.StudyID = "7"
    ds.StudyDescription = "CT thorax & <abdomen>"
    ds.AccessionNumber = "ACC1"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"Serie {series_number} <b>"
    ds.Modality = "CT"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = (np.arange(64 * 64, dtype=np.int16) * number).tobytes()
    return ds


def _record(path: Path, ds: Dataset) -> ArchiveInstance:
    return ArchiveInstance(
        path=path,
        size=path.stat().st_size,
        patient_name=str(ds.PatientName),
        patient_id=ds.PatientID,
        study_instance_uid=ds.StudyInstanceUID,
        study_date=ds.StudyDate,
        study_time=ds.StudyTime,
        study_description=ds.StudyDescription,
        accession_number=ds.AccessionNumber,
        series_instance_uid=ds.SeriesInstanceUID,
        series_number=ds.SeriesNumber,
        modality=ds.Modality,
        series_description=ds.SeriesDescription,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        instance_number=ds.InstanceNumber,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
    )


@pytest.fixture
def study(tmp_path: Path) -> list[ArchiveInstance]:
    """2 series × 3 CT instances, one of them in Implicit VR Little Endian."""
    study_uid = generate_uid()
    store = tmp_path / "store"
    store.mkdir()
    records = []
    for series_number in (1, 2):
        series_uid = generate_uid()
        # Given out of order: the archive sorts by instance number.
        for number in (3, 1, 2):
            syntax = ImplicitVRLittleEndian if (series_number, number) == (2, 2) else None
            ds = _ct(
                study_uid=study_uid,
                series_uid=series_uid,
                series_number=series_number,
                number=number,
                syntax=syntax or ExplicitVRLittleEndian,
            )
            path = store / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            records.append(_record(path, ds))
    return records


def _zip_bytes(chunks: Iterator[bytes]) -> bytes:
    return b"".join(chunks)


def _unzip(data: bytes, where: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        archive.extractall(where)
    return where


class TestStudyZip:
    def test_it_lists_every_instance_in_a_dicomdir_with_identical_bytes(
        self, study: list[ArchiveInstance], tmp_path: Path
    ) -> None:
        data = _zip_bytes(study_zip(study, previews=None, language="en"))
        root = _unzip(data, tmp_path / "out")

        fs = FileSet(pydicom.dcmread(root / "DICOMDIR"))
        originals = {r.sop_instance_uid: hashlib.sha256(r.path.read_bytes()) for r in study}
        found = {}
        for instance in fs:
            file_id = Path(instance.path).relative_to(root)
            assert all(
                len(part) <= 8 and re.fullmatch(r"[A-Z0-9_]+", part) for part in file_id.parts
            )
            found[instance.SOPInstanceUID] = hashlib.sha256(Path(instance.path).read_bytes())
            assert instance.TransferSyntaxUID == next(
                r.transfer_syntax_uid
                for r in study
                if r.sop_instance_uid == instance.SOPInstanceUID
            )
        assert {k: v.hexdigest() for k, v in found.items()} == {
            k: v.hexdigest() for k, v in originals.items()
        }
        # Nothing but what the DICOMDIR references lives under DICOM/.
        on_disk = {p for p in (root / "DICOM").rglob("*") if p.is_file()}
        assert on_disk == {Path(i.path) for i in fs}

    def test_it_writes_the_records_pydicoms_fileset_would(
        self, study: list[ArchiveInstance], tmp_path: Path
    ) -> None:
        """Differential: FileSet.write of the same instances gives the same records (apart from
        offsets, File IDs and the study ID the index does not hold)."""
        data = _zip_bytes(study_zip(study, previews=None, language="en"))
        ours = FileSet(pydicom.dcmread(_unzip(data, tmp_path / "out") / "DICOMDIR"))

        reference = FileSet()
        for record in study:
            reference.add(record.path)
        reference.write(tmp_path / "reference")
        ignored = {
            "OffsetOfTheNextDirectoryRecord",
            "OffsetOfReferencedLowerLevelDirectoryEntity",
            "ReferencedFileID",
            "StudyID",
        }

        def records(fs: FileSet) -> dict[str, list[dict[str, str]]]:
            out: dict[str, list[dict[str, str]]] = {}
            for instance in fs:
                chain = [instance.node, *instance.node.ancestors]
                out[instance.SOPInstanceUID] = [
                    {e.keyword: str(e.value) for e in n._record if e.keyword not in ignored}
                    for n in chain
                ]
            return out

        assert len(records(ours)) == len(study)
        assert records(ours) == records(reference)

    def test_it_adds_readme_index_and_previews_with_escaped_strings(
        self, study: list[ArchiveInstance], tmp_path: Path
    ) -> None:
        asked: list[str] = []

        def previews(instance: ArchiveInstance) -> bytes | None:
            asked.append(instance.sop_instance_uid)
            # The second series has no preview: it must not be linked.
            return JPEG if instance.series_number == 1 else None

        data = _zip_bytes(study_zip(study, previews=previews, language="en"))
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
            readme = archive.read("README.TXT").decode()
            index = archive.read("INDEX.HTM").decode()
            jpegs = [n for n in names if n.startswith("IHE_PDI/")]
            assert len(jpegs) == 1
            assert archive.read(jpegs[0]) == JPEG

        assert len(asked) == 2  # one preview per series
        assert "DICOMDIR" in readme and "INDEX.HTM" in readme and "Weasis" in readme
        assert "<script>" not in index and "&lt;script&gt;" in index
        assert "&lt;abdomen&gt;" in index and "&lt;b&gt;" in index
        links = re.findall(r'(?:href|src)="([^"]+)"', index)
        assert jpegs[0] in links
        for link in links:
            target = link.rstrip("/")
            assert target in names or any(n.startswith(target + "/") for n in names), link

    def test_it_speaks_the_recipients_language(self, study: list[ArchiveInstance]) -> None:
        data = _zip_bytes(study_zip(study, previews=None, language="fr"))
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            assert '<html lang="fr">' in archive.read("INDEX.HTM").decode()

    @pytest.mark.parametrize("zip64", [False, True])
    def test_it_passes_unzip_t(
        self, study: list[ArchiveInstance], tmp_path: Path, zip64: bool
    ) -> None:
        threshold = 1 if zip64 else 0xFFFFFFFF
        path = tmp_path / "study.zip"
        path.write_bytes(
            _zip_bytes(study_zip(study, previews=None, language="en", zip64_threshold=threshold))
        )
        result = subprocess.run(["unzip", "-t", path], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "No errors detected" in result.stdout

    def test_it_uses_zip64_past_the_threshold_and_plain_zip_below(
        self, study: list[ArchiveInstance]
    ) -> None:
        plain = _zip_bytes(study_zip(study, previews=None, language="en"))
        big = _zip_bytes(study_zip(study, previews=None, language="en", zip64_threshold=1))

        def zip64_extra(info: zipfile.ZipInfo) -> bool:
            return any(info.extra[i : i + 2] == b"\x01\x00" for i in range(0, len(info.extra) - 1))

        with zipfile.ZipFile(io.BytesIO(plain)) as archive:
            assert b"PK\x06\x06" not in plain[-200:]
            assert not any(zip64_extra(i) for i in archive.infolist())
        with zipfile.ZipFile(io.BytesIO(big)) as archive:
            assert b"PK\x06\x06" in big[-200:]  # ZIP64 end of central directory
            assert all(zip64_extra(i) for i in archive.infolist())
            assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())
            for record in study:
                name = next(
                    n for n in archive.namelist() if archive.read(n) == record.path.read_bytes()
                )
                assert name.startswith("DICOM/")

    def test_it_stores_every_entry_uncompressed(self, study: list[ArchiveInstance]) -> None:
        data = _zip_bytes(study_zip(study, previews=lambda _: JPEG, language="en"))
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}


class TestCompletion:
    def test_it_calls_on_complete_after_a_full_read(self, study: list[ArchiveInstance]) -> None:
        calls = []
        chunks = study_zip(study, previews=None, language="en", on_complete=lambda: calls.append(1))
        data = b""
        for chunk in chunks:
            assert not calls  # never before the last chunk was taken
            data += chunk
        assert calls == [1]
        assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None

    def test_it_does_not_call_on_complete_when_broken_off(
        self, study: list[ArchiveInstance]
    ) -> None:
        calls = []
        chunks = study_zip(study, previews=None, language="en", on_complete=lambda: calls.append(1))
        assert next(iter(chunks))
        chunks.close()  # type: ignore[attr-defined]
        assert calls == []

    def test_it_keeps_at_most_one_chunk_of_an_instance_in_a_chunk(
        self, study: list[ArchiveInstance], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With a chunk smaller than an instance, the ZIP comes out in chunks of that size:
        instances are streamed, not loaded whole."""
        monkeypatch.setattr("dicomweb.archive.CHUNK_SIZE", 1024)
        sizes = [len(c) for c in study_zip(study, previews=None, language="en")]
        assert max(sizes) <= 1024
        assert len(sizes) > sum(r.size for r in study) // 1024


class TestBadStore:
    def test_it_refuses_a_missing_file_before_the_first_byte(
        self, study: list[ArchiveInstance]
    ) -> None:
        study[3].path.unlink()
        with pytest.raises(ArchiveError):
            study_zip(study, previews=None, language="en")

    def test_it_refuses_a_file_whose_size_differs_from_the_index(
        self, study: list[ArchiveInstance]
    ) -> None:
        study[0] = replace(study[0], size=study[0].size + 1)
        with pytest.raises(ArchiveError):
            study_zip(study, previews=None, language="en")

    def test_it_breaks_the_stream_when_a_file_changes_while_sent(
        self, study: list[ArchiveInstance]
    ) -> None:
        calls = []
        chunks = study_zip(study, previews=None, language="en", on_complete=lambda: calls.append(1))
        with open(study[-1].path, "ab") as f:
            f.write(b"\0\0")
        with pytest.raises(ArchiveError):
            b"".join(chunks)
        assert calls == []

    def test_it_refuses_an_instance_given_twice(self, study: list[ArchiveInstance]) -> None:
        with pytest.raises(ArchiveError):
            study_zip([*study, study[0]], previews=None, language="en")


def test_it_needs_no_temporary_files(
    study: list[ArchiveInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a temporary file was made")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    assert _zip_bytes(study_zip(study, previews=None, language="en"))
