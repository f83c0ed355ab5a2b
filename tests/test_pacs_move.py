"""The C-MOVE client (studies.dimse.move_scu under pacs.move_study) against a second PACS,
dcmtk's dcmqrscp, whose answers Orthanc never gives, and against PACSs gone bad: a peer that
breaks the protocol, announces more than we accept or trickles its answers is cut off quickly,
with an A-ABORT, whatever it tries. (Orthanc, and a PACS dying mid-move, are in test_retrieval
and test_faults.)"""

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

from studies.demo import synthetic
from studies.dimse import pacs
from studies.dimse.storescp import StorageServer
from studies.models import PacsNode
from tests.conftest import scp_port
from tests.support import Service, dcmtk, free_port

pytestmark = pytest.mark.dicom

STUDY_SLICES = 3
ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])


class Snapshots:
    """A progress callback that keeps (completed, failed, warning, remaining) at each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, int | None]] = []

    def __call__(self, counts: pacs.SubOperations) -> None:
        self.calls.append((counts.completed, counts.failed, counts.warning, counts.remaining))


# --- A second PACS: dcmqrscp ----------------------------------------------------------------


@pytest.fixture(scope="module")
def destination_port() -> int:
    """Where the portal's AE title lives for dcmqrscp: a dcmtk storescp, when a test runs one."""
    return free_port()


def qr_scp(
    workdir: Path, portal_ae_title: str, destination_port: int, extra: tuple[str, ...] = ()
) -> dcmtk.QueryRetrieveSCP:
    return dcmtk.QueryRetrieveSCP(
        workdir,
        peers={"portal": (portal_ae_title, destination_port), "loader": ("LOADER", free_port())},
        extra=extra,
    )


@pytest.fixture(scope="module")
def qr_pacs(
    tmp_path_factory: pytest.TempPathFactory, portal_ae_title: str, destination_port: int
) -> Iterator[tuple[dcmtk.QueryRetrieveSCP, str]]:
    """dcmqrscp holding a small CT study; yields it and the study's UID."""
    workdir = tmp_path_factory.mktemp("dcmqrscp")
    datasets = synthetic.make_study(
        patient_name="Second^Pacs", patient_id="QR-1", modalities=(("CT", STUDY_SLICES),)
    )
    files = synthetic.write_study(datasets, workdir / "source")
    with qr_scp(workdir / "pacs", portal_ae_title, destination_port) as server:
        loaded = dcmtk.storescu("127.0.0.1", server.port, files, aet="LOADER", aec=server.aet)
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        yield server, str(datasets[0].StudyInstanceUID)


def peer_of(server: dcmtk.QueryRetrieveSCP) -> pacs.Peer:
    return pacs.Peer(ae_title=server.aet, host="127.0.0.1", port=server.port)


def test_it_follows_a_move_answer_by_answer(
    qr_pacs: tuple[dcmtk.QueryRetrieveSCP, str],
    portal_ae_title: str,
    destination_port: int,
    tmp_path: Path,
) -> None:
    server, study_uid = qr_pacs
    progress = Snapshots()
    with dcmtk.StoreSCP(tmp_path / "received", aet=portal_ae_title, port=destination_port):
        counts = pacs.move_study(peer_of(server), study_uid, portal_ae_title, progress)

    assert counts == pacs.SubOperations(completed=STUDY_SLICES, remaining=0)
    # One report per pending answer (dcmqrscp sends one per instance), then the final one.
    assert progress.calls == [(1, 0, 0, 2), (2, 0, 0, 1), (3, 0, 0, 0), (3, 0, 0, 0)]
    assert len([p for p in (tmp_path / "received").rglob("*") if p.is_file()]) == STUDY_SLICES


def test_it_names_a_move_destination_the_pacs_does_not_know(
    qr_pacs: tuple[dcmtk.QueryRetrieveSCP, str],
) -> None:
    server, study_uid = qr_pacs
    with pytest.raises(pacs.DestinationUnknown) as raised:
        pacs.move_study(peer_of(server), study_uid, "NOWHERE")
    assert str(raised.value) == (
        f"{peer_of(server)} does not know the move destination 'NOWHERE': "
        "add the portal to the PACS's list of DICOM nodes"
    )


def test_it_reads_past_the_list_of_instances_the_pacs_could_not_send(
    qr_pacs: tuple[dcmtk.QueryRetrieveSCP, str],
    portal_ae_title: str,
    destination_port: int,
    tmp_path: Path,
) -> None:
    """The destination refuses every association: dcmqrscp ends the move with a failure whose
    response carries a data set (the Failed SOP Instance UID List), skipped rather than
    mistaken for a broken protocol."""
    server, study_uid = qr_pacs
    progress = Snapshots()
    refusing = dcmtk.StoreSCP(
        tmp_path / "refused", aet=portal_ae_title, port=destination_port, extra=["--refuse"]
    )
    with refusing, pytest.raises(pacs.PacsError) as raised:
        pacs.move_study(peer_of(server), study_uid, portal_ae_title, progress)

    assert str(raised.value) == f"{peer_of(server)} is out of resources (status 0xA702)"
    assert progress.calls[-1] == (0, STUDY_SLICES, 0, 0)


def test_it_names_a_pacs_that_does_not_offer_study_root_move(
    tmp_path: Path, portal_ae_title: str, destination_port: int
) -> None:
    # -QS: dcmqrscp accepts the association but refuses the study-root presentation contexts.
    server = qr_scp(tmp_path, portal_ae_title, destination_port, extra=("-QS",))
    with server, pytest.raises(pacs.PacsError) as raised:
        pacs.move_study(peer_of(server), "1.2.826.0.1.3680043.8.498.2", portal_ae_title)
    assert str(raised.value) == f"{peer_of(server)} does not offer study-root C-MOVE"


@pytest.mark.django_db(transaction=True)
def test_it_says_when_the_pacs_does_not_know_the_portal(
    storage_scp: StorageServer, modality_node: PacsNode, portal_ae_title: str
) -> None:
    """The portal's own storage SCP plays a PACS that has never heard of the portal: it
    rejects the association with "calling AE title not recognised"."""
    peer = pacs.Peer(ae_title=storage_scp.ae_title, host="127.0.0.1", port=scp_port(storage_scp))
    with pytest.raises(pacs.PortalUnknown) as raised:
        pacs.move_study(peer, "1.2.826.0.1.3680043.8.498.3", portal_ae_title)
    assert str(raised.value) == (
        f"{peer} rejected the association: it does not know the portal's AE title "
        f"{portal_ae_title!r}"
    )


# --- PACSs gone bad ---------------------------------------------------------------------------


def _read_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _read_pdu(conn: socket.socket) -> bytes:
    header = _read_exact(conn, 6)
    return header + _read_exact(conn, struct.unpack(">I", header[2:])[0])


def _accept(request: bytes) -> bytes:
    """An A-ASSOCIATE-AC accepting the request's one presentation context."""
    rq = A_ASSOCIATE_RQ()
    rq.decode(request)
    asked = rq.to_primitive()
    context = PresentationContext()
    context.context_id = asked.presentation_context_definition_list[0].context_id
    context.abstract_syntax = asked.presentation_context_definition_list[0].abstract_syntax
    context.transfer_syntax = [ImplicitVRLittleEndian]
    context.result = 0
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    answer = A_ASSOCIATE()
    answer.application_context_name = asked.application_context_name
    answer.calling_ae_title = asked.calling_ae_title
    answer.called_ae_title = asked.called_ae_title
    answer.result = 0
    answer.presentation_context_definition_results_list = [context]
    answer.user_information = [max_length]
    ac = A_ASSOCIATE_AC()
    ac.from_primitive(answer)
    return bytes(ac.encode())


def _read_c_move(conn: socket.socket) -> None:
    """Read P-DATA-TF PDUs up to the last fragment of the identifier."""
    while True:
        pdu = _read_pdu(conn)
        assert pdu[0] == 0x04
        # The client sends each fragment in a PDU of its own: byte 11 is its control header.
        if pdu[11] == 0x02:  # the last fragment of a data set
            return


def _command(*elements: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0, tag, len(value)) + value for tag, value in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _pending_response(message_id: int = 1) -> bytes:
    return _command(
        (0x0100, _us(0x8021)),
        (0x0120, _us(message_id)),
        (0x0800, _us(0x0101)),
        (0x0900, _us(0xFF00)),
        (0x1020, _us(2)),
        (0x1021, _us(1)),
    )


def _p_data(control: int, fragment: bytes, context_id: int = 1) -> bytes:
    item = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


Behaviour = Callable[[socket.socket, bytes], None]


class HostilePeer(Service):
    """A PACS gone bad on a free loopback port: it takes one connection, reads the association
    request, does what `behave` says, then records what the portal sends until it closes."""

    def __init__(self, behave: Behaviour) -> None:
        self.behave = behave
        self.port = free_port()
        self.received = b""
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def peer(self) -> pacs.Peer:
        return pacs.Peer(ae_title="HOSTILE", host="127.0.0.1", port=self.port)

    def start(self) -> "HostilePeer":
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(10)
        self._thread = threading.Thread(target=self._serve, args=(self._listener,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _serve(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                self.behave(conn, _read_pdu(conn))
            except OSError:
                pass  # the portal cut us off: what it sent last is still to be read
            try:
                while chunk := conn.recv(65536):
                    self.received += chunk
            except OSError:
                pass


def _after_the_request(*pdus: bytes) -> Behaviour:
    """Accept the association, read the C-MOVE-RQ, then send `pdus`."""

    def behave(conn: socket.socket, request: bytes) -> None:
        conn.sendall(_accept(request))
        _read_c_move(conn)
        for pdu in pdus:
            conn.sendall(pdu)

    return behave


def _announce_a_huge_answer(conn: socket.socket, request: bytes) -> None:
    # An A-ASSOCIATE-AC of 4 GiB, or so says its header; nothing follows.
    conn.sendall(struct.pack(">BBI", 0x02, 0, 0xFFFFFFFF))


ATTACKS: dict[str, tuple[Behaviour, str]] = {
    "a 4 GiB answer to the association request": (
        _announce_a_huge_answer,
        "broke the DICOM protocol: a PDU of 4294967295 bytes, more than the 65536 accepted",
    ),
    "a 4 GiB P-DATA-TF PDU": (
        _after_the_request(struct.pack(">BBI", 0x04, 0, 0xFFFFFFFF)),
        "a PDU of 4294967295 bytes, more than the 4194304 accepted",
    ),
    "a command set that never ends": (
        _after_the_request(*[_p_data(0x01, b"\0" * 16000)] * 64),  # no "last" bit
        "command set too large",
    ),
    "an element longer than its command set": (
        _after_the_request(
            _p_data(0x03, _pending_response() + struct.pack("<HHI", 0, 0x1023, 1000) + b"\0\0")
        ),
        "malformed command set",
    ),
    "a presentation data value longer than its PDU": (
        _after_the_request(struct.pack(">BBII", 0x04, 0, 6, 1000) + b"\x01\x03"),
        "bad presentation data value length",
    ),
    "an answer to a request it was not sent": (
        _after_the_request(_p_data(0x03, _pending_response(message_id=99))),
        "a response to a request we did not send",
    ),
    "data on a presentation context never negotiated": (
        _after_the_request(_p_data(0x03, _pending_response(), context_id=3)),
        "data on presentation context 3",
    ),
    "a data set without its command": (
        _after_the_request(_p_data(0x02, b"\x08\x00\x52\x00\x00\x00\x00\x00")),
        "a data set arrived without a command",
    ),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_pacs_breaking_the_protocol_is_cut_off_at_once(
    attack: str,
    settings,
) -> None:
    settings.DICOM_RETRIEVE_TIMEOUT = 30.0
    behave, expected = ATTACKS[attack]
    with HostilePeer(behave) as hostile:
        started = time.monotonic()
        with pytest.raises(pacs.PacsError) as raised:
            pacs.move_study(hostile.peer, "1.2.826.0.1.3680043.8.498.4", "PORTAL")
        elapsed = time.monotonic() - started
    assert f"{hostile.peer} broke the DICOM protocol" in str(raised.value)
    assert expected in str(raised.value)
    # Not one of the timeouts: refused as soon as seen, with an A-ABORT.
    assert elapsed < 2
    assert hostile.received.endswith(ABORT)


def test_a_pacs_trickling_its_answer_is_cut_off_at_the_retrieve_timeout(
    settings,
) -> None:
    """A byte every 50 ms keeps every single read alive; the whole answer has a deadline."""
    settings.DICOM_RETRIEVE_TIMEOUT = 1.0
    answer = _p_data(0x03, _pending_response())

    def trickle(conn: socket.socket, request: bytes) -> None:
        _after_the_request()(conn, request)
        for byte in answer:  # about 6 s at this pace
            conn.sendall(bytes([byte]))
            time.sleep(0.05)

    with HostilePeer(trickle) as hostile:
        started = time.monotonic()
        with pytest.raises(pacs.PacsError) as raised:
            pacs.move_study(hostile.peer, "1.2.826.0.1.3680043.8.498.5", "PORTAL")
        elapsed = time.monotonic() - started
    assert str(raised.value) == f"{hostile.peer} sent no answer to the C-MOVE within 1 s"
    assert elapsed < 3
    assert hostile.received.endswith(ABORT)
