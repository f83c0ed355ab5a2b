"""The storage SCP: where a PACS (C-MOVE) or a modality (push) delivers instances.

It accepts associations only from configured PACS nodes (AE title and address), writes each
instance byte for byte into the store as its fragments arrive, and answers a failure status for
anything it cannot store. One bad sender never stops it: each association runs in its own thread
and every error ends at most that association; a peer that is no configured node is dropped
before it holds any resource.

Why not pynetdicom's server: its reactor polls queues with sleeps and copies every fragment
several times, which made receiving a 300-slice CT four times slower than dcmtk. The receive
path here is a plain blocking loop over the upper-layer PDUs (PS3.8 section 9) that writes
fragments straight to disk; pynetdicom still decodes the association request and encodes the
answer, and the command sets are walked by hand (studies.dimse.wire), not decoded by pydicom.

What a success status means: the instance is complete, checked and in its place in the store.
Its index row is written a moment later, in batches, and always before the association is
released: a C-MOVE is complete only after that release. Files are not fsynced (neither dcmtk
nor Orthanc do): after a power cut the PACS still holds the original, and a retrieval job checks
that the index holds everything the PACS reported sent.
"""

import logging
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connection
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import Status

from studies import dicom
from studies.dimse import tls, wire
from studies.dimse.wire import (
    ABORT,
    ASSOCIATE_RJ,
    ASSOCIATE_RQ,
    MAX_PDU,
    NO_DATA_SET,
    P_DATA,
    RELEASE_RQ,
    STORE_CANNOT_UNDERSTAND,
    STORE_DATASET_MISMATCH,
    STORE_OUT_OF_RESOURCES,
    STORE_OVERWRITE_REFUSED,
)
from studies.models import PacsNode
from studies.store import (
    STALE_INCOMING_SECONDS,
    AnotherStudysInstance,
    HashingThread,
    IncomingInstance,
    Indexer,
    Journal,
    JournalEntry,
    OverwriteRefused,
    PlacedInstance,
    StoreError,
    journal_replay,
    studies_keep_in_archive,
    sweep_incoming,
    upsert_instances,
)

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason.
_REJECT_PERMANENT, _REJECT_TRANSIENT = 0x01, 0x02
_SOURCE_SERVICE_USER, _SOURCE_PROVIDER_PRESENTATION = 0x01, 0x03
_CALLING_AE_NOT_RECOGNISED, _CALLED_AE_NOT_RECOGNISED = 0x03, 0x07
_LOCAL_LIMIT_EXCEEDED = 0x02
# Presentation context results (PS3.8 9.3.3.2).
_ACCEPTED, _ABSTRACT_SYNTAX_NOT_SUPPORTED, _TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 3, 4
# An association request is a few kilobytes even with a hundred presentation contexts.
_MAX_ASSOCIATE_RQ = 64 * 1024
# A known node over its limit: how long its association request may take to arrive, and how
# many such callers are answered at once (past that they are only disconnected).
_REJECT_READ_SECONDS = 2.0
_MAX_REJECTING = 8
_C_STORE_RQ, _C_STORE_RSP, _C_ECHO_RQ, _C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
# Instances are indexed by batches of this many, or when the sender pauses this long.
_INDEX_BATCH = 100
_INDEX_DELAY = 0.1

_SUPPORTED_SYNTAXES = frozenset(str(uid) for uid in ALL_TRANSFER_SYNTAXES)
_SUPPORTED_CLASSES = frozenset(
    str(c.abstract_syntax) for c in AllStoragePresentationContexts if c.abstract_syntax
) | {str(Verification)}


class StorageProtocolError(Exception):
    """The peer broke the upper-layer protocol: the association is aborted."""


def _addresses(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


@dataclass
class NodeDirectory:
    """Which (AE title, address) pairs may send to us; re-read from the database every
    `refresh_seconds` (a node removed is refused soon), and when an unknown caller comes: it
    may be a node just added (`pacs add`), whose first association must be accepted at once
    (refused, a PACS reports a failed transfer). Unknown callers cause at most one reading per
    `unknown_reload_seconds`, so that hammering costs the database little: an unknown AE title
    waits (at most that long) for the next reading rather than be refused; a connection from
    an unknown address, which the accept loop answers, is dropped unless a reading is due."""

    refresh_seconds: float = 10.0
    unknown_reload_seconds: float = 1.0
    loads: int = 0  # how many times the list was read
    _allowed: dict[str, tuple[PacsNode, set[str]]] = field(default_factory=dict)
    _known_addresses: frozenset[str] = frozenset()
    _loaded_at: float = float("-inf")
    # When the last completed reading began, and the last one an unknown caller asked for.
    _read_started_at: float = float("-inf")
    _unknown_read_at: float = float("-inf")
    _reloading: bool = False
    _lock: threading.Condition = field(default_factory=threading.Condition)

    def node_for(self, ae_title: str, address: str) -> PacsNode | None:
        """The PacsNode of a calling AE at an address, or None if it is not configured.

        As it was read, so that an association needs no query of its own for it (on
        PostgreSQL, the connection that query would open costs more than the rest)."""
        node = self._node_for(ae_title, address)
        if node is None and self._reload_for_unknown(wait=True):
            node = self._node_for(ae_title, address)
        return node

    def _node_for(self, ae_title: str, address: str) -> PacsNode | None:
        entry = self._current()[0].get(ae_title.strip())
        if entry is None:
            return None
        node, addresses = entry
        return node if address in addresses else None

    def knows_address(self, address: str) -> bool:
        """Whether any node lives at this address. Asked by the accept loop, which must never
        wait: an unknown address causes a reading only when one is due."""
        if address in self._current()[1]:
            return True
        return self._reload_for_unknown(wait=False) and address in self._current()[1]

    def _reload_for_unknown(self, *, wait: bool) -> bool:
        """Have the list read again for an unknown caller; True once a reading that began
        after the caller came has completed. Without `wait`, False if none is due now."""
        arrived = time.monotonic()
        with self._lock:
            while True:
                if self._read_started_at >= arrived:
                    return True  # another caller's reading covers this one
                now = time.monotonic()
                due = self._unknown_read_at + self.unknown_reload_seconds
                if not self._reloading and now >= due:
                    self._reloading, self._unknown_read_at = True, now
                    break
                if not wait:
                    return False
                self._lock.wait(timeout=None if self._reloading else due - now)
        try:
            self.load()
        finally:
            with self._lock:
                self._reloading = False
                self._lock.notify_all()
        return True

    def load(self) -> None:
        started = time.monotonic()
        allowed, known = self._read()
        with self._lock:
            self._allowed, self._known_addresses = allowed, known
            self._loaded_at = time.monotonic()
            self._read_started_at = max(self._read_started_at, started)
            self.loads += 1

    def _current(self) -> tuple[dict[str, tuple[PacsNode, set[str]]], frozenset[str]]:
        with self._lock:
            stale = time.monotonic() - self._loaded_at > self.refresh_seconds
            # Until a first load, everyone waits for one rather than see an empty directory.
            never_loaded = self._loaded_at == float("-inf")
            reload = stale and (never_loaded or not self._reloading)
            if reload:
                self._reloading = True
        if reload:
            # Outside the lock: a slow name server must not hold up every new association.
            try:
                self.load()
            finally:
                with self._lock:
                    self._reloading = False
                    self._lock.notify_all()
        with self._lock:
            return self._allowed, self._known_addresses

    @staticmethod
    def _read() -> tuple[dict[str, tuple[PacsNode, set[str]]], frozenset[str]]:
        allowed: dict[str, tuple[PacsNode, set[str]]] = {}
        try:
            for node in PacsNode.objects.all():
                key = node.ae_title.strip()
                first, addresses = allowed.get(key, (node, set()))
                allowed[key] = (first, addresses | _addresses(node.host))
        finally:
            connection.close()
        known = frozenset(a for _, addresses in allowed.values() for a in addresses)
        return allowed, known


class StorageServer:
    """Listens for associations; one thread per association, at most `max_associations`, and
    at most `max_per_address` from one address."""

    def __init__(
        self,
        *,
        ae_title: str,
        host: str,
        port: int,
        max_associations: int = 32,
        max_per_address: int = 8,
    ) -> None:
        self.ae_title = ae_title
        # DICOM TLS when configured (studies.dimse.tls): then no plain association gets in.
        self.tls = tls.server_context()
        self.address = (host, port)
        self.nodes = NodeDirectory()
        self.max_associations = max_associations
        self.max_per_address = max_per_address
        self._per_address: dict[str, int] = {}
        self._associations: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._rejecting = threading.BoundedSemaphore(_MAX_REJECTING)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self, block: bool = False) -> None:
        sweep_incoming(older_than=STALE_INCOMING_SECONDS)
        try:
            # What an earlier run confirmed to its senders but could not index.
            journal_replay()
        except Exception:
            # The database may be down at start: the worker's regular sweep will do it.
            logger.exception("could not index the instances the journals list")
        listener = socket.create_server(self.address, reuse_port=False, backlog=64)
        self._socket = listener
        self.address = listener.getsockname()[:2]
        logger.info("storage SCP %s listening on %s:%s", self.ae_title, *self.address)
        if block:
            self._accept_loop()
        else:
            self._thread = threading.Thread(target=self._accept_loop, name="storescp", daemon=True)
            self._thread.start()

    def stop(self, grace: float = 30.0) -> None:
        """Stop listening, let running associations end (then abort those that do not), so
        that everything already acknowledged is indexed."""
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
        deadline = time.monotonic() + grace
        for thread in self._running():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for thread in self._running():
            association: StorageAssociation | None = getattr(thread, "association", None)
            if association is not None:
                association.shut_down()
            thread.join(timeout=10)

    def _running(self) -> list[threading.Thread]:
        with self._lock:
            return [t for t in self._associations if t.is_alive()]

    def _accept_loop(self) -> None:
        assert self._socket is not None
        listener = self._socket
        try:
            listener.settimeout(0.5)
        except OSError:
            return  # stopped before this thread began
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
            self._admit(conn, str(peer[0]))

    def _admit(self, conn: socket.socket, address: str) -> None:
        if not self.nodes.knows_address(address):
            # No configured node lives there: not worth a thread, a slot or a log line each.
            logger.debug("dropped a connection from %s: no configured node there", address)
            conn.close()
            return
        with self._lock:
            busy = len(self._associations) >= self.max_associations
            crowded = self._per_address.get(address, 0) >= self.max_per_address
            if not busy and not crowded:
                self._per_address[address] = self._per_address.get(address, 0) + 1
                thread = threading.Thread(
                    target=self._serve, args=(conn, address), name=f"storescp-{address}"
                )
                self._associations.add(thread)
        if busy or crowded:
            logger.warning("refused a connection from %s: too many associations", address)
            if self._rejecting.acquire(blocking=False):
                threading.Thread(
                    target=self._reject_busy, args=(conn,), name=f"storescp-reject-{address}"
                ).start()
            else:
                conn.close()  # a flood of them: no answer but the closed connection
            return
        thread.start()

    def _reject_busy(self, conn: socket.socket) -> None:
        """Answer a known node over its limit with a transient rejection ("come back later"),
        on a thread of its own so that a slow caller never holds up the accept loop.

        The rejection answers the caller's A-ASSOCIATE-RQ (PS3.8 9.3.4), so that request is
        read first: sent before it, the rejection may reach a caller that is not yet waiting
        for an answer (pynetdicom then aborts), and a socket closed with the request unread
        answers with a reset that may destroy the rejection in flight."""
        try:
            conn.settimeout(_REJECT_READ_SECONDS)
            try:
                _read_associate_rq(conn)
            except (OSError, wire.Malformed):
                return
            _send_quietly(
                conn,
                _reject_pdu(
                    _REJECT_TRANSIENT, _SOURCE_PROVIDER_PRESENTATION, _LOCAL_LIMIT_EXCEEDED
                ),
            )
            try:
                conn.shutdown(socket.SHUT_WR)
                conn.recv(_MAX_ASSOCIATE_RQ)  # until the caller closes, or the timeout
            except OSError:
                pass
        finally:
            conn.close()
            self._rejecting.release()

    def _handshake(self, conn: socket.socket, address: str) -> socket.socket | None:
        """The TLS handshake, in the association's thread (never the accept loop) and within
        the ARTIM time; None when it fails (no certificate, a plain association…)."""
        assert self.tls is not None
        conn.settimeout(settings.DICOM_CONNECT_TIMEOUT)
        artim = threading.Timer(settings.DICOM_CONNECT_TIMEOUT, _shut_down, args=(conn,))
        artim.start()
        try:
            return self.tls.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            logger.warning("refused a connection from %s: TLS handshake failed (%s)", address, exc)
            return None
        finally:
            artim.cancel()

    def _serve(self, conn: socket.socket, address: str) -> None:
        try:
            if self.tls is not None:
                secured = self._handshake(conn, address)
                if secured is None:
                    return
                conn = secured
            association = StorageAssociation(self, conn, address)
            threading.current_thread().association = association  # type: ignore[attr-defined]
            association.run()
        except Exception:
            logger.exception("association from %s ended with an error", address)
        finally:
            try:
                conn.close()
            except OSError:
                pass
            # Each association thread had its own database connection.
            connection.close()
            with self._lock:
                self._associations.discard(threading.current_thread())
                self._per_address[address] -= 1
                if not self._per_address[address]:
                    del self._per_address[address]


def _negotiate(requested: list[PresentationContext]) -> list[PresentationContext]:
    """Accept each storage (or verification) context in the first transfer syntax the
    requester listed that we support: its order says how it holds the instances, and any other
    choice would make it transcode them."""
    results = []
    for context in requested:
        result = PresentationContext()
        result.context_id = context.context_id
        result.abstract_syntax = context.abstract_syntax
        if str(context.abstract_syntax) not in _SUPPORTED_CLASSES:
            result.result = _ABSTRACT_SYNTAX_NOT_SUPPORTED
            result.transfer_syntax = [context.transfer_syntax[0]]
        else:
            chosen = [ts for ts in context.transfer_syntax if str(ts) in _SUPPORTED_SYNTAXES]
            result.result = _ACCEPTED if chosen else _TRANSFER_SYNTAXES_NOT_SUPPORTED
            result.transfer_syntax = [chosen[0] if chosen else context.transfer_syntax[0]]
        results.append(result)
    return results


class StorageAssociation:
    """One association, from the A-ASSOCIATE-RQ to the release or abort."""

    def __init__(self, server: StorageServer, conn: socket.socket, address: str) -> None:
        self.server = server
        self.conn = conn
        self.address = address
        self.calling_ae = ""
        self.contexts: dict[int, tuple[str, str]] = {}  # id -> (abstract syntax, syntax)
        self.indexer: Indexer | None = None
        self.index_worker = IndexWorker("")
        self.hasher: HashingThread | None = None
        self.journal = Journal()
        self.source_id: int | None = None
        # Studies that received instances no retrieval of ours asked for: local archive now.
        self.pushed_studies: set[str] = set()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Room for a whole slice in the socket: the sender can finish sending it while we
        # hash and write the first fragments.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self._reader = conn.makefile("rb", buffering=1 << 20)

    def shut_down(self) -> None:
        """From another thread: end this association now (the server is stopping)."""
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- reading -----------------------------------------------------------------------------
    def _read_exact(self, size: int) -> bytes:
        data = self._reader.read(size)
        if data is None or len(data) < size:
            raise ConnectionError("the peer closed the connection")
        return data

    def _read_pdu(self, limit: int = MAX_PDU + 6) -> tuple[int, bytes]:
        header = self._read_exact(6)
        pdu_type, length = header[0], struct.unpack(">I", header[2:6])[0]
        if length > limit:
            raise StorageProtocolError(f"PDU of {length} bytes exceeds the announced maximum")
        return pdu_type, self._read_exact(length)

    # -- the state machine, flattened ----------------------------------------------------------
    def run(self) -> None:
        # ARTIM (PS3.8 9.1.5): the whole request must arrive in time, not merely each byte
        # of it: a peer trickling a byte at a time would otherwise hold its slot for ever.
        self.conn.settimeout(settings.DICOM_CONNECT_TIMEOUT)
        artim = threading.Timer(settings.DICOM_CONNECT_TIMEOUT, self.shut_down)
        artim.start()
        try:
            pdu_type, body = self._read_pdu(limit=_MAX_ASSOCIATE_RQ)
            if pdu_type != ASSOCIATE_RQ:
                raise StorageProtocolError(
                    f"expected an association request, got PDU 0x{pdu_type:02X}"
                )
        except StorageProtocolError as exc:
            logger.warning("aborting a connection from %s: %s", self.address, exc)
            self._abort()
            return
        except (ConnectionError, TimeoutError, OSError):
            return
        finally:
            artim.cancel()
        if not self._accept(body):
            return
        self.conn.settimeout(settings.DICOM_NETWORK_TIMEOUT)
        try:
            self._data_phase()
        except StorageProtocolError as exc:
            logger.warning("aborting the association from %r: %s", self.calling_ae, exc)
            self._abort()
        except (ConnectionError, TimeoutError, OSError) as exc:
            logger.warning("association from %r broke off: %s", self.calling_ae, exc)
        except Exception:
            logger.exception("aborting the association from %r", self.calling_ae)
            self._abort()

    def _accept(self, body: bytes) -> bool:
        request = A_ASSOCIATE_RQ()
        try:
            request.decode(bytes([ASSOCIATE_RQ, 0]) + struct.pack(">I", len(body)) + body)
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
            _send_quietly(
                self.conn,
                _reject_pdu(_REJECT_PERMANENT, _SOURCE_SERVICE_USER, _CALLED_AE_NOT_RECOGNISED),
            )
            return False
        node = self.server.nodes.node_for(self.calling_ae, self.address)
        if node is None:
            logger.warning(
                "refused association from %r at %s: not a configured node",
                self.calling_ae,
                self.address,
            )
            _send_quietly(
                self.conn,
                _reject_pdu(_REJECT_PERMANENT, _SOURCE_SERVICE_USER, _CALLING_AE_NOT_RECOGNISED),
            )
            return False
        accepted = _negotiate(primitive.presentation_context_definition_list)
        for context in accepted:
            if context.result == _ACCEPTED and context.context_id is not None:
                self.contexts[context.context_id] = (
                    str(context.abstract_syntax),
                    str(context.transfer_syntax[0]),
                )
        self.source_id = node.pk
        self.indexer = Indexer(
            source=node,
            peer=f"{self.calling_ae}@{self.address}",
        )
        self.index_worker = IndexWorker(self.calling_ae)
        self.hasher = HashingThread()

        answer = A_ASSOCIATE()
        answer.application_context_name = primitive.application_context_name
        answer.calling_ae_title = primitive.calling_ae_title
        answer.called_ae_title = primitive.called_ae_title
        answer.result = 0x00
        answer.presentation_context_definition_results_list = accepted
        answer.user_information = wire.user_information()
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(answer)
        self.conn.sendall(pdu.encode())
        return True

    def _data_phase(self) -> None:
        try:
            self._exchange()
        finally:
            # Whatever ended the association, what was acknowledged gets indexed.
            self.index_worker.finish()
            if self.hasher is not None:
                self.hasher.close()
            settled = not self.index_worker.orphans
            if self.pushed_studies:
                settled &= self._keep_pushed_studies()
            # Anything left undone stays in the journal, for journal_replay.
            self.journal.close(settled=settled)

    def _keep_pushed_studies(self) -> bool:
        try:
            studies_keep_in_archive(self.pushed_studies)
        except Exception:
            logger.exception("could not mark the studies %r pushed to the archive", self.calling_ae)
            return False
        return True

    def _exchange(self) -> None:
        fragments = wire.CommandFragments()
        pending: _Command | None = None  # the command whose data set is arriving
        incoming: IncomingInstance | None = None
        failure: tuple[int, str] | None = None
        try:
            while True:
                pdu_type, body = self._read_pdu()
                if pdu_type == RELEASE_RQ:
                    # The sender (a PACS serving a C-MOVE) ends its work after the release:
                    # by then every instance it sent must be in the index.
                    self.index_worker.finish()
                    self.conn.sendall(wire.RELEASE_RP_PDU)
                    return
                if pdu_type == ABORT:
                    logger.info("association from %r aborted by the peer", self.calling_ae)
                    return
                if pdu_type != P_DATA:
                    raise StorageProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
                for context_id, is_command, is_last, fragment in wire.pdvs(memoryview(body)):
                    if context_id not in self.contexts:
                        raise StorageProtocolError(f"unknown presentation context {context_id}")
                    if is_command:
                        if pending is not None:
                            raise StorageProtocolError(
                                "a command arrived before the previous data set"
                            )
                        command = fragments.add(fragment, is_last)
                        if command is None:
                            continue
                        pending = _decode_command(command, context_id)
                        if not pending.has_data_set:
                            if pending.field == _C_STORE_RQ:
                                failure = (STORE_CANNOT_UNDERSTAND, "C-STORE without a data set")
                            self._answer(pending, failure)
                            pending, failure = None, None
                            continue
                        incoming, failure = self._begin(pending, context_id)
                    else:
                        if pending is None:
                            raise StorageProtocolError("a data set arrived without a command")
                        if context_id != pending.context_id:
                            raise StorageProtocolError("a data set arrived on another context")
                        if incoming is not None:
                            try:
                                incoming.write(fragment)
                            except StoreError as exc:
                                logger.error("cannot store from %r: %s", self.calling_ae, exc)
                                incoming, failure = None, (STORE_OUT_OF_RESOURCES, str(exc))
                        if is_last:
                            if incoming is not None:
                                failure = self._commit(incoming, pending)
                            self._answer(pending, failure)
                            pending, incoming, failure = None, None, None
        except wire.Malformed as exc:
            # PDVs or command fragments that break their encoding (or our limits on them).
            raise StorageProtocolError(str(exc)) from exc
        finally:
            if incoming is not None:
                incoming.abort()  # never leave half an instance behind

    def _begin(
        self, command: "_Command", context_id: int
    ) -> tuple[IncomingInstance | None, tuple[int, str] | None]:
        if command.field != _C_STORE_RQ:
            raise StorageProtocolError(f"unsupported DIMSE command 0x{command.field:04X}")
        assert self.indexer is not None
        abstract_syntax, transfer_syntax = self.contexts[context_id]
        sop_class = command.sop_class_uid
        if sop_class != abstract_syntax:
            return None, (STORE_DATASET_MISMATCH, "SOP class differs from the context's")
        if self.index_worker.failed:
            # The index stopped working: say so to the sender rather than take more.
            return None, (STORE_OUT_OF_RESOURCES, "the index cannot take more instances")
        try:
            return (
                self.indexer.begin(
                    sop_class_uid=sop_class,
                    sop_instance_uid=command.sop_instance_uid,
                    transfer_syntax_uid=transfer_syntax,
                    source_ae=self.calling_ae,
                    hasher=self.hasher,
                ),
                None,
            )
        except dicom.InvalidDicom as exc:
            logger.warning("refused an instance from %r: %s", self.calling_ae, exc)
            return None, (STORE_CANNOT_UNDERSTAND, str(exc))
        except StoreError as exc:
            logger.error("cannot store from %r: %s", self.calling_ae, exc)
            return None, (STORE_OUT_OF_RESOURCES, str(exc))

    def _commit(self, incoming: IncomingInstance, command: "_Command") -> tuple[int, str] | None:
        try:
            # No index lookup per slice: the index write refuses another study's instance.
            placed = incoming.place(ask_index=False)
            pushed = command.move_originator != self.server.ae_title.strip()
            try:
                # Before the sender is told it is stored: a confirmed instance always ends in
                # the index, even when the database fails to take its row now.
                self.journal.record(
                    JournalEntry(relative=placed.relative, source_id=self.source_id, pushed=pushed)
                )
            except StoreError:
                placed.discard()
                raise
            self.index_worker.submit(placed)
            if pushed:
                self.pushed_studies.add(placed.header.keys.study_uid)
        except OverwriteRefused as exc:
            logger.warning(
                "refused instance %s from %r at %s: %s",
                command.sop_instance_uid or "?",
                self.calling_ae,
                self.address,
                exc,
            )
            return STORE_OVERWRITE_REFUSED, str(exc)
        except dicom.InvalidDicom as exc:
            logger.warning(
                "refused instance %s from %r: %s",
                command.sop_instance_uid or "?",
                self.calling_ae,
                exc,
            )
            if isinstance(exc, dicom.DatasetMismatch):
                return STORE_DATASET_MISMATCH, str(exc)
            return STORE_CANNOT_UNDERSTAND, str(exc)
        except StoreError as exc:
            logger.error("cannot store from %r: %s", self.calling_ae, exc)
            return STORE_OUT_OF_RESOURCES, str(exc)
        except Exception:
            logger.exception("unexpected error storing an instance from %r", self.calling_ae)
            return STORE_OUT_OF_RESOURCES, "internal error"
        return None

    def _answer(self, command: "_Command", failure: tuple[int, str] | None) -> None:
        status, comment = failure or (Status.SUCCESS, "")
        if command.field == _C_ECHO_RQ:
            response = _encode_response(_C_ECHO_RSP, command, Status.SUCCESS, "", False)
        elif command.field == _C_STORE_RQ:
            response = _encode_response(_C_STORE_RSP, command, status, comment, True)
        else:
            raise StorageProtocolError(f"unsupported DIMSE command 0x{command.field:04X}")
        self.conn.sendall(
            wire.p_data(
                response, context_id=command.context_id, is_command=True, max_fragment=MAX_PDU
            )
        )

    def _abort(self) -> None:
        # Source 2: aborted by the service provider (us), reason not specified.
        _send_quietly(self.conn, wire.abort_pdu(source=2))


def _shut_down(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _reject_pdu(result: int, source: int, reason: int) -> bytes:
    return bytes([ASSOCIATE_RJ, 0, 0, 0, 0, 4, 0, result, source, reason])


def _read_associate_rq(conn: socket.socket) -> None:
    """Read (and discard) one PDU of at most _MAX_ASSOCIATE_RQ bytes."""
    header = _recv_exactly(conn, 6)
    length = struct.unpack(">I", header[2:6])[0]
    if length > _MAX_ASSOCIATE_RQ:
        raise wire.Malformed("association request too long")
    _recv_exactly(conn, length)


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(left)
        if not chunk:
            raise ConnectionError("closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    try:
        conn.sendall(data)
    except OSError:
        pass


class IndexWorker:
    """Indexes the instances of one association on a thread of its own, in batches.

    Writing index rows is the slowest step of storing a slice, yet nothing needs the rows
    before the sender is done: a C-MOVE completes only after the association is released, and
    `finish()` holds the release until every row is written. So rows are written in batches:
    when the sender pauses, when a hundred are waiting, and at the release. Not row by row
    (each statement costs a round trip to the database and the interpreter's time, which the
    receiving thread needs), nor all at the release: the sender would wait for all of them
    (on PostgreSQL, 300 rows and the study's first statements on a new connection keep the
    release waiting some 40 ms, against a few for the last batch).

    The sender was told these instances are stored: a row that cannot be written leaves its
    file in place and in the association's journal (`journal_replay` indexes it later), and
    the association refuses further instances. An instance the index refuses because another
    study holds its UID (see `upsert_instances`) is removed, the sender's answer
    notwithstanding: no sender moves an instance from one study to another.
    """

    def __init__(self, calling_ae: str) -> None:
        self.calling_ae = calling_ae
        self.failed = False
        self.orphans = 0  # instances confirmed but not indexed
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

    def _take(self) -> list[PlacedInstance]:
        with self._lock:
            batch, self._pending = self._pending, []
        return batch

    def _run(self) -> None:
        try:
            _relax_commit_durability()
            while True:
                woken = self._wake.wait(timeout=_INDEX_DELAY)
                self._wake.clear()
                # A sender that pauses (a modality pushing now and then) still sees its
                # instances indexed within a fraction of a second.
                paused = time.monotonic() - self._last_submit >= _INDEX_DELAY
                if woken or paused:
                    self._index(self._take())
                if self._finishing:
                    self._index(self._take())
                    return
        except Exception:
            self.failed = True
            logger.exception("the indexing thread of %r stopped", self.calling_ae)
            self._orphan(self._take())
        finally:
            connection.close()

    def _index(self, batch: list[PlacedInstance]) -> None:
        if not batch:
            return
        try:
            self._write(batch)
            return
        except Exception:
            logger.exception("could not index %d instances from %r", len(batch), self.calling_ae)
        # One bad row (or a database hiccup) must not cost the others their place.
        for placed in batch:
            try:
                self._write([placed])
            except Exception:
                self._orphan([placed])

    def _write(self, batch: list[PlacedInstance]) -> None:
        rows, refused = [], []
        for placed in batch:
            try:
                rows.append((placed, placed.build()))
            except AnotherStudysInstance:
                refused.append(placed)
        written = upsert_instances([row for _, row in rows])
        refused += [placed for placed, row in rows if row.sop_instance_uid not in written]
        for placed in refused:
            placed.discard()
            logger.error(
                "removed instance %s from %r: its UID belongs to another study in the store",
                placed.header.keys.sop_instance_uid,
                self.calling_ae,
            )

    def _orphan(self, placed: list[PlacedInstance]) -> None:
        for instance in placed:
            self.failed = True
            self.orphans += 1
            logger.error(
                "instance %s from %r is stored at %s but not indexed yet (its journal keeps it)",
                instance.header.keys.sop_instance_uid,
                self.calling_ae,
                instance.relative,
            )


def _relax_commit_durability() -> None:
    """Let PostgreSQL acknowledge this connection's index rows before they reach its WAL disk.

    Waiting for a WAL flush for every batch would slow the sender's release. The trade is safe
    here: the PACS keeps the original, a crash can lose only the last fraction of a second of
    rows, and a retrieval job checks that the index holds every instance the PACS reported sent.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit TO OFF")


@dataclass(frozen=True)
class _Command:
    """A request's command set: what answering it needs."""

    field: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    has_data_set: bool
    context_id: int
    # Who asked for the C-MOVE this C-STORE is part of; "" for an instance pushed on its own.
    move_originator: str = ""


def _decode_command(data: bytes, context_id: int) -> _Command:
    try:
        elements = wire.command_elements(data)
        return _Command(
            field=wire.unsigned_short(elements, wire.COMMAND_FIELD) or 0,
            message_id=wire.unsigned_short(elements, wire.MESSAGE_ID) or 0,
            sop_class_uid=wire.uid(elements, wire.AFFECTED_SOP_CLASS_UID),
            sop_instance_uid=wire.uid(elements, wire.AFFECTED_SOP_INSTANCE_UID),
            has_data_set=wire.unsigned_short(elements, wire.DATA_SET_TYPE) != NO_DATA_SET,
            context_id=context_id,
            move_originator=elements.get(wire.MOVE_ORIGINATOR_AE_TITLE, b"")
            .decode("ascii", "replace")
            .strip(" \x00"),
        )
    except wire.Malformed as exc:
        raise StorageProtocolError(f"undecodable command set: {exc}") from exc


def _encode_response(
    command_field: int, request: _Command, status: int, comment: str, include_instance: bool
) -> bytes:
    """A C-STORE-RSP or C-ECHO-RSP command set (PS3.7 9.3.1.2)."""
    elements = [
        (wire.AFFECTED_SOP_CLASS_UID, wire.padded(request.sop_class_uid, b"\x00")),
        (wire.COMMAND_FIELD, struct.pack("<H", command_field)),
        (wire.MESSAGE_ID_RESPONDED_TO, struct.pack("<H", request.message_id)),
        (wire.DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        (wire.STATUS, struct.pack("<H", status)),
    ]
    if comment and status != Status.SUCCESS:
        # Error Comment (LO, at most 64 characters): what a PACS administrator reads.
        # LO: no control characters, no backslash (the value separator).
        text = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in comment)[:64]
        elements.append((wire.ERROR_COMMENT, wire.padded(text, b" ")))
    if include_instance and request.sop_instance_uid:
        elements.append(
            (wire.AFFECTED_SOP_INSTANCE_UID, wire.padded(request.sop_instance_uid, b"\x00"))
        )
    return wire.command_set(*elements)
