"""Synthetic studies imported into the portal's store (no PACS needed), for tests of what
recipients get: downloads, viewer tokens."""

from dataclasses import dataclass
from pathlib import Path

from studies import imports
from tests.conftest import SyntheticStudy, synthetic_study


def import_study(study: SyntheticStudy, folder: Path) -> SyntheticStudy:
    folder.mkdir(parents=True, exist_ok=True)
    for number, data in enumerate(study.files.values()):
        (folder / f"{number}.dcm").write_bytes(data)
    report = imports.dicom_import([folder])
    assert report.imported == study.instance_count, report.skipped
    return study


@dataclass(frozen=True)
class StoredStudies:
    # Alice's: CT (3) and MR (2, JPEG-LS lossless), Latin-1.
    alice: SyntheticStudy
    # Someone else's, in the same store: nothing of Alice's share reaches it.
    other: SyntheticStudy


def store_two_studies(folder: Path) -> StoredStudies:
    alice = synthetic_study(
        patient_name="Martin^Alice",
        patient_id="PAT-ALICE",
        charset="ISO_IR 100",
        modalities=(("CT", 3), ("MR", 2)),
        compress_series=1,
    )
    other = synthetic_study(
        patient_name="Durand^Charlie",
        patient_id="PAT-CHARLIE",
        charset="ISO_IR 100",
        modalities=(("CT", 2),),
    )
    return StoredStudies(
        alice=import_study(alice, folder / "alice"), other=import_study(other, folder / "other")
    )
