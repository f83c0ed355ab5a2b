"""Retrieval jobs: bringing a study from a PACS node into the store, in a Celery worker.

A job is claimed by one worker at a time (a compare-and-set on its row) and held under a lease
that the worker renews while it lives; a job whose worker went silent is taken over once its
lease is over. An attempt asks one source, DIMSE (studies.dimse.pacs: C-MOVE to our storage
SCP, or C-GET) or DICOMweb (studies.wado: WADO-RS), reports progress on the job's row as it
goes and records its outcome whatever goes wrong; a failed job is queued again, a number of
times, each time after a longer wait. The Celery task (studies.tasks) only calls this module.
"""

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import DatabaseError, connection, transaction
from django.db.models import Q
from django.utils import timezone
from pynetdicom.status import Status

from accounts.models import User
from studies import dicom, wado
from studies.dimse import pacs, wire
from studies.models import Instance, PacsNode, RetrievalJob, Study
from studies.store import Indexer, StoreError, store_is_full, study_mark_retrieved_copy

logger = logging.getLogger(__name__)

# Minimum seconds between two progress writes of one job: enough for a live progress bar,
# few enough that a 300-slice retrieval does not spend its time updating one row.
_PROGRESS_INTERVAL = 0.5
# How often a C-MOVE job looks at the index while the storage SCP finishes indexing.
_INDEX_POLL_INTERVAL = 0.1


def retrieval_job_create(
    *, node: PacsNode, study_uid: str, requested_by: object | None = None
) -> RetrievalJob:
    """A job to bring a study into the store; an unfinished job for the same study is reused.

    A job still marked running past its lease lost its worker (killed, machine restarted): it is
    queued again rather than handed back as if someone were working on it.
    """
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
        if existing is None:
            return RetrievalJob.objects.create(
                pacs=node,
                study_instance_uid=study_uid,
                method=node.retrieve_method,
                requested_by=user,
            )
        if existing.status == RetrievalJob.Status.RUNNING and _lease_expired(
            existing, timezone.now()
        ):
            logger.warning("retrieval job %s lost its worker: queued again", existing.pk)
            existing.status = RetrievalJob.Status.QUEUED
            existing.error = "The worker retrieving this study stopped; it is queued again."
            existing.save(update_fields=["status", "error"])
        return existing


def retrieval_jobs_take_back() -> list[int]:
    """Queue again every running job whose lease is over, and return their ids (for the
    caller to send each a message).

    A worker killed in the middle of a job neither finishes it nor acknowledges its message; a
    worker that starts resumes such jobs, and the broker hands the message out again after its
    visibility timeout, but with several workers the others neither restart nor wait that
    long: this sweep, run every few seconds by Celery beat, brings the job back about one
    lease after its worker went silent. A job is taken back by one sweep only (a
    compare-and-set on its lease), and a job that is queued again keeps its attempts count.
    """
    taken: list[int] = []
    now = timezone.now()
    Status = RetrievalJob.Status
    silent = Q(lease_until__lte=now) | Q(
        lease_until__isnull=True,
        started_at__lte=now - timedelta(seconds=settings.RETRIEVAL_LEASE),
    )
    for job in RetrievalJob.objects.filter(silent, status=Status.RUNNING):
        if RetrievalJob.objects.filter(
            pk=job.pk, status=Status.RUNNING, started_at=job.started_at, lease_until=job.lease_until
        ).update(
            status=Status.QUEUED,
            error="The worker retrieving this study stopped; it is queued again.",
        ):
            logger.warning("retrieval job %s lost its worker: queued again", job.pk)
            taken.append(job.pk)
    return taken


def retrieval_job_lease_left(job: RetrievalJob) -> float:
    """Seconds until a running job's lease runs out and another worker may take it over."""
    lease_end = _lease_end(job)
    if lease_end is None:
        return 0.0
    return max(0.0, (lease_end - timezone.now()).total_seconds())


def retrieval_job_requeue_after_failure(job: RetrievalJob) -> int | None:
    """Queue a failed job again if it has attempts left; returns the seconds its next attempt
    is to wait (doubled after each attempt), or None if it is not to be tried again (finished
    for good, or already queued again by another worker: the compare-and-set lets one win)."""
    if job.status != RetrievalJob.Status.FAILED or job.attempts >= _max_attempts():
        return None
    delay: int = settings.RETRIEVAL_RETRY_BACKOFF * 2 ** (job.attempts - 1)
    queued = RetrievalJob.objects.filter(
        pk=job.pk, status=RetrievalJob.Status.FAILED, attempts=job.attempts
    ).update(
        status=RetrievalJob.Status.QUEUED,
        error=f"{job.error} (attempt {job.attempts}; trying again in {delay} s)",
    )
    return delay if queued else None


def _max_attempts() -> int:
    return settings.RETRIEVAL_MAX_RETRIES + 1


def _lease_end(job: RetrievalJob) -> datetime | None:
    if job.lease_until is not None:
        return job.lease_until
    if job.started_at is None:
        return None
    return job.started_at + timedelta(seconds=settings.RETRIEVAL_LEASE)


def _lease_expired(job: RetrievalJob, now: datetime) -> bool:
    lease_end = _lease_end(job)
    return lease_end is None or lease_end <= now


def _new_lease(now: datetime) -> datetime:
    return now + timedelta(seconds=settings.RETRIEVAL_LEASE)


def _claim(job_id: int) -> tuple[RetrievalJob, bool]:
    """Take a job to run it: returns the job and whether this caller is to run it.

    The UPDATE is a compare-and-set on what was read (status, attempts, start): of two workers
    that read the same job, only one UPDATE matches, so a job never runs twice at once. A
    running job is taken over only once its lease is over: its worker is presumed dead.
    """
    job = RetrievalJob.objects.select_related("pacs").get(pk=job_id)
    now = timezone.now()
    Status = RetrievalJob.Status
    if not (
        job.status == Status.QUEUED or (job.status == Status.RUNNING and _lease_expired(job, now))
    ):
        return job, False
    unchanged = RetrievalJob.objects.filter(
        pk=job.pk,
        status=job.status,
        attempts=job.attempts,
        started_at=job.started_at,
        lease_until=job.lease_until,
    )
    if job.attempts >= _max_attempts():
        # Counted before a run rather than after: an attempt that kills its worker (out of
        # memory, a crash in a C library) never reaches its end, and with acks_late and
        # reject_on_worker_lost its message would come back for ever.
        unchanged.update(
            status=Status.FAILED,
            error=(
                f"Gave up after {job.attempts} attempts: the last one did not finish "
                "(the worker running it stopped)."
            ),
            error_kind=RetrievalJob.Failure.WORKER_LOST,
            finished_at=now,
        )
        return RetrievalJob.objects.select_related("pacs").get(pk=job.pk), False
    claimed = unchanged.update(
        status=Status.RUNNING,
        started_at=now,
        lease_until=_new_lease(now),
        attempts=job.attempts + 1,
        error="",
        error_kind="",
        finished_at=None,
    )
    if not claimed:
        return RetrievalJob.objects.select_related("pacs").get(pk=job.pk), False
    job.status, job.started_at, job.attempts = Status.RUNNING, now, job.attempts + 1
    job.lease_until = _new_lease(now)
    job.error, job.finished_at = "", None
    return job, True


@dataclass
class _Progress:
    job_id: int
    # The start of the attempt reporting: a job taken over by another worker (this one's
    # lease ran out) is not written to by both.
    started_at: datetime | None
    last_write: float = 0.0

    def report(
        self, *, received: int, failed: int, expected: int | None, force: bool = False
    ) -> None:
        now = time.monotonic()
        if not force and now - self.last_write < _PROGRESS_INTERVAL:
            return
        values: dict[str, int | None] = {"received": received, "failed": failed}
        if expected is not None:
            values["expected"] = expected
        try:
            RetrievalJob.objects.filter(
                pk=self.job_id, status=RetrievalJob.Status.RUNNING, started_at=self.started_at
            ).update(**values)
        except DatabaseError as exc:
            # Progress is for the eye: a database that is restarting does not stop the
            # transfer, and the next report writes the counts it missed.
            _drop_connection(exc, "report the progress of", self.job_id)
            return
        self.last_write = now


def _drop_connection(exc: DatabaseError, doing: str, job_id: int) -> None:
    """After a database error: close this thread's connection, so that its next query opens
    a new one. A database server restarted during a long attempt leaves the connections of the
    attempt's threads dead, and Django only replaces a connection that is closed."""
    logger.warning("cannot %s retrieval job %s, for now: %s", doing, job_id, exc)
    connection.close()


@contextmanager
def _lease_renewed(job: RetrievalJob) -> Iterator[None]:
    """Renew the job's lease every quarter of it while this attempt runs.

    The worker is alive as long as this process is, whatever the PACS says or does not say
    meanwhile (pending C-MOVE responses are optional): a lease renewed only on progress would
    let another worker take over a job whose PACS is merely slow to answer.
    """
    stop = threading.Event()

    def renew() -> None:
        try:
            while not stop.wait(settings.RETRIEVAL_LEASE / 4):
                try:
                    RetrievalJob.objects.filter(
                        pk=job.pk, status=RetrievalJob.Status.RUNNING, started_at=job.started_at
                    ).update(lease_until=_new_lease(timezone.now()))
                except DatabaseError as exc:
                    # Tried again at the next beat: a lease that stopped being renewed for
                    # good would hand a live job to another worker.
                    _drop_connection(exc, "renew the lease of", job.pk)
        except Exception:
            logger.exception("cannot renew the lease of retrieval job %s", job.pk)
        finally:
            connection.close()  # this thread's own

    thread = threading.Thread(target=renew, name=f"lease-{job.pk}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def retrieval_job_run(job_id: int) -> RetrievalJob:
    """Run one attempt of a job and record its outcome, whatever goes wrong.

    Safe to call again, and from several workers at once: a job that is finished, or that
    another worker is running (within its lease), is returned as it is; instances already in
    the store are not indexed twice.
    """
    job, ours = _claim(job_id)
    if not ours:
        return job
    progress = _Progress(job.pk, job.started_at)
    kind = ""
    try:
        with _lease_renewed(job):
            status, error, kind = _attempt(job, progress)
    except (pacs.PacsError, wado.DicomwebError, StoreError) as exc:
        logger.warning("retrieval job %s failed: %s", job.pk, exc)
        status, error, kind = RetrievalJob.Status.FAILED, str(exc), _failure_kind(exc)
    except Exception as exc:
        # A bug, the database going away, a library choking on a data set: the job must still
        # end (and be retried), not stay "running" for ever.
        logger.exception("retrieval job %s stopped on an unexpected error", job.pk)
        status, kind = RetrievalJob.Status.FAILED, RetrievalJob.Failure.OTHER
        error = (
            f"The retrieval stopped on an unexpected error ({type(exc).__name__}: "
            f"{str(exc)[:300]}); the worker's log has the details."
        )
    if status == RetrievalJob.Status.FAILED and store_is_full():
        # The storage SCP answered the PACS "out of resources"; the PACS tells us only that
        # sub-operations failed, or ends its C-MOVE with a failure of its own.
        error = f"The portal's disk is full: {error}"
    _finish(job, status, error, kind)
    if status == RetrievalJob.Status.DONE:
        # Only a study this job brought: one that was there before is the local archive's.
        study_mark_retrieved_copy(study_uid=job.study_instance_uid, since=job.created_at)
    return RetrievalJob.objects.select_related("pacs").get(pk=job.pk)


# The PACS's failures a person can act on, by type (studies.dimse.pacs).
_FAILURE_KINDS: tuple[tuple[type[Exception], str], ...] = (
    (pacs.PacsUnreachable, RetrievalJob.Failure.UNREACHABLE),
    (pacs.PacsSilent, RetrievalJob.Failure.SILENT),
    (pacs.PortalUnknown, RetrievalJob.Failure.PORTAL_UNKNOWN),
    (pacs.DestinationUnknown, RetrievalJob.Failure.DESTINATION_UNKNOWN),
    (pacs.StudyMissing, RetrievalJob.Failure.STUDY_MISSING),
    (wado.DicomwebError, RetrievalJob.Failure.DICOMWEB),
    (StoreError, RetrievalJob.Failure.STORE),
)


def _failure_kind(exc: Exception) -> str:
    for error_type, kind in _FAILURE_KINDS:
        if isinstance(exc, error_type):
            return kind
    return RetrievalJob.Failure.OTHER


def _attempt(job: RetrievalJob, progress: _Progress) -> tuple[str, str, str]:
    """Retrieve the study once; returns the job's outcome (status, error, error kind)."""
    node = job.pacs
    if node is None:
        raise pacs.PacsError("the PACS node of this job has been removed")
    study_uid = job.study_instance_uid
    since = timezone.now()
    if job.method == PacsNode.Retrieve.WADO:
        received, failed = _retrieve_wado(node, study_uid, progress)
    else:
        received, failed = _retrieve_dimse(node, job, progress)
    Failure = RetrievalJob.Failure
    if failed:
        return (
            RetrievalJob.Status.FAILED,
            f"{failed} of {received + failed} instances could not be retrieved.",
            Failure.PARTIAL,
        )
    if received == 0:
        # (This job is itself the study's latest retrieval, not done yet: what counts here
        # is whether the store already holds instances of it.)
        if Study.objects.with_instances().filter(study_instance_uid=study_uid).exists():
            return RetrievalJob.Status.DONE, "", ""
        return (
            RetrievalJob.Status.FAILED,
            "The PACS sent no instance for this study.",
            Failure.NOTHING_SENT,
        )
    if job.method == PacsNode.Retrieve.MOVE:
        # The storage SCP, not this process, indexed what the PACS sent.
        missing = _await_indexing(node, study_uid, since=since, received=received)
        where = " (the storage SCP's log says why)"
    else:
        in_study = Instance.objects.filter(series__study__study_instance_uid=study_uid)
        missing, where = max(0, received - in_study.count()), ""
    if missing:
        return (
            RetrievalJob.Status.FAILED,
            f"The PACS sent {received} instances but only {received - missing} are in the "
            f"index{where}.",
            Failure.NOT_INDEXED,
        )
    return RetrievalJob.Status.DONE, "", ""


def _await_indexing(node: PacsNode, study_uid: str, *, since: datetime, received: int) -> int:
    """How many of the instances a C-MOVE sent are missing from the index, once the storage
    SCP has indexed them all or RETRIEVAL_INDEX_WAIT seconds have passed.

    The PACS's final answer may come before the storage SCP has written its last index rows:
    the SCP answers each C-STORE once the file is in place and writes rows in batches, and
    PS3.4 lets the PACS answer before it releases the association that carried them.
    """
    in_study = Instance.objects.filter(series__study__study_instance_uid=study_uid)
    expected: set[str] | None = None
    asked = False
    deadline = time.monotonic() + settings.RETRIEVAL_INDEX_WAIT
    while True:
        # The usual case, one cheap count: a row for every instance sent since the move began.
        if in_study.filter(created_at__gte=since).count() >= received:
            return 0
        if not asked:
            # Instances the store already held get no new row when they come again: only
            # their UIDs tell whether they are all there.
            asked, expected = True, _instances_on_pacs(node, study_uid)
        indexed = set(in_study.values_list("sop_instance_uid", flat=True))
        if expected:
            missing = min(received, len(expected - indexed))
        else:
            missing = max(0, received - len(indexed))
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(_INDEX_POLL_INTERVAL)


def _instances_on_pacs(node: PacsNode, study_uid: str) -> set[str] | None:
    """The SOP Instance UIDs of a study on the PACS, or None if it cannot say."""
    try:
        return set(pacs.instances_in_study(pacs.Peer.of(node), study_uid))
    except pacs.PacsError as exc:
        logger.warning("cannot list the instances of %s on %s: %s", study_uid, node.name, exc)
        return None


def _finish(job: RetrievalJob, status: str, error: str, kind: str = "") -> None:
    ending = RetrievalJob.objects.filter(
        pk=job.pk, status=RetrievalJob.Status.RUNNING, started_at=job.started_at
    )
    values = {"status": status, "error": error, "error_kind": kind}
    try:
        finished = ending.update(**values, finished_at=timezone.now())
    except DatabaseError as exc:
        # The connection of a long attempt may have died with a restart of the database
        # server: once more on a new one, or the outcome is lost until the lease runs out.
        _drop_connection(exc, "record the outcome of", job.pk)
        finished = ending.update(**values, finished_at=timezone.now())
    if not finished:
        logger.warning(
            "retrieval job %s was taken over by another worker; this attempt ended %s",
            job.pk,
            status,
        )


def _retrieve_dimse(node: PacsNode, job: RetrievalJob, progress: _Progress) -> tuple[int, int]:
    peer = pacs.Peer.of(node)

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
            return wire.STORE_CANNOT_UNDERSTAND
        except StoreError as exc:
            logger.error("could not store instance %s: %s", sop_uid, exc)
            return wire.STORE_OUT_OF_RESOURCES
        return Status.SUCCESS

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
