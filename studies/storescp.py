"""The storage SCP: where a PACS (C-MOVE) or a modality (push) delivers instances.

It accepts associations only from configured PACS nodes (AE title and address), writes each
instance byte for byte into the store as its fragments arrive, indexes it, and answers a
failure status for anything it cannot store. One bad sender never stops it: each association
runs in its own thread and every error ends at most that association.

Why not pynetdicom's server: its reactor polls queues with sleeps and copies every fragment
several times, which made receiving a 300-slice CT four times slower than dcmtk. The receive
path here is a plain blocking loop over the upper-layer PDUs (PS3.8 section 9) that writes
fragments straight to disk; pynetdicom still decodes the association request, negotiates the
presentation contexts and encodes the answer, and pydicom decodes the command sets.
"""

import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO

from django.conf import settings
from django.db import connection
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context, negotiate_as_acceptor
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from studies import dicom
from studies.models import PacsNode
from studies.pacs import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
)
from studies.store import (
    IncomingInstance,
    Indexer,
    PlacedInstance,
    StoreError,
    upsert_instances,
)

logger = logging.getLogger(__name__)

# PDU types (PS3.8 9.3.1).
_ASSOCIATE_RQ, _ASSOCIATE_AC, _ASSOCIATE_RJ = 0x01, 0x02, 0x03
_P_DATA, _RELEASE_RQ, _RELEASE_RP, _ABORT = 0x04, 0x05, 0x06, 0x07
# A-ASSOCIATE-RJ: rejected-permanent, by the service user; reasons.
_REJECT_PERMANENT, _SOURCE_SERVICE_USER = 0x01, 0x01
_CALLING_AE_NOT_RECOGNISED, _CALLED_AE_NOT_RECOGNISED = 0x03, 0x07
# The largest PDU we accept (and announce): big PDUs mean fewer loop turns per slice.
MAX_PDU = 4 * 1024 * 1024
# A command set is a few hundred bytes; anything larger is an attack or a bug.
_MAX_COMMAND = 64 * 1024
_C_STORE_RQ, _C_STORE_RSP, _C_ECHO_RQ, _C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
_NO_DATASET = 0x0101
# Instances are indexed by batches of this many, or after this many seconds.
_INDEX_BATCH = 1000
_INDEX_DELAY = 0.1


class ProtocolError(Exception):
    """The peer broke the upper-layer protocol: the association is aborted."""


def _addresses(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


@dataclass
class NodeDirectory:
    """Which (AE title, address) pairs may send to us; re-read from the database now and then
    so that `pacs add` takes effect without a restart."""

    refresh_seconds: float = 10.0
    _allowed: dict[str, tuple[int, set[str]]] = field(default_factory=dict)
    _loaded_at: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def node_for(self, ae_title: str, address: str) -> int | None:
        """The PacsNode id for a calling AE at an address, or None if it is not configured."""
        with self._lock:
            if time.monotonic() - self._loaded_at > self.refresh_seconds:
                self._reload()
            entry = self._allowed.get(ae_title.strip())
        if entry is None:
            return None
        node_id, addresses = entry
        return node_id if address in addresses else None

    def invalidate(self) -> None:
        with self._lock:
            self._loaded_at = float("-inf")

    def _reload(self) -> None:
        allowed: dict[str, tuple[int, set[str]]] = {}
        for node in PacsNode.objects.all():
            key = node.ae_title.strip()
            node_id, addresses = allowed.get(key, (node.pk, set()))
            allowed[key] = (node_id, addresses | _addresses(node.host))
        self._allowed = allowed
        self._loaded_at = time.monotonic()


def _supported_contexts() -> list:
    contexts = [
        build_context(c.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        for c in AllStoragePresentationContexts
        if c.abstract_syntax
    ]
    contexts.append(build_context(Verification))
    return contexts


class StorageServer:
    """Listens for associations; one thread per association, at most `max_associations`."""

    def __init__(self, *, ae_title: str, host: str, port: int, max_associations: int = 32) -> None:
        self.ae_title = ae_title
        self.address = (host, port)
        self.nodes = NodeDirectory()
        self._contexts = _supported_contexts()
        self._slots = threading.BoundedSemaphore(max_associations)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self, block: bool = False) -> None:
        listener = socket.create_server(self.address, reuse_port=False, backlog=64)
        self._socket = listener
        self.address = listener.getsockname()[:2]
        logger.info("storage SCP %s listening on %s:%s", self.ae_title, *self.address)
        if block:
            self._accept_loop()
        else:
            self._thread = threading.Thread(target=self._accept_loop, name="storescp", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._socket is not None:
            try:
                self._socket.close()
            except OSError:
                pass
            self._socket = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _accept_loop(self) -> None:
        assert self._socket is not None
        listener = self._socket
        listener.settimeout(0.5)
        while not self._stopping.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                logger.exception("storage SCP accept failed")
                time.sleep(0.1)
                continue
            if not self._slots.acquire(blocking=False):
                logger.warning("refused a connection from %s: too many associations", peer[0])
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn, peer[0]), name=f"storescp-{peer[0]}", daemon=True
            ).start()

    def _serve(self, conn: socket.socket, address: str) -> None:
        try:
            Association(self, conn, address).run()
        except Exception:
            logger.exception("association from %s ended with an error", address)
        finally:
            self._slots.release()
            try:
                conn.close()
            except OSError:
                pass
            # Each association thread had its own database connection.
            connection.close()


class Association:
    """One association, from the A-ASSOCIATE-RQ to the release or abort."""

    def __init__(self, server: StorageServer, conn: socket.socket, address: str) -> None:
        self.server = server
        self.conn = conn
        self.address = address
        self.calling_ae = ""
        self.contexts: dict[int, tuple[str, str]] = {}  # id -> (abstract syntax, syntax)
        self.peer_max_pdu = 16384
        self.indexer: Indexer | None = None
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Room for a whole slice in the socket: the sender can finish sending it while we
        # hash and write the first fragments.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        conn.settimeout(settings.DICOM_NETWORK_TIMEOUT)
        self._reader = conn.makefile("rb", buffering=1 << 20)

    # -- reading -----------------------------------------------------------------------------
    def _read_exact(self, size: int) -> bytes:
        data = self._reader.read(size)
        if data is None or len(data) < size:
            raise ConnectionError("the peer closed the connection")
        return data

    def _read_pdu(self) -> tuple[int, bytes]:
        header = self._read_exact(6)
        pdu_type, length = header[0], struct.unpack(">I", header[2:6])[0]
        if length > MAX_PDU + 6:
            raise ProtocolError(f"PDU of {length} bytes exceeds the announced maximum")
        return pdu_type, self._read_exact(length)

    # -- the state machine, flattened ----------------------------------------------------------
    def run(self) -> None:
        self.conn.settimeout(settings.DICOM_CONNECT_TIMEOUT)  # ARTIM: the request must come soon
        try:
            pdu_type, body = self._read_pdu()
        except (ConnectionError, TimeoutError, ProtocolError, OSError):
            return
        if pdu_type != _ASSOCIATE_RQ:
            self._abort()
            return
        if not self._accept(body):
            return
        self.conn.settimeout(settings.DICOM_NETWORK_TIMEOUT)
        try:
            self._data_phase()
        except ProtocolError as exc:
            logger.warning("aborting the association from %r: %s", self.calling_ae, exc)
            self._abort()
        except (ConnectionError, TimeoutError, OSError) as exc:
            logger.warning("association from %r broke off: %s", self.calling_ae, exc)

    def _accept(self, body: bytes) -> bool:
        request = A_ASSOCIATE_RQ()
        try:
            request.decode(bytes([_ASSOCIATE_RQ, 0]) + struct.pack(">I", len(body)) + body)
            primitive = request.to_primitive()
        except Exception:
            logger.warning("malformed association request from %s", self.address)
            self._abort()
            return False
        self.calling_ae = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        if called != self.server.ae_title.strip():
            logger.warning(
                "refused association from %r at %s: called AE %r is not ours",
                self.calling_ae,
                self.address,
                called,
            )
            self._send_reject(_CALLED_AE_NOT_RECOGNISED)
            return False
        node_id = self.server.nodes.node_for(self.calling_ae, self.address)
        if node_id is None:
            logger.warning(
                "refused association from %r at %s: not a configured node",
                self.calling_ae,
                self.address,
            )
            self._send_reject(_CALLING_AE_NOT_RECOGNISED)
            return False
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification) and item.maximum_length_received:
                self.peer_max_pdu = item.maximum_length_received
        accepted, _roles = negotiate_as_acceptor(
            primitive.presentation_context_definition_list, self.server._contexts
        )
        for context in accepted:
            if context.result == 0x00 and context.transfer_syntax and context.context_id:
                self.contexts[context.context_id] = (
                    str(context.abstract_syntax),
                    str(context.transfer_syntax[0]),
                )
        self.indexer = Indexer(source=PacsNode.objects.filter(pk=node_id).first())

        answer = A_ASSOCIATE()
        answer.application_context_name = primitive.application_context_name
        answer.calling_ae_title = primitive.calling_ae_title
        answer.called_ae_title = primitive.called_ae_title
        answer.result = 0x00
        answer.presentation_context_definition_results_list = accepted
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = MAX_PDU
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = dicom.IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = dicom.IMPLEMENTATION_VERSION_NAME
        answer.user_information = [max_length, implementation, version]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(answer)
        self.conn.sendall(pdu.encode())
        return True

    def _data_phase(self) -> None:
        self.index_worker = IndexWorker(self.calling_ae)
        try:
            self._exchange()
        finally:
            # Whatever ended the association, what was acknowledged gets indexed.
            self.index_worker.finish()

    def _exchange(self) -> None:
        command = bytearray()
        pending: Dataset | None = None  # the command whose data set is arriving
        incoming: IncomingInstance | None = None
        failed_status: int | None = None
        try:
            while True:
                pdu_type, body = self._read_pdu()
                if pdu_type == _RELEASE_RQ:
                    # The sender (a PACS serving a C-MOVE) ends its work after the release:
                    # by then every instance it sent must be in the index.
                    self.index_worker.finish()
                    self.conn.sendall(bytes([_RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
                    return
                if pdu_type == _ABORT:
                    logger.info("association from %r aborted by the peer", self.calling_ae)
                    return
                if pdu_type != _P_DATA:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
                view = memoryview(body)
                offset = 0
                while offset < len(view):
                    if offset + 6 > len(view):
                        raise ProtocolError("truncated presentation data value")
                    item_length = struct.unpack_from(">I", view, offset)[0]
                    if item_length < 2 or offset + 4 + item_length > len(view):
                        raise ProtocolError("bad presentation data value length")
                    context_id, control = view[offset + 4], view[offset + 5]
                    fragment = view[offset + 6 : offset + 4 + item_length]
                    offset += 4 + item_length
                    if context_id not in self.contexts:
                        raise ProtocolError(f"unknown presentation context {context_id}")
                    is_command, is_last = bool(control & 0x01), bool(control & 0x02)
                    if is_command:
                        if pending is not None:
                            raise ProtocolError("a command arrived before the previous data set")
                        command += fragment
                        if len(command) > _MAX_COMMAND:
                            raise ProtocolError("command set too large")
                        if not is_last:
                            continue
                        pending = _decode_command(bytes(command))
                        command.clear()
                        pending.context_id = context_id  # type: ignore[attr-defined]
                        if pending.get("CommandDataSetType", _NO_DATASET) == _NO_DATASET:
                            self._answer(pending, None)
                            pending = None
                            continue
                        incoming, failed_status = self._begin(pending, context_id)
                    else:
                        if pending is None:
                            raise ProtocolError("a data set arrived without a command")
                        if incoming is not None:
                            try:
                                incoming.write(fragment)
                            except StoreError as exc:
                                logger.error("cannot store from %r: %s", self.calling_ae, exc)
                                incoming, failed_status = None, STATUS_OUT_OF_RESOURCES
                        if is_last:
                            status = failed_status
                            if incoming is not None:
                                status = self._commit(incoming, pending)
                            self._answer(pending, status)
                            pending, incoming, failed_status = None, None, None
        finally:
            if incoming is not None:
                incoming.abort()  # never leave half an instance behind

    def _begin(
        self, command: Dataset, context_id: int
    ) -> tuple[IncomingInstance | None, int | None]:
        if command.get("CommandField") != _C_STORE_RQ:
            return None, STATUS_CANNOT_UNDERSTAND
        assert self.indexer is not None
        abstract_syntax, transfer_syntax = self.contexts[context_id]
        try:
            return (
                self.indexer.begin(
                    sop_class_uid=str(command.get("AffectedSOPClassUID", abstract_syntax)),
                    sop_instance_uid=str(command.get("AffectedSOPInstanceUID", "")),
                    transfer_syntax_uid=transfer_syntax,
                    source_ae=self.calling_ae,
                ),
                None,
            )
        except dicom.InvalidDicom as exc:
            logger.warning("refused an instance from %r: %s", self.calling_ae, exc)
            return None, STATUS_CANNOT_UNDERSTAND
        except StoreError as exc:
            logger.error("cannot store from %r: %s", self.calling_ae, exc)
            return None, STATUS_OUT_OF_RESOURCES

    def _commit(self, incoming: IncomingInstance, command: Dataset) -> int:
        if self.index_worker.failed:
            # The index stopped working: say so to the sender rather than take more.
            incoming.abort()
            return STATUS_OUT_OF_RESOURCES
        try:
            self.index_worker.submit(incoming.place())
        except dicom.InvalidDicom as exc:
            logger.warning(
                "refused instance %s from %r: %s",
                command.get("AffectedSOPInstanceUID", "?"),
                self.calling_ae,
                exc,
            )
            if "SOP Instance UID" in str(exc):
                return STATUS_DATASET_MISMATCH
            return STATUS_CANNOT_UNDERSTAND
        except StoreError as exc:
            logger.error("cannot store from %r: %s", self.calling_ae, exc)
            return STATUS_OUT_OF_RESOURCES
        except Exception:
            logger.exception("unexpected error indexing an instance from %r", self.calling_ae)
            return STATUS_OUT_OF_RESOURCES
        return STATUS_SUCCESS

    def _answer(self, command: Dataset, status: int | None) -> None:
        field_ = command.get("CommandField")
        if field_ == _C_ECHO_RQ:
            response = _encode_response(
                _C_ECHO_RSP, command, STATUS_SUCCESS, include_instance=False
            )
        elif field_ == _C_STORE_RQ:
            response = _encode_response(
                _C_STORE_RSP, command, STATUS_SUCCESS if status is None else status
            )
        else:
            raise ProtocolError(f"unsupported DIMSE command 0x{field_ or 0:04X}")
        context_id = command.context_id  # type: ignore[attr-defined]
        item = struct.pack(">IBB", len(response) + 2, context_id, 0x03) + response
        self.conn.sendall(struct.pack(">BBI", _P_DATA, 0, len(item)) + item)

    def _send_reject(self, reason: int) -> None:
        pdu = bytes(
            [_ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, _REJECT_PERMANENT, _SOURCE_SERVICE_USER, reason]
        )
        try:
            self.conn.sendall(pdu)
        except OSError:
            pass

    def _abort(self) -> None:
        try:
            self.conn.sendall(bytes([_ABORT, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
        except OSError:
            pass


class IndexWorker:
    """Indexes the instances of one association on a thread of its own, in batches.

    Writing index rows is the slowest step of storing a slice, yet nothing needs the rows
    before the sender is done: a C-MOVE completes only after the association is released, and
    `finish()` holds the release until every row is written. So rows are written when the
    sender pauses, when many are waiting, or at the release, not while slices stream in:
    indexing meanwhile would compete with the receiving thread for the interpreter.
    """

    def __init__(self, calling_ae: str) -> None:
        self.calling_ae = calling_ae
        self.failed = False
        self._pending: list[PlacedInstance] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._finishing = False
        self._last_submit = 0.0
        self._thread: threading.Thread | None = None

    def submit(self, placed: PlacedInstance) -> None:
        if self._thread is None:
            self._finishing = False
            self._thread = threading.Thread(target=self._run, name="storescp-index", daemon=True)
            self._thread.start()
        with self._lock:
            self._pending.append(placed)
            full = len(self._pending) >= _INDEX_BATCH
            self._last_submit = time.monotonic()
        if full:
            self._wake.set()

    def finish(self) -> None:
        """Wait until everything submitted is indexed; the worker can be started again."""
        if self._thread is not None:
            self._finishing = True
            self._wake.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        try:
            _relax_commit_durability()
            while True:
                woken = self._wake.wait(timeout=_INDEX_DELAY)
                self._wake.clear()
                with self._lock:
                    # A sender that pauses (a modality pushing now and then) still sees its
                    # instances indexed within a fraction of a second.
                    paused = time.monotonic() - self._last_submit >= _INDEX_DELAY
                    batch = []
                    if woken or paused:
                        batch, self._pending = self._pending, []
                self._index(batch)
                if self._finishing:
                    with self._lock:
                        batch, self._pending = self._pending, []
                    self._index(batch)
                    return
        finally:
            connection.close()

    def _index(self, batch: list[PlacedInstance]) -> None:
        if not batch:
            return
        try:
            upsert_instances([p.build() for p in batch])
        except Exception:
            self.failed = True
            logger.exception("could not index %d instances from %r", len(batch), self.calling_ae)
            for placed in batch:
                placed.discard()


def _relax_commit_durability() -> None:
    """Let PostgreSQL acknowledge this connection's index rows before they reach its WAL disk.

    An index row is written per slice; waiting for a WAL flush each time would double the time
    a CT takes to arrive. The trade is safe here: the PACS keeps the original, a crash can lose
    only the last fraction of a second of rows, and a retrieval job checks that the index holds
    every instance the PACS reported sent.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit TO OFF")


def _decode_command(data: bytes) -> Dataset:
    """A DIMSE command set: always implicit VR little endian (PS3.7 6.3.1)."""
    try:
        command = read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)
        command.get("CommandField")  # force the parse of the elements we rely on
    except Exception as exc:
        raise ProtocolError(f"undecodable command set: {exc}") from exc
    return command


def _uid_element(element: int, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00"
    return struct.pack("<HHI", 0x0000, element, len(raw)) + raw


def _us_element(element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, element, 2, value)


def _encode_response(
    command_field: int, request: Dataset, status: int, include_instance: bool = True
) -> bytes:
    """A C-STORE-RSP or C-ECHO-RSP command set, implicit VR little endian."""
    elements = [
        _uid_element(0x0002, str(request.get("AffectedSOPClassUID", ""))),
        _us_element(0x0100, command_field),
        _us_element(0x0120, int(request.get("MessageID", 0))),
        _us_element(0x0800, _NO_DATASET),
        _us_element(0x0900, status),
    ]
    if include_instance and request.get("AffectedSOPInstanceUID"):
        elements.append(_uid_element(0x1000, str(request.AffectedSOPInstanceUID)))
    body = b"".join(elements)
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body
