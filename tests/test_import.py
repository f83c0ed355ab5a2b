"""`import_dicom`: files, folders and CDs into the local archive, and what it refuses."""

import hashlib
import json
import os
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pytest_django.fixtures import Settings

from studies.demo import synthetic
from studies.models import Instance, Series, Study

pytestmark = pytest.mark.django_db


def make_study(**overrides: object) -> list[Dataset]:
    options: dict[str, object] = {
        "patient_name": "Gérard^Noëlle",
        "patient_id": "IMPORT-1",
        "modalities": (("CT", 3), ("MR", 2)),
        "rows": 16,
        "columns": 16,
    }
    options.update(overrides)
    return synthetic.make_study(**options)


def dataset_sha256(part10: bytes) -> str:
    """SHA-256 of what follows the file meta group of a Part 10 file."""
    group_length = int.from_bytes(part10[140:144], "little")
    return hashlib.sha256(part10[144 + group_length :]).hexdigest()


def run_import(*paths: Path | str, json_output: bool = True) -> tuple[dict, str]:
    out, err = StringIO(), StringIO()
    args = [str(p) for p in paths] + (["--json"] if json_output else [])
    call_command("import_dicom", *args, stdout=out, stderr=err)
    return (json.loads(out.getvalue()) if json_output else {}), err.getvalue()


def store_files(settings: Settings) -> dict[str, bytes]:
    """Every file in the store (temporary ones included), by path relative to the store."""
    root = Path(settings.STORE_DIR)
    if not root.exists():
        return {}
    return {
        str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


def assert_archived_byte_for_byte(sources: dict[str, bytes], settings: Settings) -> None:
    """Each source file (by SOP Instance UID) is indexed once, and the store holds its data set
    exactly; the store holds nothing else."""
    instances = {i.sop_instance_uid: i for i in Instance.objects.all()}
    assert set(instances) == set(sources)
    files = store_files(settings)
    assert set(files) == {i.file_path for i in instances.values()}
    for sop_uid, source in sources.items():
        instance = instances[sop_uid]
        stored = files[instance.file_path]
        assert dataset_sha256(stored) == dataset_sha256(source) == instance.sha256
        assert instance.size == len(stored)


def test_it_imports_files_byte_for_byte_and_indexes_them(
    tmp_path: Path, settings: Settings
) -> None:
    datasets = make_study(charset="ISO_IR 100", compress_series=1, compression=JPEGLSLossless)
    paths = synthetic.write_study(datasets, tmp_path / "in")

    report, errors = run_import(*paths)

    study_uid = str(datasets[0].StudyInstanceUID)
    assert report == {"imported": 5, "already_present": 0, "studies": [study_uid], "skipped": []}
    assert errors == ""
    assert_archived_byte_for_byte(
        {
            str(ds.SOPInstanceUID): path.read_bytes()
            for ds, path in zip(datasets, paths, strict=True)
        },
        settings,
    )
    study = Study.objects.get()
    assert (study.study_instance_uid, study.patient_name, study.patient_id) == (
        study_uid,
        "Gérard^Noëlle",
        "IMPORT-1",
    )
    assert study.source is None  # the local archive
    series = {s.modality: s for s in Series.objects.filter(study=study)}
    assert {m: s.instances.count() for m, s in series.items()} == {"CT": 3, "MR": 2}
    assert {i.transfer_syntax_uid for i in series["MR"].instances.all()} == {JPEGLSLossless}
    numbers = series["CT"].instances.values_list("instance_number", flat=True)
    assert sorted(n or 0 for n in numbers) == [1, 2, 3]


def test_it_imports_a_folder_tree_and_counts_a_second_import_as_already_present(
    tmp_path: Path, settings: Settings
) -> None:
    first, second = make_study(), make_study(patient_id="IMPORT-2", modalities=(("CT", 2),))
    root = tmp_path / "tree"
    paths = synthetic.write_study(first, root / "a" / "deeper" / "still")
    paths += synthetic.write_study(second, root / "b")
    assert len(paths) == 7

    report, _ = run_import(root)
    assert report["imported"] == 7
    assert report["already_present"] == 0
    assert report["studies"] == sorted(
        [str(first[0].StudyInstanceUID), str(second[0].StudyInstanceUID)]
    )
    before = store_files(settings)

    again, _ = run_import(root)

    assert again == {
        "imported": 0,
        "already_present": 7,
        "studies": report["studies"],
        "skipped": [],
    }
    assert Instance.objects.count() == 7
    assert Study.objects.count() == 2
    assert store_files(settings) == before


def test_it_imports_a_cd_with_a_dicomdir(tmp_path: Path, settings: Settings) -> None:
    datasets = make_study(compress_series=1, compression=JPEGLSLossless)
    cd = tmp_path / "cdrom"
    fileset = FileSet()
    for ds in datasets:
        fileset.add(ds)
    fileset.write(cd)
    assert (cd / "DICOMDIR").is_file()
    on_cd = {
        read_sop_uid(path): path.read_bytes()
        for path in cd.rglob("*")
        if path.is_file() and path.name != "DICOMDIR"
    }
    assert len(on_cd) == 5

    report, errors = run_import(cd)

    # The DICOMDIR describes the CD: it is neither imported nor reported as a failure.
    assert report == {
        "imported": 5,
        "already_present": 0,
        "studies": [str(datasets[0].StudyInstanceUID)],
        "skipped": [],
    }
    assert errors == ""
    assert_archived_byte_for_byte(on_cd, settings)


def read_sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# pydicom warns about the hostile UID as it builds and reads it: that is the point.
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_it_refuses_bad_files_one_by_one_and_keeps_none_of_them(
    tmp_path: Path, settings: Settings
) -> None:
    datasets = make_study(modalities=(("CT", 2),))
    good_paths = synthetic.write_study(datasets, tmp_path / "in" / "good")
    good = {
        str(ds.SOPInstanceUID): p.read_bytes() for ds, p in zip(datasets, good_paths, strict=True)
    }
    bad = tmp_path / "in" / "bad"
    bad.mkdir()
    # Garbage with a .dcm name.
    (bad / "garbage.dcm").write_bytes(b"\xff" + os.urandom(4095))
    # A copy interrupted in the middle of the pixel data: the header alone parses fine.
    other = make_study(patient_id="TRUNCATED", modalities=(("CT", 1),), rows=64, columns=64)[0]
    whole = synthetic.to_bytes(other)
    (bad / "truncated.dcm").write_bytes(whole[: len(whole) - 1000])
    # A bare data set cut short.
    bare = make_study(patient_id="BARE", modalities=(("CT", 1),))[0]
    bare_bytes = synthetic.to_bytes(bare)
    (bad / "bare.dcm").write_bytes(
        bare_bytes[144 + int.from_bytes(bare_bytes[140:144], "little") :][:-100]
    )
    # An empty file.
    (bad / "empty.dcm").write_bytes(b"")
    # A SOP Instance UID that would climb out of the store if it became a file name.
    hostile = make_study(patient_id="HOSTILE", modalities=(("CT", 1),))[0]
    hostile.SOPInstanceUID = "1.2.3/../../../../escaped"
    hostile.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3")
    (bad / "hostile.dcm").write_bytes(synthetic.to_bytes(hostile))
    missing = tmp_path / "in" / "no-such-file.dcm"

    report, errors = run_import(tmp_path / "in", missing)

    assert report["imported"] == 2
    assert report["already_present"] == 0
    assert report["studies"] == [str(datasets[0].StudyInstanceUID)]
    reasons = {Path(item["path"]).name: item["reason"] for item in report["skipped"]}
    assert set(reasons) == {
        "garbage.dcm",
        "truncated.dcm",
        "bare.dcm",
        "empty.dcm",
        "hostile.dcm",
        "no-such-file.dcm",
    }
    assert "not a readable DICOM file" in reasons["garbage.dcm"]
    assert "truncated" in reasons["truncated.dcm"]
    assert "truncated" in reasons["bare.dcm"]
    assert reasons["empty.dcm"]
    assert "invalid UID" in reasons["hostile.dcm"]
    assert reasons["no-such-file.dcm"] == "no such file or folder"
    assert errors == ""  # --json: the reasons are in the report, stdout holds only the JSON
    # Nothing of the refused files is indexed or left in the store, partial files included.
    assert_archived_byte_for_byte(good, settings)
    assert not Study.objects.filter(patient_id__in=["TRUNCATED", "BARE", "HOSTILE"]).exists()
    assert not (tmp_path / "escaped.dcm").exists()


def test_it_lists_refused_files_on_stderr_without_json(tmp_path: Path) -> None:
    good = synthetic.write_study(make_study(modalities=(("CT", 1),)), tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")

    out, err = StringIO(), StringIO()
    call_command("import_dicom", str(tmp_path), stdout=out, stderr=err)

    assert out.getvalue().strip() == "Imported 1 instances (0 already present) in 1 studies."
    assert err.getvalue().startswith(f"skipped {tmp_path / 'notes.txt'}: not a readable DICOM file")
    assert Instance.objects.count() == len(good)


def test_it_fails_when_nothing_could_be_imported(tmp_path: Path, settings: Settings) -> None:
    (tmp_path / "garbage.dcm").write_bytes(b"\x00" * 200)

    with pytest.raises(CommandError, match="Nothing could be imported"):
        call_command(
            "import_dicom",
            str(tmp_path),
            str(tmp_path / "absent"),
            stdout=StringIO(),
            stderr=StringIO(),
        )

    assert not Instance.objects.exists()
    assert store_files(settings) == {}


def write_cd(datasets: list[Dataset], cd: Path) -> dict[str, bytes]:
    """A CD as a burner writes it: a DICOMDIR and the files it references."""
    fileset = FileSet()
    for ds in datasets:
        fileset.add(ds)
    fileset.write(cd)
    return {
        read_sop_uid(path): path.read_bytes()
        for path in cd.rglob("*")
        if path.is_file() and path.name != "DICOMDIR"
    }


def test_it_imports_a_cd_given_by_its_dicomdir(tmp_path: Path, settings: Settings) -> None:
    """What an operator types after mounting a CD: the DICOMDIR stands for the CD."""
    datasets = make_study()
    on_cd = write_cd(datasets, tmp_path / "cdrom")

    report, errors = run_import(tmp_path / "cdrom" / "DICOMDIR")

    assert report == {
        "imported": 5,
        "already_present": 0,
        "studies": [str(datasets[0].StudyInstanceUID)],
        "skipped": [],
    }
    assert errors == ""
    assert_archived_byte_for_byte(on_cd, settings)


def _bytes_read_by_this_process() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_it_refuses_a_large_file_that_is_not_dicom_without_reading_it(
    tmp_path: Path, settings: Settings
) -> None:
    """CDs carry viewers and their installers: each is refused from its first bytes."""
    cd = tmp_path / "cdrom"
    on_cd = write_cd(make_study(modalities=(("CT", 2),)), cd)
    installer = cd / "VIEWER" / "SETUP.EXE"
    installer.parent.mkdir()
    with installer.open("wb") as handle:
        handle.write(b"MZ" + os.urandom(1022))
        handle.truncate(256 * 1024 * 1024)  # sparse: 256 MB that take no room

    before = _bytes_read_by_this_process()
    report, _ = run_import(cd)
    read = _bytes_read_by_this_process() - before

    assert report["imported"] == 2
    assert report["skipped"] == [
        {
            "path": str(installer),
            "reason": "not a readable DICOM file: no DICOM File Meta Information "
            "('DICM' at byte 128) and no data set at its start",
        }
    ]
    assert read < 16 * 1024 * 1024, f"{read} bytes read for a 256 MB file"
    assert_archived_byte_for_byte(on_cd, settings)


def test_a_file_the_database_refuses_is_reported_and_the_others_are_imported(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import studies.store

    datasets = make_study(modalities=(("CT", 3),))
    paths = synthetic.write_study(datasets, tmp_path / "in")
    refused_uid = str(datasets[1].SOPInstanceUID)
    real_upsert = studies.store.upsert_instances

    def upsert(instances: list[Instance]) -> set[str]:
        if any(i.sop_instance_uid == refused_uid for i in instances):
            raise DatabaseError("value too long for type character varying(64)")
        return real_upsert(instances)

    monkeypatch.setattr(studies.store, "upsert_instances", upsert)

    report, _ = run_import(tmp_path / "in")

    assert report["imported"] == 2
    assert report["skipped"] == [
        {
            "path": str(paths[1]),
            "reason": "could not be imported: DatabaseError: "
            "value too long for type character varying(64)",
        }
    ]
    assert "error" not in report
    assert set(Instance.objects.values_list("sop_instance_uid", flat=True)) == {
        str(datasets[0].SOPInstanceUID),
        str(datasets[2].SOPInstanceUID),
    }
    # The refused instance's file did not stay in the store.
    assert len(store_files(settings)) == 2


@pytest.mark.parametrize("json_output", [True, False])
def test_a_store_that_cannot_take_files_stops_the_import_with_a_clear_error(
    json_output: bool, tmp_path: Path, settings: Settings
) -> None:
    paths = synthetic.write_study(make_study(modalities=(("CT", 2),)), tmp_path / "in")
    # The store's place is taken by a file: nothing can be written there.
    (tmp_path / "taken").write_text("not a folder")
    settings.STORE_DIR = tmp_path / "taken" / "store"

    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError) as raised:
        call_command(
            "import_dicom",
            *map(str, paths),
            *(["--json"] if json_output else []),
            stdout=out,
            stderr=err,
        )

    message = "The import stopped: the store cannot take more files (cannot write to the store:"
    assert str(raised.value).startswith(message)
    if json_output:
        # Exactly one JSON object, however the import ended.
        result = json.loads(out.getvalue())
        assert result["error"] == str(raised.value)
        assert (result["imported"], result["skipped"]) == (0, [])
    assert not Instance.objects.exists()


def _without_file_meta(part10: bytes) -> bytes:
    return part10[144 + int.from_bytes(part10[140:144], "little") :]


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_it_imports_files_of_older_cds_keeping_their_data_sets(
    tmp_path: Path, settings: Settings, syntax: str
) -> None:
    """Older systems wrote CDs with files that lack the preamble and "DICM", or hold a bare data
    set: the data set is kept byte for byte, with a file meta group written for it."""
    datasets = make_study(modalities=(("CT", 2),), transfer_syntax=syntax)
    folder = tmp_path / "cd"
    folder.mkdir()
    whole = [synthetic.to_bytes(ds) for ds in datasets]
    (folder / "IM0").write_bytes(whole[0][132:])  # file meta, no preamble nor "DICM"
    (folder / "IM1").write_bytes(_without_file_meta(whole[1]))  # a bare data set

    report, _errors = run_import(folder)

    assert report["imported"] == 2, report["skipped"]
    assert_archived_byte_for_byte(
        {str(ds.SOPInstanceUID): data for ds, data in zip(datasets, whole, strict=True)},
        settings,
    )
    for instance in Instance.objects.all():
        stored = dcmread(Path(settings.STORE_DIR) / instance.file_path)
        assert stored.file_meta.TransferSyntaxUID == syntax == instance.transfer_syntax_uid
        assert stored.file_meta.MediaStorageSOPInstanceUID == instance.sop_instance_uid
        assert stored.pixel_array.shape == (16, 16)


def test_a_well_formed_object_without_pixel_data_is_kept(
    tmp_path: Path, settings: Settings
) -> None:
    """An image IOD without its Pixel Data, as real archives hold some: Orthanc and dcmtk keep
    it, and so does the store (only elements running past the end of a file mean a cut)."""
    ds = make_study(modalities=(("CT", 1),))[0]
    del ds.PixelData
    path = tmp_path / "no-pixels.dcm"
    path.write_bytes(synthetic.to_bytes(ds))

    report, _errors = run_import(path)

    assert report["imported"] == 1, report["skipped"]
    instance = Instance.objects.get()
    assert instance.sop_instance_uid == str(ds.SOPInstanceUID)
    assert dataset_sha256(path.read_bytes()) == instance.sha256
