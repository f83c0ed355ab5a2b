"""The portal's storage SCP under attack: strangers, impostors and malformed data.

dcmtk's storescu and echoscu play the senders. storescu parses every file before sending it
and refuses to send one that does not parse, so the truncated and garbage data sets are sent
by pynetdicom in its "send the file's bytes as they are" mode, and a sender that vanishes
mid-instance by hand-made PDUs.
"""

import hashlib
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from studies import dicom, services
from studies.demo import synthetic
from studies.dimse.storescp import StorageServer
from studies.models import Instance, PacsNode, Study
from studies.store import store_dir
from tests.conftest import MODALITY_AE, assert_store_consistent, scp_port, wait_until
from tests.support import dcmtk

pytestmark = [pytest.mark.dicom, pytest.mark.django_db(transaction=True)]


def dataset_sha256(part10: bytes) -> str:
    return hashlib.sha256(part10[dicom.dataset_offset(part10) :]).hexdigest()


def make_files(folder: Path, **kwargs: object) -> dict[str, Path]:
    """A small synthetic study written as files; SOP Instance UID → path."""
    options: dict[str, object] = {
        "patient_name": "Bénédicte^Noël",
        "patient_id": "PUSH-1",
        "charset": "ISO_IR 100",
        "modalities": (("CT", 2), ("MR", 2)),
        "compress_series": 1,
    }
    options.update(kwargs)
    datasets = synthetic.make_study(**options)
    paths = synthetic.write_study(datasets, folder)
    return {str(ds.SOPInstanceUID): path for ds, path in zip(datasets, paths, strict=True)}


def store_files() -> list[Path]:
    root = store_dir()
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def part_files() -> list[Path]:
    return [p for p in store_files() if p.suffix == ".part"]


def assert_nothing_stored() -> None:
    assert Instance.objects.count() == 0
    assert Study.objects.count() == 0
    assert store_files() == []


@contextmanager
def association(
    server: StorageServer,
    *,
    calling: str = MODALITY_AE,
    called: str | None = None,
    bind: str = "127.0.0.1",
) -> Iterator[Association]:
    """A pynetdicom association to the storage SCP, from `bind`."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, JPEGLSLossless])
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1",
        scp_port(server),
        ae_title=called or server.ae_title,
        bind_address=(bind, 0),
    )
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def send_file_as_is(assoc: Association, path: Path) -> int:
    """C-STORE a file's data set bytes exactly as they are on disk (no parsing)."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    assert "Status" in status, "the SCP did not answer the C-STORE"
    return int(status.Status)


def push_valid_study(server: StorageServer, folder: Path) -> dict[str, Path]:
    """Send a valid study with storescu and check that the SCP took all of it."""
    files = make_files(folder)
    # One run per series: offered JPEG-LS and an uncompressed syntax in one association,
    # storescu sends uncompressed files in implicit VR, re-encoding them.
    for series, extra in (("001", []), ("002", ["-xt"])):
        result = dcmtk.storescu(
            "127.0.0.1", scp_port(server), [folder / series], aet=MODALITY_AE,
            aec=server.ae_title, extra=["+sd", "-R", *extra],
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
    stored = set(
        Instance.objects.filter(sop_instance_uid__in=files).values_list(
            "sop_instance_uid", flat=True
        )
    )
    assert stored == set(files)
    return files


def test_it_stores_what_a_configured_modality_pushes(
    storage_scp: StorageServer, modality_node: PacsNode, tmp_path: Path
) -> None:
    files = push_valid_study(storage_scp, tmp_path / "push")

    study = Study.objects.get()
    assert study.patient_name == "Bénédicte^Noël"
    assert study.source_id == modality_node.pk
    for instance in Instance.objects.all():
        original = files[instance.sop_instance_uid].read_bytes()
        stored = (store_dir() / instance.file_path).read_bytes()
        # storescu re-encodes what it parsed; for these files that is the same bytes.
        assert instance.sha256 == dataset_sha256(stored) == dataset_sha256(original)
    syntaxes = set(Instance.objects.values_list("transfer_syntax_uid", flat=True))
    assert syntaxes == {ExplicitVRLittleEndian, JPEGLSLossless}
    assert_store_consistent()


def test_a_push_makes_a_retrieved_copy_part_of_the_archive(
    storage_scp: StorageServer, modality_node: PacsNode, tmp_path: Path
) -> None:
    """Instances that no retrieval of ours asked for (no Move Originator, or another one):
    the study is no longer a mere copy that `purge` may delete."""
    push_valid_study(storage_scp, tmp_path / "push")
    Study.objects.update(retrieved_copy=True)  # as if a retrieval had brought it first

    result = dcmtk.storescu(
        "127.0.0.1", scp_port(storage_scp), [tmp_path / "push" / "001"], aet=MODALITY_AE,
        aec=storage_scp.ae_title, extra=["+sd"],
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    wait_until(lambda: not Study.objects.get().retrieved_copy)


def test_it_answers_an_echo_from_a_configured_node(
    storage_scp: StorageServer, modality_node: PacsNode
) -> None:
    result = dcmtk.echoscu(
        "127.0.0.1", scp_port(storage_scp), aet=MODALITY_AE, aec=storage_scp.ae_title
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_it_rejects_a_calling_ae_that_is_not_configured(
    storage_scp: StorageServer, modality_node: PacsNode, tmp_path: Path
) -> None:
    make_files(tmp_path / "push")
    port = scp_port(storage_scp)

    echo = dcmtk.echoscu("127.0.0.1", port, aet="INTRUDER", aec=storage_scp.ae_title)
    assert echo.returncode != 0
    assert "Association Rejected" in echo.stdout + echo.stderr

    store = dcmtk.storescu(
        "127.0.0.1", port, [tmp_path / "push"], aet="INTRUDER", aec=storage_scp.ae_title,
        extra=["+sd", "+r", "-R", "-xt"],
    )  # fmt: skip
    assert store.returncode != 0
    assert "Association Rejected" in store.stdout + store.stderr
    assert_nothing_stored()


def test_it_rejects_an_association_addressed_to_another_ae_title(
    storage_scp: StorageServer, modality_node: PacsNode
) -> None:
    result = dcmtk.echoscu("127.0.0.1", scp_port(storage_scp), aet=MODALITY_AE, aec="SOMEONE")
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr


def test_it_rejects_a_known_ae_title_from_another_address(
    storage_scp: StorageServer, modality_node: PacsNode, tmp_path: Path
) -> None:
    path = next(iter(make_files(tmp_path / "push").values()))
    # The whole of 127.0.0.0/8 is loopback: 127.0.0.2 is "another machine" that knows the
    # modality's AE title.
    with association(storage_scp, bind="127.0.0.2") as impostor:
        # No node lives at that address: the connection is dropped before any negotiation.
        assert not impostor.is_established
    assert_nothing_stored()
    with association(storage_scp, bind="127.0.0.1") as genuine:
        assert genuine.is_established
        assert send_file_as_is(genuine, path) == 0x0000
    assert Instance.objects.count() == 1


def test_it_stops_accepting_a_node_once_it_is_removed(
    storage_scp: StorageServer, modality_node: PacsNode
) -> None:
    port = scp_port(storage_scp)
    assert (
        dcmtk.echoscu("127.0.0.1", port, aet=MODALITY_AE, aec=storage_scp.ae_title).returncode == 0
    )
    # Another node still lives at this address: the SCP reads the request, then refuses it
    # (a connection from an address without any node is dropped unread).
    services.pacs_node_create(name="neighbour", ae_title="NEIGHBOUR", host="127.0.0.1", port=104)
    modality_node.delete()
    storage_scp.nodes.load()
    result = dcmtk.echoscu("127.0.0.1", port, aet=MODALITY_AE, aec=storage_scp.ae_title)
    assert result.returncode != 0
    # Refused at association time, and told why: not a connection that merely broke.
    output = result.stdout + result.stderr
    assert "Association Rejected" in output, output
    assert "Calling AE Title Not Recognized" in output, output


def _edit(ds: Dataset, what: str) -> None:
    if what == "no study uid":
        del ds.StudyInstanceUID
    elif what == "path traversal in the study uid":
        ds.StudyInstanceUID = "1.2.3/../../../../tmp/evil"
    elif what == "letters in the series uid":
        ds.SeriesInstanceUID = "1.2.abc.4"
    elif what == "overlong sop instance uid":
        ds.SOPInstanceUID = "1." + "2" * 70
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.filterwarnings("ignore:The value length")
@pytest.mark.parametrize(
    "what",
    [
        "no study uid",
        "path traversal in the study uid",
        "letters in the series uid",
        "overlong sop instance uid",
    ],
)
def test_it_refuses_a_data_set_it_cannot_index_and_goes_on(
    what: str, storage_scp: StorageServer, modality_node: PacsNode, tmp_path: Path
) -> None:
    ds = synthetic.make_study(patient_name="Bad^Data", patient_id="BAD", modalities=(("CT", 1),))[0]
    _edit(ds, what)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(synthetic.to_bytes(ds))

    result = dcmtk.storescu(
        "127.0.0.1", scp_port(storage_scp), [bad], aet=MODALITY_AE, aec=storage_scp.ae_title,
        extra=["-v"],
    )  # fmt: skip
    output = result.stdout + result.stderr
    # storescu reports the SCP's failure status (0xC000: cannot understand).
    assert "Received Store Response (Error: CannotUnderstand)" in output, output
    assert_nothing_stored()
    assert not (Path("/tmp") / "evil").exists()

    push_valid_study(storage_scp, tmp_path / "push")
    assert_store_consistent()


def _part10_with(data_set: bytes, *, sop_uid: str) -> bytes:
    meta = dicom.encode_file_meta(
        sop_class_uid=CTImageStorage,
        sop_instance_uid=sop_uid,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    return meta + data_set


def _hostile_files(tmp_path: Path) -> dict[str, Path]:
    ds = synthetic.make_study(patient_name="Hostile^Data", patient_id="H", modalities=(("CT", 1),))[
        0
    ]
    valid = synthetic.to_bytes(ds)
    sop_uid = str(ds.SOPInstanceUID)
    data_set = valid[dicom.dataset_offset(valid) :]
    other = synthetic.make_study(patient_name="Other^One", patient_id="O", modalities=(("CT", 1),))[
        0
    ]
    other_bytes = synthetic.to_bytes(other)
    cases = {
        # The pixel data claims more bytes than follow.
        "truncated pixel data": _part10_with(data_set[:-3000], sop_uid=sop_uid),
        # Cut inside the header, in the middle of an element.
        "truncated header": _part10_with(data_set[:301], sop_uid=sop_uid),
        "garbage": _part10_with(hashlib.sha512(b"x").digest() * 64, sop_uid=sop_uid),
        "empty data set": _part10_with(b"", sop_uid=sop_uid),
        # Announced as one instance, carries another.
        "another instance than announced": _part10_with(
            other_bytes[dicom.dataset_offset(other_bytes) :], sop_uid=sop_uid
        ),
    }
    paths = {}
    for name, content in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.dcm"
        path.write_bytes(content)
        paths[name] = path
    return paths


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
def test_it_refuses_truncated_and_garbage_data_sets_and_goes_on(
    storage_scp: StorageServer, modality_node: PacsNode, tmp_path: Path
) -> None:
    hostile = _hostile_files(tmp_path)
    statuses = {}
    with association(storage_scp) as assoc:
        assert assoc.is_established
        for name, path in hostile.items():
            statuses[name] = send_file_as_is(assoc, path)
    assert all(status != 0x0000 for status in statuses.values()), statuses
    assert statuses["another instance than announced"] == 0xA900
    assert_nothing_stored()

    push_valid_study(storage_scp, tmp_path / "push")
    assert_store_consistent()


def _command_set(sop_uid: str) -> bytes:
    """A C-STORE-RQ command set, implicit VR little endian with its group length."""
    command = Dataset()
    command.AffectedSOPClassUID = CTImageStorage
    command.CommandField = 0x0001
    command.MessageID = 7
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = sop_uid
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, command)
    body = buffer.getvalue()
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    item = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


@pytest.mark.parametrize("ending", ["connection closed", "association aborted"])
def test_it_keeps_nothing_of_an_instance_cut_short(
    ending: str, storage_scp: StorageServer, modality_node: PacsNode, tmp_path: Path
) -> None:
    ds = synthetic.make_study(patient_name="Cut^Short", patient_id="C", modalities=(("CT", 1),))[0]
    part10 = synthetic.to_bytes(ds)
    data_set = part10[dicom.dataset_offset(part10) :]
    with association(storage_scp) as assoc:
        assert assoc.is_established
        context = next(
            c
            for c in assoc.accepted_contexts
            if c.abstract_syntax == CTImageStorage
            and c.transfer_syntax[0] == ExplicitVRLittleEndian
        )
        sock = assoc.dul.socket
        assert sock is not None
        assert context.context_id is not None
        # The command, then the first half of the data set, not marked as the last fragment.
        sock.send(_p_data(context.context_id, 0x03, _command_set(str(ds.SOPInstanceUID))))
        sock.send(_p_data(context.context_id, 0x00, data_set[: len(data_set) // 2]))
        # The SCP writes fragments to a temporary file as they come.
        wait_until(lambda: bool(part_files()))
        if ending == "association aborted":
            assoc.abort()
        else:
            sock.close()
            assoc.kill()
    # The SCP notices at once (abort, or the end of the stream) and drops the fragment.
    wait_until(lambda: not part_files())
    assert_nothing_stored()
    push_valid_study(storage_scp, tmp_path / "push")
    assert_store_consistent()


# --- Negotiation, limits and protocol abuse ---------------------------------------------------


def test_it_accepts_the_transfer_syntax_the_sender_prefers(
    storage_scp: StorageServer, modality_node: PacsNode, tmp_path: Path
) -> None:
    """The sender lists the syntax it holds an image in first: choosing another would make it
    transcode (decompress) what it sends, and the copy would no longer be the original."""
    ae = AE(ae_title=MODALITY_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(
        CTImageStorage, [JPEGLSLossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    )
    assoc = ae.associate("127.0.0.1", scp_port(storage_scp), ae_title=storage_scp.ae_title)
    try:
        assert assoc.is_established
        assert [str(c.transfer_syntax[0]) for c in assoc.accepted_contexts] == [JPEGLSLossless]
    finally:
        assoc.release()


def _raw_connection(server: StorageServer, bind: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", scp_port(server)), timeout=10, source_address=(bind, 0)
    )
    return sock


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while data := sock.recv(4096):
            if data[:1] in (b"\x03", b"\x07"):  # a rejection or an abort, then the close
                continue
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture
def small_scp() -> Iterator[StorageServer]:
    """A storage SCP of its own, with room for two associations, one per address."""
    server = StorageServer(
        ae_title="SMALLSCP", host="127.0.0.1", port=0, max_associations=2, max_per_address=1
    )
    server.start()
    yield server
    server.stop(grace=2)


def test_strangers_hold_no_slot(small_scp: StorageServer, modality_node: PacsNode) -> None:
    """Connections from addresses where no node lives are closed at once, before they take
    one of the few association slots: filling them would stop every PACS transfer."""
    strangers = [_raw_connection(small_scp, bind="127.0.0.2") for _ in range(6)]
    try:
        assert all(_closed_by_peer(s, within=5) for s in strangers)
        with association(small_scp) as genuine:
            assert genuine.is_established
    finally:
        for sock in strangers:
            sock.close()


def test_a_peer_trickling_its_request_is_cut_off(
    small_scp: StorageServer,
    modality_node: PacsNode,
    settings,  # type: ignore[no-untyped-def]
) -> None:
    """A byte now and then keeps every single read alive; the whole request has a deadline."""
    settings.DICOM_CONNECT_TIMEOUT = 1.0
    sock = _raw_connection(small_scp)
    try:
        started = time.monotonic()
        cut = False
        for byte in b"\x01\x00\x00\x00\x00\xff" + b"\x00" * 20:
            try:
                sock.send(bytes([byte]))
            except OSError:
                cut = True
                break
            if _closed_by_peer(sock, within=0.3):
                cut = True
                break
        assert cut
        assert time.monotonic() - started < 5
    finally:
        sock.close()


def test_it_turns_away_an_address_over_its_limit(
    small_scp: StorageServer, modality_node: PacsNode
) -> None:
    """One address may not take every slot; the one turned away is told to come back later
    (a transient rejection), not that it is unknown."""
    with association(small_scp) as first:
        assert first.is_established
        with association(small_scp) as second:
            assert second.is_rejected
            answer = second.acceptor.primitive
            assert answer is not None
            assert answer.result == 0x02  # rejected-transient
    with association(small_scp) as later:
        assert later.is_established


def _store_response_status(assoc: Association) -> int:
    """The status of the next response, read before pynetdicom's reactor (paused by the
    caller) can take it for itself."""
    _context_id, message = assoc.dimse.get_msg(block=True)
    assert message is not None, "the SCP did not answer"
    return int(message.Status or 0)


def test_a_c_store_without_a_data_set_fails(
    storage_scp: StorageServer, modality_node: PacsNode
) -> None:
    command = _command_set("1.2.826.0.1.3680043.8.498.77")
    # CommandDataSetType 0x0101: "no data set follows".
    command = command.replace(struct.pack("<HHIH", 0, 0x0800, 2, 0x0000),
                              struct.pack("<HHIH", 0, 0x0800, 2, 0x0101))  # fmt: skip
    with association(storage_scp) as assoc:
        context = assoc.accepted_contexts[0]
        assert context.context_id is not None
        # pynetdicom's reactor would take the answer off the queue; hold it meanwhile.
        assoc._reactor_checkpoint.clear()
        wait_until(lambda: assoc._is_paused)
        try:
            assoc.dul.socket.send(_p_data(context.context_id, 0x03, command))  # type: ignore[union-attr]
            assert _store_response_status(assoc) == 0xC000
        finally:
            assoc._reactor_checkpoint.set()
    assert_nothing_stored()


def test_a_data_set_on_another_context_aborts_the_association(
    storage_scp: StorageServer, modality_node: PacsNode
) -> None:
    ds = synthetic.make_study(
        patient_name="Wrong^Context", patient_id="W", modalities=(("CT", 1),)
    )[0]
    part10 = synthetic.to_bytes(ds)
    with association(storage_scp) as assoc:
        ct, verification = (
            next(c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage),
            next(c for c in assoc.accepted_contexts if c.abstract_syntax == Verification),
        )
        assert ct.context_id is not None and verification.context_id is not None
        sock = assoc.dul.socket
        assert sock is not None
        sock.send(_p_data(ct.context_id, 0x03, _command_set(str(ds.SOPInstanceUID))))
        sock.send(_p_data(verification.context_id, 0x02, part10[dicom.dataset_offset(part10) :]))
        wait_until(lambda: assoc.is_aborted)
    assert_nothing_stored()


def _with_uid(command: bytes, uid: bytes) -> bytes:
    """The command set with another Affected SOP Instance UID value (same length or not)."""
    at = command.index(struct.pack("<HH", 0x0000, 0x1000))
    group_length = struct.unpack_from("<I", command, 8)[0] - (len(command) - at) + 8 + len(uid)
    body = command[12:at] + struct.pack("<HHI", 0x0000, 0x1000, len(uid)) + uid
    return struct.pack("<HHII", 0x0000, 0x0000, 4, group_length) + body


@pytest.mark.parametrize(
    "attack",
    [
        "a path for an instance UID",
        "an element longer than its command set",
        "a command set that never ends",
    ],
)
def test_a_hostile_command_set_aborts_the_association_and_it_goes_on(
    storage_scp: StorageServer, modality_node: PacsNode, tmp_path: Path, attack: str
) -> None:
    command = _command_set("1.2.826.0.1.3680043.8.498.78")
    if attack == "a path for an instance UID":
        command = _with_uid(command, b"../../../../tmp/evil\x00")
    elif attack == "an element longer than its command set":
        command = command[:-4] + struct.pack("<I", 0x7FFFFFFF)
    with association(storage_scp) as assoc:
        context = assoc.accepted_contexts[0]
        assert context.context_id is not None
        sock = assoc.dul.socket
        assert sock is not None
        if attack == "a command set that never ends":
            for _ in range(20):  # 20 fragments of 4 KB, none of them the last
                sock.send(_p_data(context.context_id, 0x01, b"\x00" * 4096))
        else:
            sock.send(_p_data(context.context_id, 0x03, command))
        wait_until(lambda: assoc.is_aborted)
    assert_nothing_stored()
    assert not any(Path("/tmp").glob("evil*"))
    push_valid_study(storage_scp, tmp_path / "push")
    assert_store_consistent()


def test_it_refuses_instances_below_the_free_space_floor(
    storage_scp: StorageServer,
    modality_node: PacsNode,
    tmp_path: Path,
    settings,  # type: ignore[no-untyped-def]
) -> None:
    """A full disk stops the database and the logs too: the store keeps a margin, and a
    sender learns at once that it should try later."""
    path = next(iter(make_files(tmp_path / "push").values()))
    settings.STORE_MIN_FREE_BYTES = 10**18  # more than any disk has free
    with association(storage_scp) as assoc:
        assert send_file_as_is(assoc, path) == 0xA700
    assert_nothing_stored()
    settings.STORE_MIN_FREE_BYTES = 0
    with association(storage_scp) as assoc:
        assert send_file_as_is(assoc, path) == 0x0000
    assert Instance.objects.count() == 1


def test_an_instance_cannot_be_moved_into_another_study(
    storage_scp: StorageServer, modality_node: PacsNode, tmp_path: Path
) -> None:
    """A sender that reuses a stored instance's UID in another study (by mistake or to slip
    an image into a study already shared) is refused, and the stored one stays as it was."""
    ds = synthetic.make_study(patient_name="First^Owner", patient_id="F", modalities=(("CT", 1),))[
        0
    ]
    original = tmp_path / "original.dcm"
    original.write_bytes(synthetic.to_bytes(ds))
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.123456789"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.123456790"
    ds.PatientName = "Someone^Else"
    impostor = tmp_path / "impostor.dcm"
    impostor.write_bytes(synthetic.to_bytes(ds))
    with association(storage_scp) as assoc:
        assert send_file_as_is(assoc, original) == 0x0000
        assert send_file_as_is(assoc, impostor) == 0xA900
    instance = Instance.objects.select_related("series__study").get()
    assert instance.series.study.patient_name == "First^Owner"
    assert Study.objects.count() == 1
    assert_store_consistent()


def test_an_error_comment_stays_within_its_value_representation() -> None:
    """An exception's text may hold anything; the Error Comment (LO) sent back must not."""
    from studies.dimse import storescp, wire

    request = storescp._decode_command(_command_set("1.2.826.0.1.3680043.8.498.79"), 1)
    comment = "bad value\\second\nline\x00 é " + "x" * 80
    response = storescp._encode_response(0x8001, request, 0xC000, comment, True)
    elements = wire.command_elements(response)
    text = elements[wire.ERROR_COMMENT]
    assert len(text) % 2 == 0 and len(text) <= 64
    assert all(0x20 <= byte <= 0x7E and byte != 0x5C for byte in text)
    assert text.startswith(b"bad value?second?line? ? ")
    assert wire.uid(elements, wire.AFFECTED_SOP_INSTANCE_UID) == ("1.2.826.0.1.3680043.8.498.79")
