"""The DICOM network wire format that the storage SCP and the C-MOVE client share.

Upper-layer PDUs (PS3.8 section 9.3) and DIMSE command sets (PS3.7 section 6.3.1, always
implicit VR little endian), encoded and walked by hand: both run once per received slice or
per pending response, where pydicom's general data set machinery would cost more than the rest
of the work. The peer may be hostile: every length is checked against what holds it.
"""

import struct
from collections.abc import Iterator
from typing import Any

from pynetdicom.pdu_primitives import (
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)

from studies import dicom

# PDU types (PS3.8 9.3.1).
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
RELEASE_RQ_PDU = bytes([RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0])
RELEASE_RP_PDU = bytes([RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0])
# The largest P-DATA-TF PDU we accept, and announce: big PDUs mean fewer turns per slice.
MAX_PDU = 4 * 1024 * 1024
# A command set is a few hundred bytes; anything much larger is an attack or a bug.
MAX_COMMAND = 64 * 1024
# A presentation data value's header: item length (4), presentation context ID, control.
PDV_HEADER = 6

# Command set elements (group 0000, PS3.7 E.1).
AFFECTED_SOP_CLASS_UID, COMMAND_FIELD, MESSAGE_ID = 0x0002, 0x0100, 0x0110
MESSAGE_ID_RESPONDED_TO, MOVE_DESTINATION, PRIORITY = 0x0120, 0x0600, 0x0700
DATA_SET_TYPE, STATUS, ERROR_COMMENT = 0x0800, 0x0900, 0x0902
AFFECTED_SOP_INSTANCE_UID, MOVE_ORIGINATOR_AE_TITLE = 0x1000, 0x1030
NO_DATA_SET = 0x0101

# C-STORE failure statuses a storage SCP answers with (PS3.4 B.2.3), which pynetdicom's Status
# does not name (success is its Status.SUCCESS).
STORE_OUT_OF_RESOURCES = 0xA700
STORE_DATASET_MISMATCH = 0xA900
STORE_CANNOT_UNDERSTAND = 0xC000
# A changed instance of a shared study (studies.store.OverwriteRefused). PS3.4 B.2.3 gives
# C-STORE three failure families: A7xx "Refused: Out of Resources" tells the sender to try
# again later (it would, for ever), A9xx "Data Set does not match SOP Class" would be false;
# Cxxx "Cannot understand" is the range left to the SCP's own reasons. 0xC001, not 0xC000, so
# that a sender's log tells it from a data set we could not parse; the Error Comment says why.
STORE_OVERWRITE_REFUSED = 0xC001


class Malformed(ValueError):
    """Bytes that break the PDU or command set encoding (or our limits on them)."""


def abort_pdu(source: int = 0) -> bytes:
    """An A-ABORT (PS3.8 9.3.8): source 0 the service user, 2 the service provider."""
    return bytes([ABORT, 0, 0, 0, 0, 4, 0, 0, source, 0])


def pdvs(body: memoryview) -> Iterator[tuple[int, bool, bool, memoryview]]:
    """The presentation data values of a P-DATA-TF PDU (PS3.8 9.3.5.1): context ID, whether
    a command fragment, whether the last fragment, the fragment."""
    offset, size = 0, len(body)
    while offset < size:
        if size - offset < PDV_HEADER:
            raise Malformed("truncated presentation data value")
        (length,) = struct.unpack_from(">I", body, offset)
        if length < 2 or length > size - offset - 4:
            raise Malformed("bad presentation data value length")
        control = body[offset + 5]
        fragment = body[offset + PDV_HEADER : offset + 4 + length]
        yield body[offset + 4], bool(control & 0x01), bool(control & 0x02), fragment
        offset += 4 + length


class CommandFragments:
    """A command set arriving in fragments (PS3.8 9.3.5.1), never longer than MAX_COMMAND."""

    def __init__(self) -> None:
        self._data = bytearray()

    def add(self, fragment: memoryview, is_last: bool) -> bytes | None:
        """The whole command set once its last fragment is in, else None."""
        self._data += fragment
        if len(self._data) > MAX_COMMAND:
            raise Malformed("command set too large")
        if not is_last:
            return None
        command = bytes(self._data)
        self._data.clear()
        return command


def p_data(message: bytes, *, context_id: int, is_command: bool, max_fragment: int) -> bytes:
    """A message in P-DATA-TF PDUs of one fragment each, none longer than `max_fragment`."""
    pdus = []
    for start in range(0, len(message), max_fragment):
        fragment = message[start : start + max_fragment]
        is_last = start + max_fragment >= len(message)
        control = (0x01 if is_command else 0) | (0x02 if is_last else 0)
        item = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
        pdus.append(struct.pack(">BBI", P_DATA, 0, len(item)) + item)
    return b"".join(pdus)


def command_set(*elements: tuple[int, bytes]) -> bytes:
    """Group 0000 elements (in ascending order) after their group length."""
    body = b"".join(struct.pack("<HHI", 0x0000, tag, len(value)) + value for tag, value in elements)
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def command_elements(command: bytes) -> dict[int, bytes]:
    """The elements of a command set, element number → value. All must be well formed."""
    elements: dict[int, bytes] = {}
    offset, size = 0, len(command)
    while offset < size:
        if size - offset < 8:
            raise Malformed("truncated command set")
        group, element, length = struct.unpack_from("<HHI", command, offset)
        offset += 8
        if group != 0x0000 or length > size - offset:
            raise Malformed("malformed command set")
        elements[element] = command[offset : offset + length]
        offset += length
    return elements


def unsigned_short(elements: dict[int, bytes], element: int) -> int | None:
    value = elements.get(element)
    if value is None:
        return None
    if len(value) != 2:
        raise Malformed(f"element (0000,{element:04X}) is not a US value")
    return int.from_bytes(value, "little")


def uid(elements: dict[int, bytes], element: int) -> str:
    """A UID element's value, '' when absent; anything but a valid UID is malformed."""
    value = elements.get(element)
    if value is None:
        return ""
    try:
        text = value.rstrip(b"\x00 ").decode("ascii")
    except UnicodeDecodeError:
        raise Malformed(f"element (0000,{element:04X}) is not a UID") from None
    if not dicom.is_valid_uid(text):
        raise Malformed(f"element (0000,{element:04X}) is not a UID")
    return text


def padded(value: str, pad: bytes) -> bytes:
    """An ASCII value padded to even length (UIDs with NUL, text with a space)."""
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def user_information() -> list[Any]:  # pynetdicom's own alias for the type is private
    """What we say of ourselves in an association request or answer (PS3.7 D.3.3)."""
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = MAX_PDU
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = dicom.IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = dicom.IMPLEMENTATION_VERSION_NAME
    return [max_length, implementation, version]
