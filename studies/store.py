"""The local study store: Part 10 files on disk, and their index in the database.

Files are laid out as <STORE_DIR>/<study>/<series>/<sop>.dcm. Each write goes to a temporary
file under <STORE_DIR>/.incoming (same file system) and is renamed into place, so a reader
never sees half a file and a crash never leaves one under a real name. Bytes are written
exactly as the sender encoded them; only the file meta header is the portal's own.
"""

import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import AuditEvent, Share
from accounts.services import audit
from studies import dicom
from studies.models import Instance, PacsNode, Series, Study

logger = logging.getLogger(__name__)

INCOMING = ".incoming"
_PROBE_STEP = 16 * 1024
# Fragments smaller than this are gathered before they are hashed on the hashing thread.
_HASH_CHUNK = 64 * 1024
# How many data set bytes are kept to find the header in; real headers are a few kilobytes.
_PROBE_LIMIT = 256 * 1024
_INSTANCE_FIELDS = [
    "series",
    "sop_class_uid",
    "instance_number",
    "transfer_syntax_uid",
    "rows",
    "columns",
    "number_of_frames",
    "file_path",
    "size",
    "sha256",
]


class StoreError(Exception):
    """The store could not take an instance (disk full, permissions…): worth retrying later."""


class AnotherStudysInstance(dicom.DatasetMismatch):
    """An instance whose SOP Instance UID (or Series Instance UID) the index holds in another
    study: it is not moved there (a sender, mistaken or hostile, cannot slip an instance into
    a study, shared or not, nor take one out of it)."""


class OverwriteRefused(dicom.DatasetMismatch):
    """An instance whose SOP Instance UID the store holds with other bytes, in a study a live
    share grants: what the recipient was shown must not change under them (a configured node,
    mistaken or taken over, resending a rewritten instance). Not worth retrying."""


def _study_is_shared(study_uid: str) -> bool:
    return bool(
        Share.objects.live()
        .filter(Q(study_instance_uid=study_uid) | Q(shared_studies__study_instance_uid=study_uid))
        .exists()
    )


def _data_set_sha256(path: Path) -> str:
    """The SHA-256 of a stored file's data set (what the index's `sha256` covers)."""
    with path.open("rb") as handle:
        data = handle.read()
    return hashlib.sha256(memoryview(data)[dicom.dataset_offset(data) :]).hexdigest()


def store_dir() -> Path:
    return Path(settings.STORE_DIR)


def instance_file(instance: Instance) -> Path:
    """Where an indexed instance's Part 10 file is."""
    return store_dir() / instance.file_path


def instance_path(study_uid: str, series_uid: str, sop_uid: str) -> Path:
    for uid in (study_uid, series_uid, sop_uid):
        if not dicom.is_valid_uid(uid):
            raise dicom.InvalidDicom(f"invalid UID {uid[:80]!r}")
    return Path(study_uid) / series_uid / f"{sop_uid}.dcm"


def _os_error(exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError("the store's disk is full")
    return StoreError(f"cannot write to the store: {exc.strerror}")


def _refuse_move_to_another_study(
    keys: dicom.InstanceKeys, indexer: "Indexer", *, ask_index: bool = True
) -> None:
    """An instance UID names one instance for ever: a sender (mistaken or hostile) must not
    slip an instance of one study into another, nor take it from a study already shared.

    Instances this indexer placed but has not indexed yet are checked here; those already in
    the index by a lookup when `ask_index`. The storage SCP does without the lookup (a round
    trip per slice, the gap between SQLite and PostgreSQL): the index write refuses the same
    move in the statement it runs anyway (`upsert_instances`).
    """
    sop_uid, study_uid = keys.sop_instance_uid, keys.study_uid
    owner = indexer.placed.get(sop_uid)
    if owner is None and ask_index:
        owner = _indexed_study_of(sop_uid)
    if owner is not None and owner != study_uid:
        raise dicom.DatasetMismatch(
            "the SOP Instance UID already belongs to another study in the store"
        )
    indexer.placed[sop_uid] = study_uid


def _indexed_study_of(sop_uid: str) -> str | None:
    qn = connection.ops.quote_name
    sql = (
        f"SELECT st.{qn('study_instance_uid')} FROM {qn(Instance._meta.db_table)} i "  # noqa: S608
        f"JOIN {qn(Series._meta.db_table)} se ON se.{qn('id')} = i.{qn('series_id')} "
        f"JOIN {qn(Study._meta.db_table)} st ON st.{qn('id')} = se.{qn('study_id')} "
        f"WHERE i.{qn('sop_instance_uid')} = %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [sop_uid])
        row = cursor.fetchone()
    return None if row is None else str(row[0])


# Temporary names: unique within the process by the counter, across processes by the pid
# (O_EXCL catches a name that a crashed process with the same pid left behind). Cheaper than
# tempfile's random names, which cost more than the write of a small instance.
_temporary_numbers = itertools.count()


def _create_temporary() -> tuple[int, Path]:
    try:
        incoming = store_dir() / INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(incoming).free < settings.STORE_MIN_FREE_BYTES:
            # Keep room for the database and the logs: a full disk stops more than the store.
            floor = settings.STORE_MIN_FREE_BYTES >> 20
            raise StoreError(f"the store's disk is full (less than {floor} MB free)")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        while True:
            path = incoming / f"{os.getpid()}-{next(_temporary_numbers)}.part"
            try:
                return os.open(path, flags, 0o600), path
            except FileExistsError:
                continue
    except OSError as exc:
        raise _os_error(exc) from exc


def _completed(value: str) -> "Future[str]":
    future: Future[str] = Future()
    future.set_result(value)
    return future


# Free space (beyond STORE_MIN_FREE_BYTES) below which the store counts as full: room for no
# more than a few large instances. A retrieval that failed then says so.
_FULL_MARGIN = 64 * 1024 * 1024


def store_is_full() -> bool:
    """Whether the store's disk is (nearly) full: what to tell staff when instances could not
    be stored, since a PACS reports only how many of its C-STORE sub-operations failed."""
    folder = store_dir()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return False
    return free < settings.STORE_MIN_FREE_BYTES + _FULL_MARGIN


class HashingThread:
    """Computes SHA-256 digests on a thread of its own, in the order they were asked for.

    Without SHA instructions in the processor, hashing a slice costs as much as receiving it.
    hashlib releases the interpreter lock while it hashes, so on its own thread the hash of one
    fragment runs on another core while the receiving thread reads the next. The digest is not
    needed before the index row is written, which happens after the sender has its answer.

    At most `max_backlog` bytes wait to be hashed: a sender faster than the hash is slowed
    down rather than filling the memory.
    """

    def __init__(self, max_backlog: int = 64 * 1024 * 1024) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._max_backlog = max_backlog
        self._backlog = 0
        self._room = threading.Condition()
        # The first error hashing a digest, by id(): its hexdigest raises it rather than give
        # the digest of some of the bytes. Touched by the hashing thread only.
        self._errors: dict[int, BaseException] = {}

    def update(self, digest: "hashlib._Hash", data: bytes | memoryview) -> None:
        """Queue `data` (which must not change afterwards) for `digest`."""
        size = len(data)
        with self._room:
            while self._backlog and self._backlog + size > self._max_backlog:
                self._room.wait()
            self._backlog += size
        self._executor.submit(self._update, digest, data, size)

    def _update(self, digest: "hashlib._Hash", data: bytes | memoryview, size: int) -> None:
        try:
            digest.update(data)
        except BaseException as exc:
            self._errors.setdefault(id(digest), exc)
        finally:
            with self._room:
                self._backlog -= size
                self._room.notify_all()

    def hexdigest(self, digest: "hashlib._Hash") -> "Future[str]":
        """The digest once every queued update is in."""
        return self._executor.submit(self._hexdigest, digest)

    def _hexdigest(self, digest: "hashlib._Hash") -> str:
        error = self._errors.pop(id(digest), None)
        if error is not None:
            raise error
        return digest.hexdigest()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class IncomingInstance:
    """An instance being received: bytes go straight to a temporary file as they arrive.

    `commit()` checks and indexes it and moves it into place; `abort()` forgets it. Whatever
    happens, no temporary file outlives the object's use.
    """

    def __init__(
        self,
        indexer: "Indexer",
        *,
        expected_sop_uid: str | None,
        meta: bytes,
        expected_sop_class_uid: str | None = None,
        transfer_syntax_uid: str = "",
        hasher: HashingThread | None = None,
    ) -> None:
        self.indexer = indexer
        self._hasher = hasher
        self._transfer_syntax = transfer_syntax_uid
        self.expected_sop_uid = expected_sop_uid
        self.expected_sop_class_uid = expected_sop_class_uid
        self._meta = meta
        # The first bytes of the data set, kept to parse the header while the rest arrives.
        self._probe: bytearray | None = bytearray() if meta else None
        self._probe_next = 0
        self._header: dicom.Header | None = None
        # Where the pixel data element starts in the data set, and its header: with the size
        # received, they tell a whole data set without reading the file again.
        self._pixel_offset: int | None = None
        self._pixel_element = b""
        self._digest = hashlib.sha256()
        # Small fragments gathered before they go to the hashing thread: a task per fragment
        # would cost more than hashing it, and a sender cutting its data into tiny fragments
        # could make us spend our time handing them over.
        self._unhashed = bytearray()
        self._size = 0
        self._closed = False
        fd, self.path = _create_temporary()
        # Unbuffered: fragments are large, and a buffer would only add a copy and move the
        # write to close(), when the sender is waiting for our answer.
        self._file: BinaryIO = os.fdopen(fd, "wb", buffering=0)
        if meta:
            self._raw_write(meta)

    def _raw_write(self, data: bytes | memoryview) -> None:
        try:
            view = memoryview(data)
            while view:
                written = self._file.write(view) or 0
                view = view[written:]
        except OSError as exc:
            self.abort()
            raise _os_error(exc) from exc
        self._size += len(data)

    def write(self, data: bytes | memoryview) -> None:
        """Append data set bytes (after the file meta header); they count in the SHA-256.

        With a hashing thread, `data` must not change after the call (bytes, or a view of
        bytes)."""
        if self._hasher is None:
            self._digest.update(data)
        elif self._unhashed or len(data) < _HASH_CHUNK:
            self._unhashed += data
            if len(self._unhashed) >= _HASH_CHUNK:
                self._flush_unhashed()
        else:
            self._hasher.update(self._digest, data)
        self._raw_write(data)
        if self._probe is not None:
            self._probe += data[: _PROBE_LIMIT - len(self._probe)]
            self._parse_probe()

    def _flush_unhashed(self) -> None:
        if self._unhashed and self._hasher is not None:
            self._hasher.update(self._digest, bytes(self._unhashed))
            self._unhashed.clear()

    def _parse_probe(self) -> None:
        """Parse the header from the first fragments, if they hold all of it.

        Done as soon as possible, this work overlaps with the transfer of the pixel data
        instead of delaying the answer to the sender.
        """
        assert self._probe is not None
        # A sender cutting the header into tiny fragments must not make us parse it over and
        # over: try again only once a good deal more has arrived.
        if len(self._probe) < self._probe_next:
            return
        self._probe_next = len(self._probe) + _PROBE_STEP
        found = dicom.read_leading_header(bytes(self._probe), self._transfer_syntax)
        if found is not None:
            self._header, position = found
            self._pixel_element = bytes(
                self._probe[position : position + dicom.LONGEST_ELEMENT_HEADER]
            )
            self._pixel_offset = position
            self._probe = None
        elif len(self._probe) >= _PROBE_LIMIT:
            self._probe = None  # an unusually long header: parse it from the file instead

    def _ends_where_expected(self) -> bool:
        """True when the pixel data, the last element, ends exactly where the data set ends.

        Anything else (elements after the pixel data, a cut) goes to the full check.
        """
        assert self._header is not None and self._pixel_offset is not None
        dataset_size = self._size - len(self._meta)
        return dicom.pixel_data_ends_data_set(
            self._pixel_element,
            transfer_syntax_uid=self._header.keys.transfer_syntax_uid,
            remaining=dataset_size - self._pixel_offset,
        )

    def write_file(self, data: bytes) -> None:
        """A complete Part 10 file: the digest covers only what follows its meta header."""
        offset = dicom.dataset_offset(data)
        self._digest.update(memoryview(data)[offset:])
        self._raw_write(data)

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._file.close()
            except OSError:
                pass
        _unlink_quietly(self.path)

    def commit(self) -> Instance:
        """Check, place and index the instance."""
        return self.place().index()

    def place(self, *, ask_index: bool = True) -> "PlacedInstance":
        """Check the received instance and move it into place, without indexing it yet.

        The storage SCP answers the sender right after this and indexes on another thread, so
        that the sender's next instance arrives while the database works. Without `ask_index`
        the database is not asked whether another study holds this SOP Instance UID: the
        index write refuses it instead (see `_refuse_move_to_another_study`).
        """
        try:
            self._file.close()
        except OSError as exc:
            self.abort()
            raise _os_error(exc) from exc
        self._closed = True
        try:
            if self._header is not None and self._ends_where_expected():
                header = self._header
            else:
                with self.path.open("rb") as handle:
                    header = self._header or dicom.Header.of(dicom.read_header(handle))
                    dicom.check_complete(handle, header.keys.transfer_syntax_uid)
            keys = header.keys
            if self.expected_sop_uid and keys.sop_instance_uid != self.expected_sop_uid:
                raise dicom.DatasetMismatch(
                    "the data set's SOP Instance UID differs from the request's"
                )
            if self.expected_sop_class_uid and keys.sop_class_uid != self.expected_sop_class_uid:
                raise dicom.DatasetMismatch(
                    "the data set's SOP Class UID differs from the request's"
                )
            _refuse_move_to_another_study(keys, self.indexer, ask_index=ask_index)
            relative = instance_path(keys.study_uid, keys.series_uid, keys.sop_instance_uid)
            final = store_dir() / relative
            if self._hasher is not None:
                self._flush_unhashed()
                sha256 = self._hasher.hexdigest(self._digest)
            else:
                sha256 = _completed(self._digest.hexdigest())
            try:
                self.indexer.make_folder(final.parent)
                existed = final.exists()
                if existed and _study_is_shared(keys.study_uid):
                    # Only a resend waits for its digest here; a first copy never does.
                    if sha256.result() != _data_set_sha256(final):
                        self._refuse_overwrite(keys)
                    _unlink_quietly(self.path)  # the same bytes: the stored file stays
                else:
                    os.replace(self.path, final)
            except OSError as exc:
                raise _os_error(exc) from exc
        except BaseException:
            _unlink_quietly(self.path)
            raise
        return PlacedInstance(
            indexer=self.indexer,
            header=header,
            relative=str(relative),
            size=self._size,
            sha256=sha256,
            replaced_existing=existed,
        )

    def _refuse_overwrite(self, keys: dicom.InstanceKeys) -> None:
        source = self.indexer.source
        audit(
            AuditEvent.Action.STUDY_OVERWRITE_REFUSED,
            study=keys.study_uid,
            sop_instance=keys.sop_instance_uid,
            source=source.name if source is not None else "",
            peer=self.indexer.peer,
        )
        raise OverwriteRefused(
            "an instance of a shared study is stored with other bytes: not replaced"
        )


@dataclass
class PlacedInstance:
    """An instance whose file is in place in the store but not yet in the index."""

    indexer: "Indexer"
    header: dicom.Header
    relative: str
    size: int
    sha256: "Future[str]"  # may still be computed on a hashing thread
    replaced_existing: bool

    def build(self) -> Instance:
        return self.indexer.build(self.header, self.relative, self.size, self.sha256.result())

    def index(self) -> Instance:
        try:
            instance = self.build()
            if not upsert_instances([instance]):
                raise AnotherStudysInstance(
                    "the SOP Instance UID already belongs to another study in the store"
                )
        except Exception:
            self.discard()
            raise
        return instance

    def discard(self) -> None:
        """After a failed indexing. The index is the source of truth for what exists: a file
        it does not list is removed rather than left for the purge to find."""
        if not self.replaced_existing:
            _unlink_quietly(store_dir() / self.relative)


@dataclass
class Indexer:
    """Writes instances into the store and the index.

    One indexer serves one association or one job: it remembers the study and series rows it
    has seen so that a 300-slice series costs one INSERT per slice and nothing more.
    """

    source: PacsNode | None = None
    # Who sent the instances (calling AE title and address), for the audit log.
    peer: str = ""
    _studies: dict[str, int] = field(default_factory=dict)
    _series: dict[str, int] = field(default_factory=dict)
    _folders: set[Path] = field(default_factory=set)
    # SOP Instance UID -> Study Instance UID of what this indexer has placed in the store.
    placed: dict[str, str] = field(default_factory=dict)

    def make_folder(self, folder: Path) -> None:
        if folder not in self._folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._folders.add(folder)

    def begin(
        self,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        source_ae: str = "",
        hasher: HashingThread | None = None,
    ) -> IncomingInstance:
        """Start receiving a data set that comes without file meta (DIMSE)."""
        meta = dicom.encode_file_meta(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            source_ae=source_ae,
        )
        return IncomingInstance(
            self,
            expected_sop_uid=sop_instance_uid,
            expected_sop_class_uid=sop_class_uid,
            meta=meta,
            transfer_syntax_uid=transfer_syntax_uid,
            hasher=hasher,
        )

    def add_dataset(
        self,
        dataset_bytes: bytes,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        source_ae: str = "",
    ) -> Instance:
        """Store a whole data set received over DIMSE (no file meta) and index it."""
        incoming = self.begin(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            source_ae=source_ae,
        )
        incoming.write(dataset_bytes)
        return incoming.commit()

    def add_file_bytes(self, data: bytes) -> tuple[Instance, bool]:
        """Store a complete Part 10 file (WADO-RS part, an imported file) as it is.

        Returns the instance and whether anything changed (False: the same bytes were there).
        """
        header = dicom.read_header(data)
        offset = dicom.dataset_offset(data)
        sha256 = hashlib.sha256(memoryview(data)[offset:]).hexdigest()
        existing = Instance.objects.filter(sop_instance_uid=str(header.SOPInstanceUID)).first()
        if existing and existing.sha256 == sha256 and instance_file(existing).exists():
            return existing, False  # a repeated retrieval or import: nothing to do
        incoming = IncomingInstance(self, expected_sop_uid=str(header.SOPInstanceUID), meta=b"")
        incoming.write_file(data)
        return incoming.commit(), True

    def build(self, header: dicom.Header, relative: str, size: int, sha256: str) -> Instance:
        """The index row of an instance, its study and series rows created if need be."""
        keys = header.keys
        study_id = self._study_id(header)
        series_id = self._series_id(header, study_id)
        return Instance(
            series_id=series_id,
            sop_instance_uid=keys.sop_instance_uid,
            sop_class_uid=keys.sop_class_uid,
            instance_number=keys.instance_number,
            transfer_syntax_uid=keys.transfer_syntax_uid,
            rows=keys.rows,
            columns=keys.columns,
            number_of_frames=keys.number_of_frames,
            file_path=relative,
            size=size,
            sha256=sha256,
        )

    def _study_id(self, header: dicom.Header) -> int:
        uid = header.keys.study_uid
        if uid not in self._studies:
            ds = header.dataset()
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

    def _series_id(self, header: dicom.Header, study_id: int) -> int:
        uid = header.keys.series_uid
        if uid not in self._series:
            owner = Series.objects.filter(series_instance_uid=uid).values_list(
                "study_id", flat=True
            )
            if any(other != study_id for other in owner):
                # Filed under that series, the instance would join the other study.
                raise AnotherStudysInstance(
                    "the Series Instance UID already belongs to another study in the store"
                )
            ds = header.dataset()
            defaults = {
                "study_id": study_id,
                "modality": dicom.text(ds, "Modality", 16),
                "series_number": dicom.integer(ds, "SeriesNumber"),
                "series_description": dicom.text(ds, "SeriesDescription"),
                "body_part_examined": dicom.text(ds, "BodyPartExamined", 64),
            }
            self._series[uid] = _get_or_create_id(Series, {"series_instance_uid": uid}, defaults)
        return self._series[uid]


def upsert_instances(instances: list[Instance]) -> set[str]:
    """Insert or update index rows in a single statement and a single round trip; returns the
    SOP Instance UIDs written.

    This runs for every received slice (or a few at a time): the ORM's
    bulk_create(update_conflicts=True) would wrap it in a transaction, three round trips.
    A row already in the index is updated only within its own study: an instance whose UID
    another study holds is left out (not returned), so that no sender moves an instance from
    one study to another, whatever was checked before. PostgreSQL and SQLite share this
    syntax. Only column and table names from the models and placeholders go into the SQL text.
    """
    if not instances:
        return set()
    now = timezone.now()
    meta = Instance._meta
    columns: list[str] = [
        str(Instance._meta.get_field(name).column)  # type: ignore[union-attr]
        for name in _INSTANCE_FIELDS
    ]
    qn = connection.ops.quote_name
    names = ", ".join(qn(c) for c in ["sop_instance_uid", "created_at", *columns])
    row = "(" + ", ".join(["%s"] * (len(columns) + 2)) + ")"
    updates = ", ".join(f"{qn(c)} = excluded.{qn(c)}" for c in columns)
    # One row per SOP Instance UID: ON CONFLICT cannot touch the same row twice in one go.
    unique = list({i.sop_instance_uid: i for i in instances}.values())
    table, series = qn(meta.db_table), qn(Series._meta.db_table)
    series_id, study_id, pk = qn("series_id"), qn("study_id"), qn("id")
    same_study = (
        f"(SELECT {study_id} FROM {series} WHERE {pk} = {table}.{series_id}) = "  # noqa: S608
        f"(SELECT {study_id} FROM {series} WHERE {pk} = excluded.{series_id})"
    )
    sql = (
        f"INSERT INTO {table} ({names}) VALUES {', '.join([row] * len(unique))} "  # noqa: S608
        f"ON CONFLICT ({qn('sop_instance_uid')}) DO UPDATE SET {updates} WHERE {same_study} "
        f"RETURNING {qn('sop_instance_uid')}"
    )
    params: list[Any] = []
    for instance in unique:
        instance.created_at = now
        params += [instance.sop_instance_uid, now]
        params += [
            instance.series_id if name == "series" else getattr(instance, name)
            for name in _INSTANCE_FIELDS
        ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {str(row[0]) for row in cursor.fetchall()}


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


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        logger.warning("could not remove %s", path)


# Temporary files older than this in the store's incoming folder were left by a crash.
STALE_INCOMING_SECONDS = 3600.0


def sweep_incoming(*, older_than: float) -> int:
    """Remove temporary files that an interrupted transfer left behind; returns how many.

    Only old ones: other processes (a worker's C-GET, an import) write there too."""
    folder = store_dir() / INCOMING
    limit = time.time() - older_than
    removed = 0
    try:
        candidates = list(folder.glob("*.part"))
    except OSError:
        return 0
    for path in candidates:
        try:
            if path.stat().st_mtime < limit:
                path.unlink()
                removed += 1
        except OSError:
            continue
    if removed:
        logger.warning("removed %d temporary files left by an interrupted transfer", removed)
    return removed


# --- Instances confirmed to a sender but not yet indexed ------------------------------------
#
# The storage SCP answers a C-STORE once the file is in place and writes its index row a
# moment later (IndexWorker): a database that is down or refuses the row at that moment must
# not leave a confirmed instance out of the index for ever. So before the success status goes
# out, the instance is recorded in the association's journal, a file in <STORE_DIR>/.journal
# that its writer holds locked (flock). Once every instance it lists is indexed the writer
# deletes it; otherwise it stays, and `journal_replay` (at the SCP's start, and regularly in
# the worker: studies.tasks) indexes what it lists. A journal still locked is in use and left
# alone; one whose writer died (a killed SCP) is unlocked and replayed.

JOURNAL = ".journal"
_journal_numbers = itertools.count()


@dataclass(frozen=True)
class JournalEntry:
    """A confirmed instance: where it is in the store, which node sent it, and whether it came
    unasked (pushed: the local archive keeps its study)."""

    relative: str
    source_id: int | None
    pushed: bool

    def line(self) -> bytes:
        return (json.dumps([self.relative, self.source_id, self.pushed]) + "\n").encode()

    @classmethod
    def parse(cls, line: bytes) -> "JournalEntry | None":
        try:
            relative, source_id, pushed = json.loads(line)
        except ValueError:
            return None  # a line cut short by a crash: its instance was never confirmed
        if not isinstance(relative, str) or not _is_instance_path(relative):
            return None
        if source_id is not None and not isinstance(source_id, int):
            return None
        return cls(relative=relative, source_id=source_id, pushed=bool(pushed))


def _is_instance_path(relative: str) -> bool:
    """<study>/<series>/<sop>.dcm, three valid UIDs: nothing outside the store."""
    parts = relative.split("/")
    return (
        len(parts) == 3
        and parts[2].endswith(".dcm")
        and all(dicom.is_valid_uid(part) for part in [parts[0], parts[1], parts[2][:-4]])
    )


class Journal:
    """The journal of one association: opened at its first instance, locked while it lives."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self.path: Path | None = None

    def record(self, entry: JournalEntry) -> None:
        """Append an entry; raises StoreError if it cannot be written (a full disk)."""
        try:
            if self._fd is None:
                self._open()
            assert self._fd is not None
            line = entry.line()
            if os.write(self._fd, line) != len(line):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            raise _os_error(exc) from exc

    def _open(self) -> None:
        folder = store_dir() / JOURNAL
        folder.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        while True:
            path = folder / f"{os.getpid()}-{next(_journal_numbers)}.log"
            try:
                fd = os.open(path, flags, 0o600)
                break
            except FileExistsError:
                continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd, self.path = fd, path

    def close(self, *, settled: bool) -> None:
        """`settled`: everything recorded is in the index, so the journal goes; otherwise it
        stays for `journal_replay`. Deleted before it is unlocked: a replay never takes it."""
        if self._fd is None:
            return
        if settled and self.path is not None:
            _unlink_quietly(self.path)
        os.close(self._fd)
        self._fd = None


@dataclass
class ReplayReport:
    journals: int = 0  # journals replayed and deleted
    indexed: int = 0  # instances written to the index
    refused: int = 0  # instances the index refused (another study's UID): their files removed
    missing: int = 0  # listed files no longer there (purged since)


def journal_replay() -> ReplayReport:
    """Index the instances that unsettled journals list, and delete those journals.

    Safe to run at any time and from several processes: a journal in use is locked, and
    writing an index row twice changes nothing. A database error stops the replay and leaves
    the journal for the next one."""
    report = ReplayReport()
    try:
        journals = sorted((store_dir() / JOURNAL).glob("*.log"))
    except OSError:
        return report
    for path in journals:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # settled meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its association is still running
            if os.fstat(fd).st_nlink == 0:
                continue  # settled between the listing and the lock
            with os.fdopen(os.dup(fd), "rb") as handle:
                entries = [e for line in handle if (e := JournalEntry.parse(line)) is not None]
            _replay(entries, report)
            path.unlink()
            report.journals += 1
        finally:
            os.close(fd)
    if report.journals:
        logger.warning(
            "indexed %d confirmed instances left out of the index (%d journals; %d refused, "
            "%d no longer in the store)",
            report.indexed,
            report.journals,
            report.refused,
            report.missing,
        )
    return report


def _replay(entries: list[JournalEntry], report: ReplayReport) -> None:
    indexers: dict[int | None, Indexer] = {}
    pushed: set[str] = set()
    for entry in entries:
        path = store_dir() / entry.relative
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            report.missing += 1
            continue
        except OSError as exc:
            raise _os_error(exc) from exc
        study_uid, series_uid, name = entry.relative.split("/")
        try:
            header = dicom.Header.of(dicom.read_header(data))
            if (header.keys.study_uid, header.keys.series_uid, header.keys.sop_instance_uid) != (
                study_uid,
                series_uid,
                name[:-4],
            ):
                raise dicom.DatasetMismatch("the file's UIDs differ from its place in the store")
        except dicom.InvalidDicom as exc:
            # Only the storage SCP writes there, after checking: someone else changed it.
            logger.error("not indexing %s: %s", entry.relative, exc)
            continue
        if entry.source_id not in indexers:
            source = None
            if entry.source_id is not None:
                source = PacsNode.objects.filter(pk=entry.source_id).first()
            indexers[entry.source_id] = Indexer(source=source)
        indexer = indexers[entry.source_id]
        sha256 = hashlib.sha256(memoryview(data)[dicom.dataset_offset(data) :]).hexdigest()
        try:
            instance = indexer.build(header, entry.relative, len(data), sha256)
            written = upsert_instances([instance])
        except AnotherStudysInstance:
            written = set()
        if not written:
            logger.error("removed %s: its UID belongs to another study", entry.relative)
            _unlink_quietly(path)
            report.refused += 1
            continue
        report.indexed += 1
        if entry.pushed:
            pushed.add(study_uid)
    if pushed:
        studies_keep_in_archive(pushed)


# --- The local archive and retrieved copies --------------------------------------------------
#
# A study is a disposable copy only when a retrieval of ours brought it and nothing else did:
# pushed by a PACS or a modality, or imported, it is the local archive for good. A push and a
# retrieval of the same study may end in either order, so the archive mark is sticky and the
# copy mark never overrides it. Each is one conditional UPDATE: PostgreSQL locks the row and
# checks the condition again on the row as the other writer left it, so the two serialise on
# the study whatever the interleaving.


def studies_keep_in_archive(study_uids: set[str] | list[str]) -> None:
    """The local archive keeps these studies (pushed or imported): never purged."""
    Study.objects.filter(study_instance_uid__in=list(study_uids)).update(
        archived=True, retrieved_copy=False
    )


def study_mark_retrieved_copy(*, study_uid: str, since: datetime) -> None:
    """A retrieval that began at `since` brought this study: a copy `purge` may delete once no
    live share needs it, unless it was there before, or was pushed or imported meanwhile."""
    Study.objects.filter(
        study_instance_uid=study_uid, created_at__gte=since, archived=False
    ).update(retrieved_copy=True)
