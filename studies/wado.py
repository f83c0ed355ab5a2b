"""DICOMweb client for a PACS: QIDO-RS searches (dicomweb-client) and WADO-RS retrieval.

Retrieval streams the multipart response and hands each part, a Part 10 file, to a callback
as the PACS encoded it: dicomweb-client would decode and re-encode datasets, which breaks the
byte-for-byte guarantee, so that one request is made with `requests` directly.
"""

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from django.conf import settings

logger = logging.getLogger(__name__)

# The boundary parameter of a Content-Type (RFC 2045 5.1): the name is case-insensitive, the
# value a token or a quoted string, which may hold spaces (RFC 2046 5.1.1).
_BOUNDARY = re.compile(r';\s*boundary\s*=\s*(?:"([^"]*)"|([^\s;"]+))', re.IGNORECASE)
# Ask for every instance in the transfer syntax the PACS stores it in (no transcoding).
_ACCEPT_ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_CHUNK = 1 << 20


class DicomwebError(Exception):
    """The DICOMweb server could not be reached, refused, or sent something unusable."""


def _client(base_url: str) -> DICOMwebClient:
    session = requests.Session()
    client = DICOMwebClient(
        url=base_url.rstrip("/"),
        session=session,
        timeout=(settings.DICOM_CONNECT_TIMEOUT, settings.DICOMWEB_TIMEOUT),
    )
    # dicomweb-client otherwise retries every failed request, a refused connection included,
    # for half a minute: a retrieval job has its own retries, a search should fail at once.
    client.set_http_retry_params(retry=False)
    return client


def search_studies(
    base_url: str,
    query: dict[str, str],
    limit: int = 200,
    fields: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """QIDO-RS study search; returns DICOM JSON objects (with the attributes in `fields` on
    top of those the server returns by default)."""
    try:
        return list(
            _client(base_url).search_for_studies(
                search_filters=query,
                limit=limit,
                fields=list(fields) if fields else None,
                get_remaining=False,
            )
        )
    except requests.RequestException as exc:
        raise DicomwebError(f"cannot search {base_url}: {exc}") from exc


def retrieve_study(
    base_url: str,
    study_uid: str,
    on_instance: Callable[[bytes], None],
    session: requests.Session | None = None,
) -> int:
    """WADO-RS whole-study retrieval: on_instance gets each Part 10 file; returns the count."""
    url = f"{base_url.rstrip('/')}/studies/{study_uid}"
    http = session or requests.Session()
    try:
        response = http.get(
            url,
            headers={"Accept": _ACCEPT_ANY_SYNTAX},
            stream=True,
            timeout=(settings.DICOM_CONNECT_TIMEOUT, settings.DICOMWEB_TIMEOUT),
        )
    except requests.RequestException as exc:
        raise DicomwebError(f"cannot reach {base_url}: {exc}") from exc
    with response:
        if response.status_code == 404:
            raise DicomwebError(f"{base_url} does not have study {study_uid}")
        if response.status_code == 406:
            # Some servers refuse `transfer-syntax=*`; fall back to their default.
            response.close()
            return _retrieve_default_syntax(http, url, on_instance)
        if response.status_code != 200:
            raise DicomwebError(f"{base_url} answered HTTP {response.status_code} for the study")
        return _consume(response, on_instance)


def _retrieve_default_syntax(
    http: requests.Session, url: str, on_instance: Callable[[bytes], None]
) -> int:
    try:
        response = http.get(
            url,
            headers={"Accept": 'multipart/related; type="application/dicom"'},
            stream=True,
            timeout=(settings.DICOM_CONNECT_TIMEOUT, settings.DICOMWEB_TIMEOUT),
        )
    except requests.RequestException as exc:
        raise DicomwebError(f"cannot reach {url}: {exc}") from exc
    with response:
        if response.status_code != 200:
            raise DicomwebError(f"{url} answered HTTP {response.status_code}")
        return _consume(response, on_instance)


def _consume(response: requests.Response, on_instance: Callable[[bytes], None]) -> int:
    boundary = multipart_boundary(response.headers.get("Content-Type", ""))
    count = 0
    try:
        for part in iter_multipart(response.iter_content(_CHUNK), boundary):
            on_instance(part)
            count += 1
    except (requests.RequestException, DicomwebError) as exc:
        # The server died or the network dropped mid-answer: say where and how far it got.
        raise DicomwebError(
            f"the transfer from {response.url} broke off after {count} instances: {exc}"
        ) from exc
    return count


def multipart_boundary(content_type: str) -> bytes:
    if not content_type.strip().lower().startswith("multipart/related"):
        raise DicomwebError(f"expected a multipart/related answer, got {content_type[:80]!r}")
    match = _BOUNDARY.search(content_type)
    boundary = (match.group(1) if match.group(1) is not None else match.group(2)) if match else ""
    if not boundary or not boundary.isascii():
        raise DicomwebError(f"the multipart answer has no usable boundary: {content_type[:120]!r}")
    return boundary.encode("ascii")


def iter_multipart(chunks: Iterator[bytes], boundary: bytes) -> Iterator[bytes]:
    """Split a multipart/related body (RFC 2046) into part bodies, without headers.

    Works on a stream so that a study is never held in memory whole: only one part at a time.
    """
    delimiter = b"\r\n--" + boundary
    # The first delimiter may come without the leading CRLF.
    buffer = bytearray(b"\r\n")
    state = "preamble"
    scan_from = 0  # where the next delimiter search starts: parts are never rescanned
    for chunk in chunks:
        buffer += chunk
        while True:
            if state == "preamble":
                index = buffer.find(delimiter)
                if index < 0:
                    del buffer[: -len(delimiter)]
                    break
                del buffer[: index + len(delimiter)]
                state = "after-delimiter"
            if state == "after-delimiter":
                if len(buffer) < 2:
                    break
                if buffer.startswith(b"--"):
                    return
                header_end = buffer.find(b"\r\n\r\n")
                if header_end < 0:
                    if len(buffer) > 16384:
                        raise DicomwebError("a multipart part header is too long")
                    break
                del buffer[: header_end + 4]
                state, scan_from = "body", 0
            if state == "body":
                index = buffer.find(delimiter, scan_from)
                if index < 0:
                    scan_from = max(0, len(buffer) - len(delimiter))
                    break
                yield bytes(buffer[:index])
                del buffer[: index + len(delimiter)]
                state = "after-delimiter"
    raise DicomwebError("the multipart answer ended early")
