"""Writes to the studies domain: PACS nodes, retrieval jobs, imports."""

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from accounts.models import User
from studies import dicom, pacs, wado
from studies.models import Instance, PacsNode, RetrievalJob
from studies.store import Indexer, StoreError

logger = logging.getLogger(__name__)

# Minimum seconds between two progress writes of one job: enough for a live progress bar,
# few enough that a 300-slice retrieval does not spend its time updating one row.
_PROGRESS_INTERVAL = 0.5
# The SOP class of a DICOMDIR, which describes a CD rather than being an image.
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


def pacs_node_create(
    *,
    name: str,
    ae_title: str,
    host: str,
    port: int,
    dicomweb_url: str = "",
    retrieve_method: str = PacsNode.Retrieve.MOVE,
) -> PacsNode:
    node = PacsNode(
        name=name,
        ae_title=ae_title.strip(),
        host=host,
        port=port,
        dicomweb_url=dicomweb_url,
        retrieve_method=retrieve_method,
    )
    errors: dict[str, list[str]] = {}
    if not dicom.is_valid_ae_title(ae_title):
        errors["ae_title"] = ["An AE title has 1 to 16 printable characters, no backslash."]
    if not 1 <= port <= 65535:
        errors["port"] = ["A port is a number from 1 to 65535."]
    if retrieve_method == PacsNode.Retrieve.WADO and not dicomweb_url:
        errors["dicomweb_url"] = ["WADO-RS retrieval needs the node's DICOMweb URL."]
    try:
        node.full_clean()
    except ValidationError as exc:
        for key, messages in exc.message_dict.items():
            errors.setdefault(key, []).extend(messages)
    if errors:
        raise ValidationError(errors)
    node.save()
    return node


def peer_for(node: PacsNode) -> pacs.Peer:
    return pacs.Peer(ae_title=node.ae_title, host=node.host, port=node.port)


def retrieval_job_create(
    *, node: PacsNode, study_uid: str, requested_by: object | None = None
) -> RetrievalJob:
    """A job to bring a study into the store; an unfinished job for the same study is reused."""
    if not dicom.is_valid_uid(study_uid):
        raise ValidationError({"study_uid": ["This is not a valid Study Instance UID."]})
    # An anonymous user (or none) is recorded as nobody.
    user = requested_by if isinstance(requested_by, User) and requested_by.pk else None
    with transaction.atomic():
        existing = (
            RetrievalJob.objects.select_for_update()
            .filter(
                pacs=node,
                study_instance_uid=study_uid,
                status__in=[RetrievalJob.Status.QUEUED, RetrievalJob.Status.RUNNING],
            )
            .first()
        )
        if existing:
            return existing
        return RetrievalJob.objects.create(
            pacs=node,
            study_instance_uid=study_uid,
            method=node.retrieve_method,
            requested_by=user,
        )


def retrieval_job_enqueue(job: RetrievalJob) -> None:
    from studies.tasks import retrieve_study

    transaction.on_commit(lambda: retrieve_study.delay(job.pk))


@dataclass
class _Progress:
    job_id: int
    last_write: float = 0.0
    counts: dict[str, int | None] = field(default_factory=dict)

    def report(
        self, *, received: int, failed: int, expected: int | None, force: bool = False
    ) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < _PROGRESS_INTERVAL:
            return
        values: dict[str, int | None] = {"received": received, "failed": failed}
        if expected is not None:
            values["expected"] = expected
        RetrievalJob.objects.filter(pk=self.job_id).update(**values)
        self.last_write = now


def retrieval_job_run(job_id: int) -> RetrievalJob:
    """Run one attempt of a job and record its outcome. Safe to call again for the same job:
    instances already in the store are not fetched twice into the index, and a finished
    job is left as it is."""
    job = RetrievalJob.objects.select_related("pacs").get(pk=job_id)
    if job.status == RetrievalJob.Status.DONE:
        return job
    node = job.pacs
    RetrievalJob.objects.filter(pk=job.pk).update(
        status=RetrievalJob.Status.RUNNING,
        started_at=timezone.now(),
        attempts=job.attempts + 1,
        error="",
        finished_at=None,
    )
    progress = _Progress(job.pk)
    try:
        if node is None:
            raise pacs.PacsError("the PACS node of this job has been removed")
        if job.method == PacsNode.Retrieve.WADO:
            received, failed = _retrieve_wado(node, job.study_instance_uid, progress)
        else:
            received, failed = _retrieve_dimse(node, job, progress)
    except (pacs.PacsError, wado.DicomwebError, StoreError) as exc:
        logger.warning("retrieval job %s failed: %s", job.pk, exc)
        _finish(job.pk, RetrievalJob.Status.FAILED, str(exc))
        return RetrievalJob.objects.get(pk=job.pk)
    stored = Instance.objects.filter(
        series__study__study_instance_uid=job.study_instance_uid
    ).count()
    if failed:
        error = f"{failed} of {received + failed} instances could not be retrieved."
        _finish(job.pk, RetrievalJob.Status.FAILED, error)
    elif received == 0 and not stored:
        _finish(job.pk, RetrievalJob.Status.FAILED, "The PACS sent no instance for this study.")
    elif stored < received:
        # The storage SCP answers a C-STORE before the index row is written (it writes rows
        # in batches); should that write fail, this is where it shows.
        error = f"The PACS sent {received} instances but only {stored} are in the index."
        _finish(job.pk, RetrievalJob.Status.FAILED, error)
    else:
        _finish(job.pk, RetrievalJob.Status.DONE, "")
    return RetrievalJob.objects.get(pk=job.pk)


def _finish(job_id: int, status: str, error: str) -> None:
    RetrievalJob.objects.filter(pk=job_id).update(
        status=status, error=error, finished_at=timezone.now()
    )


def _retrieve_dimse(node: PacsNode, job: RetrievalJob, progress: _Progress) -> tuple[int, int]:
    peer = peer_for(node)

    def report(counts: pacs.SubOperations) -> None:
        progress.report(
            received=counts.completed + counts.warning,
            failed=counts.failed,
            expected=counts.expected,
            force=counts.remaining == 0,
        )

    if job.method == PacsNode.Retrieve.GET:
        indexer = Indexer(source=node)
        counts = pacs.get_study(
            peer, job.study_instance_uid, _dimse_store_callback(indexer), report
        )
    else:
        counts = pacs.move_study(peer, job.study_instance_uid, settings.DICOM_AE_TITLE, report)
    return counts.completed + counts.warning, counts.failed


def _dimse_store_callback(indexer: Indexer) -> pacs.StoreCallback:
    def on_store(data: bytes, sop_class: str, sop_uid: str, syntax: str, source_ae: str) -> int:
        try:
            indexer.add_dataset(
                data,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_uid,
                transfer_syntax_uid=syntax,
                source_ae=source_ae,
            )
        except dicom.InvalidDicom as exc:
            logger.warning("refused instance %s: %s", sop_uid, exc)
            return pacs.STATUS_CANNOT_UNDERSTAND
        except StoreError as exc:
            logger.error("could not store instance %s: %s", sop_uid, exc)
            return pacs.STATUS_OUT_OF_RESOURCES
        return pacs.STATUS_SUCCESS

    return on_store


def _retrieve_wado(node: PacsNode, study_uid: str, progress: _Progress) -> tuple[int, int]:
    if not node.dicomweb_url:
        raise wado.DicomwebError(f"{node.name} has no DICOMweb URL")
    expected = _expected_instances(node, study_uid)
    indexer = Indexer(source=node)
    counts = {"received": 0, "failed": 0}

    def on_instance(data: bytes) -> None:
        try:
            indexer.add_file_bytes(data)
            counts["received"] += 1
        except dicom.InvalidDicom as exc:
            logger.warning("refused a WADO-RS part from %s: %s", node.name, exc)
            counts["failed"] += 1
        progress.report(expected=expected, received=counts["received"], failed=counts["failed"])

    wado.retrieve_study(node.dicomweb_url, study_uid, on_instance)
    progress.report(
        expected=expected, received=counts["received"], failed=counts["failed"], force=True
    )
    return counts["received"], counts["failed"]


def _expected_instances(node: PacsNode, study_uid: str) -> int | None:
    try:
        matches = wado.search_studies(node.dicomweb_url, {"StudyInstanceUID": study_uid}, limit=1)
    except wado.DicomwebError:
        return None
    if not matches:
        raise wado.DicomwebError(f"{node.name} does not have study {study_uid}")
    value = matches[0].get("00201208", {}).get("Value", [None])[0]
    return int(value) if value is not None else None


@dataclass
class ImportReport:
    imported: int = 0
    already_present: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    studies: set[str] = field(default_factory=set)


def dicom_import(paths: Iterable[Path]) -> ImportReport:
    """Import files and folders (a CD with its DICOMDIR, too) into the local archive.

    Every file is tried; what cannot be imported is listed with its reason and nothing else
    is affected.
    """
    report = ImportReport()
    indexer = Indexer(source=None)
    for path in _walk(paths, report):
        try:
            data = path.read_bytes()
        except OSError as exc:
            report.skipped.append((str(path), f"cannot read: {exc.strerror}"))
            continue
        try:
            if _is_dicomdir(data):
                continue
            instance, changed = indexer.add_file_bytes(data)
        except dicom.InvalidDicom as exc:
            report.skipped.append((str(path), str(exc)))
            continue
        if changed:
            report.imported += 1
        else:
            report.already_present += 1
        report.studies.add(instance.series.study.study_instance_uid)
    return report


def _walk(paths: Iterable[Path], report: ImportReport) -> Iterable[Path]:
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        elif path.is_file():
            yield path
        else:
            report.skipped.append((str(path), "no such file or folder"))


def _is_dicomdir(data: bytes) -> bool:
    # Cheap test before a parse: the SOP class UID appears in the file meta of a DICOMDIR.
    return _MEDIA_STORAGE_DIRECTORY.encode() in data[:512] and (data[128:132] == b"DICM")
