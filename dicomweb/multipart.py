"""multipart/related bodies (RFC 2387, PS3.18 §8.6.1.2) streamed from the store's files."""

import io
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from studies.models import Instance
from studies.store import instance_file

# Large enough that a 512 KiB CT slice is one or two reads, small enough that memory stays flat.
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Parts:
    boundary: str
    part_type: str
    items: Iterable[tuple[dict[str, str], Iterable[bytes]]]

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{self.part_type}"; boundary={self.boundary}'

    def chunks(self) -> Iterator[bytes]:
        delimiter = f"--{self.boundary}\r\n".encode()
        for headers, body in self.items:
            head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            yield delimiter + head.encode() + b"\r\n"
            yield from body
            yield b"\r\n"
        yield f"--{self.boundary}--\r\n".encode()


def _file_chunks(instance: Instance) -> Iterator[bytes]:
    with instance_file(instance).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            yield chunk


def explicit_little_endian(instance: Instance) -> bytes:
    """The instance as a Part 10 file in Explicit VR Little Endian, the default transfer syntax
    of application/dicom (PS3.18 §8.7.3.5.2): compressed pixel data decoded, other syntaxes
    re-encoded. One instance in memory at a time."""
    ds = dcmread(instance_file(instance))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        # The same instance in another encoding: its UID stays (pydicom would draw a new one).
        ds.decompress(generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _dicom_part(
    instance: Instance, transfer_syntax: str | None
) -> tuple[dict[str, str], Iterable[bytes]]:
    if transfer_syntax is None or transfer_syntax == instance.transfer_syntax_uid:
        syntax, size, body = instance.transfer_syntax_uid, instance.size, _file_chunks(instance)
    else:
        data = explicit_little_endian(instance)
        syntax, size, body = ExplicitVRLittleEndian, len(data), iter([data])
    headers = {
        "Content-Type": f"application/dicom; transfer-syntax={syntax}",
        "Content-Length": str(size),
    }
    return headers, body


def dicom_parts(instances: list[Instance], *, transfer_syntax: str | None) -> Parts:
    """One part per instance, read from disk as the body is sent: the stored Part 10 files byte
    for byte when `transfer_syntax` is None, else in that syntax (Explicit VR Little Endian is
    the only one the portal converts to; the caller checks)."""
    return Parts(
        boundary=secrets.token_hex(16),
        part_type="application/dicom",
        items=(_dicom_part(instance, transfer_syntax) for instance in instances),
    )


def octet_parts(values: list[bytes], *, transfer_syntax: str | None = None) -> Parts:
    """Bulk data or frames, one part each (PS3.18 §8.7.3.3.2: a frame part names its syntax)."""
    content_type = "application/octet-stream"
    if transfer_syntax is not None:
        content_type += f"; transfer-syntax={transfer_syntax}"
    return Parts(
        boundary=secrets.token_hex(16),
        part_type="application/octet-stream",
        items=(
            ({"Content-Type": content_type, "Content-Length": str(len(v))}, [v]) for v in values
        ),
    )
