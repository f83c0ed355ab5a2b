"""A minimal DICOM client for one C-MOVE: a blocking socket, one thread, no reactor.

Why not pynetdicom, which the other requests (C-ECHO, C-FIND, C-GET) still use: while a PACS
works through a C-MOVE, its pynetdicom client polls queues with 1 ms sleeps and decodes each
pending response into pydicom data sets; on a small machine that CPU is taken from the storage
SCP receiving the very instances being moved. Here, waiting for the PACS is a blocking recv()
and each response a walk over a hundred bytes.

The exchange (PS3.8 section 9, PS3.7 section 9.3.4):

    with associate(host, port, calling_ae=..., called_ae=..., ...) as association:
        for response in association.c_move(abstract_syntax, identifier, destination, timeout):
            ...  # the last response yielded is the final one

Leaving the `with` block releases the association once the final response has arrived and
aborts it otherwise. Every failure is a MoveError subclass that says what happened on the wire;
studies.dimse.pacs turns it into a message for people. The peer may be hostile: every read has a
deadline and every length it announces is checked before anything is read or allocated.

pynetdicom still encodes the A-ASSOCIATE-RQ and decodes the A-ASSOCIATE-AC, as in the storage
SCP; the PDUs and command sets are encoded and walked by hand (studies.dimse.wire).
"""

import socket
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STATUS_PENDING, code_to_category

from studies.dimse import tls, wire
from studies.dimse.wire import (
    ABORT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    MAX_PDU,
    P_DATA,
    PDV_HEADER,
    RELEASE_RP,
    RELEASE_RQ,
)

# Source 0 (service user), reason 0 (not significant): PS3.8 9.3.8.
_ABORT_PDU = wire.abort_pdu(source=0)
_DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# An A-ASSOCIATE-AC for one presentation context is a few hundred bytes.
_MAX_ASSOCIATE_ANSWER = 64 * 1024
# The one presentation context we propose, and the syntaxes we can encode the identifier in.
_CONTEXT_ID = 1
_TRANSFER_SYNTAXES = (str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian))

_C_MOVE_RQ, _C_MOVE_RSP = 0x0021, 0x8021
_MESSAGE_ID = 1  # one request per association
# The sub-operation counters of a C-MOVE or C-GET response (PS3.7 C.4.2.1.4).
REMAINING, COMPLETED, FAILED, WARNING = 0x1020, 0x1021, 0x1022, 0x1023
COUNTERS = (REMAINING, COMPLETED, FAILED, WARNING)


class MoveError(Exception):
    """The exchange with the peer failed; the connection is closed or about to be."""


class Unreachable(MoveError):
    """No TCP connection to the peer."""


class Rejected(MoveError):
    """The peer answered the association request with an A-ASSOCIATE-RJ (PS3.8 9.3.4)."""

    def __init__(self, source: int, reason: int) -> None:
        super().__init__(f"association rejected (source {source}, reason {reason})")
        self.source = source
        self.reason = reason


class NotSupported(MoveError):
    """The peer accepted the association but not the presentation context we need."""


class Closed(MoveError):
    """The peer closed the connection or aborted the association."""


class TimedOut(MoveError):
    """The peer did not send (or take) what it should have in time."""


class MoveProtocolError(MoveError):
    """The peer broke the protocol or exceeded our limits: the association is aborted."""


@dataclass(frozen=True)
class Response:
    """What a C-MOVE-RSP (or C-GET-RSP) says: its status, the sub-operation counters it
    carries (element of group 0000 → value) and its Error Comment."""

    status: int
    counters: dict[int, int] = field(default_factory=dict)
    error_comment: str = ""

    @property
    def pending(self) -> bool:
        return code_to_category(self.status) == STATUS_PENDING


class MoveAssociation:
    """An established association with one accepted presentation context."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        # For the association request, every send, and the release.
        self._timeout = timeout
        self._transfer_syntax = ""
        self._max_fragment = MAX_PDU - PDV_HEADER
        # A request whose final response has not arrived: the association cannot be released.
        self._outstanding = False

    # -- life cycle ----------------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, Closed):
            self.close()
        elif self._outstanding or isinstance(exc, MoveError):
            # Left before the final response (an error, or the caller stopped listening): a
            # release would wait for a peer still busy with the request.
            self.abort()
        else:
            self.release()

    def release(self) -> None:
        """A-RELEASE-RQ, then a bounded wait for the A-RELEASE-RP. Never raises: whatever the
        association was for is done, and an impolite peer changes nothing about it."""
        try:
            self._send(wire.RELEASE_RQ_PDU)
            deadline = time.monotonic() + self._timeout
            while self._read_pdu(deadline)[0] != RELEASE_RP:
                pass  # nothing else is expected any more: ignore it
        except MoveError:
            self.abort()
        finally:
            self.close()

    def abort(self) -> None:
        try:
            self._sock.settimeout(self._timeout)
            self._sock.sendall(_ABORT_PDU)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    # -- the association request ---------------------------------------------------------------
    def _negotiate(self, request: bytes, abstract_syntax: str) -> None:
        self._send(request)
        pdu_type, body = self._read_pdu(
            time.monotonic() + self._timeout, limit=_MAX_ASSOCIATE_ANSWER
        )
        if pdu_type == ASSOCIATE_RJ:
            if len(body) < 4:
                raise MoveProtocolError("truncated A-ASSOCIATE-RJ")
            raise Rejected(source=body[2], reason=body[3])
        if pdu_type != ASSOCIATE_AC:
            raise MoveProtocolError(f"expected an A-ASSOCIATE-AC, got PDU type 0x{pdu_type:02X}")
        answer = A_ASSOCIATE_AC()
        try:
            answer.decode(bytes([pdu_type, 0]) + struct.pack(">I", len(body)) + body)
            accepted = answer.to_primitive()
        except Exception as exc:  # whatever a malformed PDU makes pynetdicom raise
            raise MoveProtocolError(f"undecodable A-ASSOCIATE-AC: {exc}") from exc
        for context in accepted.presentation_context_definition_results_list:
            syntaxes = [str(uid) for uid in context.transfer_syntax]
            if (
                context.context_id == _CONTEXT_ID
                and context.result == 0
                and syntaxes
                and syntaxes[0] in _TRANSFER_SYNTAXES
            ):
                self._transfer_syntax = syntaxes[0]
                break
        else:
            raise NotSupported(f"the peer did not accept {abstract_syntax}")
        # 0 (or nothing) means no limit; a limit too small for one byte per PDU is nonsense.
        peer_max = accepted.maximum_length_received or MAX_PDU
        if peer_max <= PDV_HEADER:
            raise MoveProtocolError(f"maximum PDU length {peer_max} is too small")
        self._max_fragment = min(peer_max, MAX_PDU) - PDV_HEADER

    # -- C-MOVE --------------------------------------------------------------------------------
    def c_move(
        self, abstract_syntax: str, identifier: Dataset, destination: str, timeout: float
    ) -> Iterator[Response]:
        """Send a C-MOVE-RQ and yield its responses, the final one last. Each response must
        arrive whole within `timeout` of the previous one (or of the request)."""
        command = wire.command_set(
            (wire.AFFECTED_SOP_CLASS_UID, wire.padded(abstract_syntax, b"\x00")),
            (wire.COMMAND_FIELD, struct.pack("<H", _C_MOVE_RQ)),
            (wire.MESSAGE_ID, struct.pack("<H", _MESSAGE_ID)),
            (wire.MOVE_DESTINATION, wire.padded(destination, b" ")),
            (wire.PRIORITY, struct.pack("<H", 0)),  # medium
            (wire.DATA_SET_TYPE, struct.pack("<H", 0x0001)),  # anything but 0x0101: one follows
        )
        self._send(self._p_data(command, is_command=True) + self._p_data(self._encode(identifier)))
        self._outstanding = True
        for response in self._responses(timeout):
            if not response.pending:
                self._outstanding = False
            yield response
            if not response.pending:
                return

    def _responses(self, timeout: float) -> Iterator[Response]:
        """Responses as their command fragments complete; any data set that follows one (a
        Failed SOP Instance UID List) is read and dropped before the response is yielded."""
        fragments = wire.CommandFragments()
        response: Response | None = None  # received, its data set still arriving
        deadline = time.monotonic() + timeout
        try:
            while True:
                pdu_type, body = self._read_pdu(deadline)
                if pdu_type == RELEASE_RQ:
                    raise Closed("the peer released the association before its final response")
                if pdu_type != P_DATA:
                    raise MoveProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
                for context_id, is_command, is_last, fragment in wire.pdvs(body):
                    if context_id != _CONTEXT_ID:
                        raise MoveProtocolError(f"data on presentation context {context_id}")
                    if is_command:
                        if response is not None:
                            raise MoveProtocolError(
                                "a command arrived before the previous data set"
                            )
                        command = fragments.add(fragment, is_last)
                        if command is None:
                            continue
                        response, has_data_set = _decode_response(command)
                        if has_data_set:
                            continue
                    elif response is None:
                        raise MoveProtocolError("a data set arrived without a command")
                    elif not is_last:
                        continue
                    yield response
                    response = None
                    deadline = time.monotonic() + timeout
        except wire.Malformed as exc:
            # PDVs or command fragments that break their encoding (or our limits on them).
            raise MoveProtocolError(str(exc)) from exc

    def _encode(self, identifier: Dataset) -> bytes:
        buffer = DicomBytesIO()
        buffer.is_little_endian = True
        buffer.is_implicit_VR = self._transfer_syntax == ImplicitVRLittleEndian
        write_dataset(buffer, identifier)
        return buffer.getvalue()

    def _p_data(self, message: bytes, is_command: bool = False) -> bytes:
        """A message in P-DATA-TF PDUs within the peer's maximum length."""
        return wire.p_data(
            message,
            context_id=_CONTEXT_ID,
            is_command=is_command,
            max_fragment=self._max_fragment,
        )

    # -- the wire ------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        self._sock.settimeout(self._timeout)
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise TimedOut("the peer did not take what we sent") from None
        except OSError as exc:
            raise Closed(str(exc)) from exc

    def _read_pdu(self, deadline: float, limit: int = MAX_PDU) -> tuple[int, memoryview]:
        header = self._read_exact(6, deadline)
        pdu_type, length = header[0], struct.unpack_from(">I", header, 2)[0]
        if pdu_type == ABORT:
            raise Closed("the peer aborted the association")
        # Checked before reading: a peer announcing 4 GiB must not make us try to hold it.
        if length > limit:
            raise MoveProtocolError(f"a PDU of {length} bytes, more than the {limit} accepted")
        return pdu_type, self._read_exact(length, deadline)

    def _read_exact(self, size: int, deadline: float) -> memoryview:
        """`size` bytes by `deadline`: a deadline for the whole, not a timeout per recv(), so
        that a peer trickling a byte at a time cannot hold us for ever."""
        buffer = bytearray(size)
        view = memoryview(buffer)
        received = 0
        while received < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimedOut("the peer said nothing in time")
            self._sock.settimeout(remaining)
            try:
                count = self._sock.recv_into(view[received:])
            except TimeoutError:
                raise TimedOut("the peer said nothing in time") from None
            except OSError as exc:
                raise Closed(str(exc)) from exc
            if not count:
                raise Closed("the peer closed the connection")
            received += count
        return view


def associate(
    host: str,
    port: int,
    *,
    calling_ae: str,
    called_ae: str,
    abstract_syntax: str,
    timeout: float,
) -> MoveAssociation:
    """Connect and negotiate one presentation context for `abstract_syntax`, proposing implicit
    and explicit VR little endian; `timeout` bounds the connection and the peer's answer."""
    request = _associate_rq(calling_ae, called_ae, abstract_syntax)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise Unreachable(str(exc)) from exc
    # Small PDUs both ways (the request, the responses): send them at once.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    context = tls.client_context()
    if context is not None:
        try:
            sock = context.wrap_socket(sock, server_hostname=host)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise Unreachable(f"TLS handshake failed: {exc}") from exc
    association = MoveAssociation(sock, timeout)
    try:
        association._negotiate(request, abstract_syntax)
    except (Closed, Rejected):
        association.close()  # the peer is gone or going: nothing to abort
        raise
    except BaseException:
        association.abort()
        raise
    return association


def _associate_rq(calling_ae: str, called_ae: str, abstract_syntax: str) -> bytes:
    context = PresentationContext()
    context.context_id = _CONTEXT_ID
    context.abstract_syntax = abstract_syntax
    context.transfer_syntax = list(_TRANSFER_SYNTAXES)
    primitive = A_ASSOCIATE()
    primitive.application_context_name = _DICOM_APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    primitive.presentation_context_definition_list = [context]
    primitive.user_information = wire.user_information()
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _decode_response(command: bytes) -> tuple[Response, bool]:
    """A C-MOVE-RSP command set, and whether a data set follows it. Only the elements we need
    are looked at, but all must be well formed."""
    try:
        elements = wire.command_elements(command)
        command_field = wire.unsigned_short(elements, wire.COMMAND_FIELD)
        responded_to = wire.unsigned_short(elements, wire.MESSAGE_ID_RESPONDED_TO)
        status = wire.unsigned_short(elements, wire.STATUS)
        counters = {e: v for e in COUNTERS if (v := wire.unsigned_short(elements, e)) is not None}
        data_set_type = wire.unsigned_short(elements, wire.DATA_SET_TYPE)
    except wire.Malformed as exc:
        raise MoveProtocolError(str(exc)) from exc
    if command_field != _C_MOVE_RSP:
        raise MoveProtocolError("the answer is not a C-MOVE-RSP")
    if responded_to != _MESSAGE_ID:
        raise MoveProtocolError("a response to a request we did not send")
    if status is None:
        raise MoveProtocolError("a response without a status")
    comment = elements.get(wire.ERROR_COMMENT, b"").decode("ascii", "replace").strip(" \x00")
    has_data_set = data_set_type not in (None, wire.NO_DATA_SET)
    return Response(status, counters, comment), has_data_set
