"""The local study store: Part 10 files on disk, and their index in the database.

Files are laid out as <STORE_DIR>/<study>/<series>/<sop>.dcm. Each write goes to a temporary
file in the same file system and is renamed into place, so a reader never sees half a file and
a crash never leaves one under a real name. Bytes are written exactly as the sender encoded them.
"""

import errno
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from pydicom.dataset import Dataset

from studies import dicom
from studies.models import Instance, PacsNode, Series, Study

logger = logging.getLogger(__name__)


class StoreError(Exception):
    """The store could not take an instance (disk full, permissions…): worth retrying later."""


def store_dir() -> Path:
    return Path(settings.STORE_DIR)


def instance_path(study_uid: str, series_uid: str, sop_uid: str) -> Path:
    for uid in (study_uid, series_uid, sop_uid):
        if not dicom.is_valid_uid(uid):
            raise dicom.InvalidDicom(f"invalid UID {uid[:80]!r}")
    return Path(study_uid) / series_uid / f"{sop_uid}.dcm"


@dataclass
class Indexer:
    """Writes instances into the store and the index.

    One indexer serves one association or one job: it remembers the study and series rows it
    has seen so that a 300-slice series costs one INSERT per slice and nothing more.
    """

    source: PacsNode | None = None
    _studies: dict[str, int] = field(default_factory=dict)
    _series: dict[str, int] = field(default_factory=dict)

    def add_dataset(
        self,
        dataset_bytes: bytes,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        source_ae: str = "",
    ) -> tuple[Instance, bool]:
        """Store a data set received over DIMSE (no file meta) and index it."""
        meta = dicom.encode_file_meta(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            source_ae=source_ae,
        )
        header = dicom.read_header(meta + dataset_bytes)
        if str(header.SOPInstanceUID) != sop_instance_uid:
            raise dicom.InvalidDicom("the data set's SOP Instance UID differs from the request's")
        return self._write(header, [meta, dataset_bytes], hashlib.sha256(dataset_bytes))

    def add_file_bytes(self, data: bytes) -> tuple[Instance, bool]:
        """Store a complete Part 10 file (WADO-RS part, an imported file) as it is.

        Returns the instance and whether anything changed (False: the same bytes were there).
        """
        header = dicom.read_header(data)
        offset = dicom.dataset_offset(data)
        return self._write(header, [data], hashlib.sha256(memoryview(data)[offset:]))

    def _write(
        self, header: Dataset, chunks: list[bytes], digest: "hashlib._Hash"
    ) -> tuple[Instance, bool]:
        relative = instance_path(
            str(header.StudyInstanceUID), str(header.SeriesInstanceUID), str(header.SOPInstanceUID)
        )
        final = store_dir() / relative
        size = sum(len(c) for c in chunks)
        sha256 = digest.hexdigest()

        existing = Instance.objects.filter(sop_instance_uid=str(header.SOPInstanceUID)).first()
        if existing and existing.sha256 == sha256 and final.exists():
            return existing, False  # a repeated retrieval: nothing to do, which keeps jobs idempotent

        tmp_path = _write_temporary(final.parent, chunks)
        try:
            os.replace(tmp_path, final)
        except OSError as exc:
            _unlink_quietly(tmp_path)
            raise StoreError(f"cannot place {relative}: {exc.strerror}") from exc
        try:
            return self._index(header, str(relative), size, sha256), True
        except Exception:
            # The index is the source of truth for what exists: a file it does not list is
            # removed rather than left for the purge to find.
            if existing is None:
                _unlink_quietly(final)
            raise

    def _index(self, header: Dataset, relative: str, size: int, sha256: str) -> Instance:
        study_id = self._study_id(header)
        series_id = self._series_id(header, study_id)
        values = {
            "series_id": series_id,
            "sop_class_uid": str(header.SOPClassUID),
            "instance_number": dicom.integer(header, "InstanceNumber"),
            "transfer_syntax_uid": str(header.file_meta.TransferSyntaxUID),
            "rows": dicom.integer(header, "Rows"),
            "columns": dicom.integer(header, "Columns"),
            "number_of_frames": dicom.integer(header, "NumberOfFrames") or 1,
            "file_path": relative,
            "size": size,
            "sha256": sha256,
        }
        instance, _ = Instance.objects.update_or_create(
            sop_instance_uid=str(header.SOPInstanceUID), defaults=values
        )
        return instance

    def _study_id(self, ds: Dataset) -> int:
        uid = str(ds.StudyInstanceUID)
        if uid not in self._studies:
            defaults = {
                "patient_name": dicom.text(ds, "PatientName"),
                "patient_id": dicom.text(ds, "PatientID", 64),
                "patient_birth_date": dicom.text(ds, "PatientBirthDate", 8),
                "patient_sex": dicom.text(ds, "PatientSex", 16),
                "study_date": dicom.text(ds, "StudyDate", 8),
                "study_time": dicom.text(ds, "StudyTime", 16),
                "accession_number": dicom.text(ds, "AccessionNumber", 64),
                "study_description": dicom.text(ds, "StudyDescription"),
                "referring_physician_name": dicom.text(ds, "ReferringPhysicianName"),
                "source": self.source,
            }
            self._studies[uid] = _get_or_create_id(Study, {"study_instance_uid": uid}, defaults)
        return self._studies[uid]

    def _series_id(self, ds: Dataset, study_id: int) -> int:
        uid = str(ds.SeriesInstanceUID)
        if uid not in self._series:
            defaults = {
                "study_id": study_id,
                "modality": dicom.text(ds, "Modality", 16),
                "series_number": dicom.integer(ds, "SeriesNumber"),
                "series_description": dicom.text(ds, "SeriesDescription"),
                "body_part_examined": dicom.text(ds, "BodyPartExamined", 64),
            }
            self._series[uid] = _get_or_create_id(
                Series, {"series_instance_uid": uid}, defaults
            )
        return self._series[uid]


def _get_or_create_id(model: type[Study] | type[Series], lookup: dict, defaults: dict) -> int:
    # Several associations may deliver the same new study at once: the unique constraint
    # decides, and the loser reads the winner's row.
    row = model.objects.filter(**lookup).only("pk").first()
    if row is not None:
        return row.pk
    try:
        with transaction.atomic():
            return model.objects.create(**lookup, **defaults).pk
    except IntegrityError:
        return model.objects.get(**lookup).pk


def _write_temporary(directory: Path, chunks: list[bytes]) -> Path:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix=".incoming-", suffix=".part")
    except OSError as exc:
        raise StoreError(f"cannot write to the store: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
    except OSError as exc:
        _unlink_quietly(Path(name))
        if exc.errno == errno.ENOSPC:
            raise StoreError("the store's disk is full") from exc
        raise StoreError(f"cannot write to the store: {exc.strerror}") from exc
    return Path(name)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        logger.warning("could not remove %s", path)


def study_delete(study: Study) -> None:
    """Remove a study's files and its index rows."""
    uid = study.study_instance_uid
    study.delete()
    if dicom.is_valid_uid(uid):
        shutil.rmtree(store_dir() / uid, ignore_errors=True)


def open_instance(instance: Instance) -> Path:
    return store_dir() / instance.file_path
