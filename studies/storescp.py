"""The storage SCP: where a PACS (C-MOVE) or a modality (push) delivers instances.

It accepts associations only from configured PACS nodes (AE title and address), writes each
instance byte for byte into the store, indexes it, and answers a failure status for anything it
cannot store. One bad sender never stops it: every handler catches its own errors.
"""

import logging
import socket
import threading
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db import close_old_connections, connection
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from studies import dicom
from studies.models import PacsNode
from studies.pacs import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
)
from studies.store import Indexer, StoreError

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognised.
_REJECT_PERMANENT, _SOURCE_SERVICE_USER, _CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03


def _addresses(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


@dataclass
class NodeDirectory:
    """Which (AE title, address) pairs may send to us; re-read from the database now and then
    so that `pacs add` takes effect without a restart."""

    refresh_seconds: float = 10.0
    _allowed: dict[str, tuple[int | None, set[str]]] = field(default_factory=dict)
    _loaded_at: float = 0.0
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

    def _reload(self) -> None:
        allowed: dict[str, tuple[int | None, set[str]]] = {}
        try:
            for node in PacsNode.objects.all():
                previous = allowed.get(node.ae_title.strip(), (node.pk, set()))
                allowed[node.ae_title.strip()] = (previous[0], previous[1] | _addresses(node.host))
        finally:
            connection.close()
        self._allowed = allowed
        self._loaded_at = time.monotonic()


class StorageServer:
    def __init__(self, *, ae_title: str, host: str, port: int) -> None:
        self.ae_title = ae_title
        self.address = (host, port)
        self.nodes = NodeDirectory()
        self._server: ThreadedAssociationServer | None = None

    def build_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        ae.acse_timeout = settings.DICOM_CONNECT_TIMEOUT
        ae.dimse_timeout = settings.DICOM_DIMSE_TIMEOUT
        ae.network_timeout = settings.DICOM_NETWORK_TIMEOUT
        ae.maximum_associations = 32
        # Accept every storage SOP class in every transfer syntax: instances are stored as
        # the PACS holds them, never transcoded.
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        return ae

    def handlers(self) -> list:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
            (evt.EVT_CONN_CLOSE, self.on_closed),
        ]

    def start(self, block: bool = False) -> ThreadedAssociationServer | None:
        ae = self.build_ae()
        logger.info("storage SCP %s listening on %s:%s", self.ae_title, *self.address)
        server = ae.start_server(self.address, block=block, evt_handlers=self.handlers())
        self._server = server
        return server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def on_requested(self, event: Event) -> None:
        calling = event.assoc.requestor.ae_title
        address = event.assoc.requestor.address
        node_id = self.nodes.node_for(calling, address)
        if node_id is None:
            logger.warning("refused association from %r at %s: not a configured node", calling, address)
            event.assoc.acse.send_reject(
                _REJECT_PERMANENT, _SOURCE_SERVICE_USER, _CALLING_AE_NOT_RECOGNISED
            )
            return
        # One indexer per association: it caches study and series rows across its instances.
        event.assoc.portal_indexer = Indexer(source=PacsNode.objects.filter(pk=node_id).first())  # type: ignore[attr-defined]

    def on_store(self, event: Event) -> int:
        indexer: Indexer | None = getattr(event.assoc, "portal_indexer", None)
        if indexer is None:  # cannot happen: rejected associations carry no C-STORE
            return STATUS_CANNOT_UNDERSTAND
        return store_event(event, indexer, event.assoc.requestor.ae_title)

    def on_closed(self, event: Event) -> None:
        # Each association runs in its own thread, with its own database connection.
        close_old_connections()
        connection.close()


def store_event(event: Event, indexer: Indexer, source_ae: str) -> int:
    """Write and index the instance a C-STORE carries; return the status to answer."""
    request = event.request
    try:
        indexer.add_dataset(
            event.encoded_dataset(include_meta=False),
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            source_ae=source_ae,
        )
    except dicom.InvalidDicom as exc:
        logger.warning(
            "refused instance %s from %r: %s", request.AffectedSOPInstanceUID, source_ae, exc
        )
        return STATUS_CANNOT_UNDERSTAND if "SOP Instance UID" not in str(exc) else STATUS_DATASET_MISMATCH
    except StoreError as exc:
        logger.error("could not store instance from %r: %s", source_ae, exc)
        return STATUS_OUT_OF_RESOURCES
    except Exception:
        logger.exception("unexpected error storing an instance from %r", source_ae)
        return STATUS_OUT_OF_RESOURCES
    return STATUS_SUCCESS
