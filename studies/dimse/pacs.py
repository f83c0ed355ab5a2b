"""DIMSE client for a PACS: C-ECHO, C-FIND and C-GET with pynetdicom, C-MOVE with our own
lean client (studies.dimse.move_scu, which says why).

Every call opens its own association and closes it; every wait is bounded by the timeouts in
settings (DICOM_DIMSE_TIMEOUT for an answer, DICOM_RETRIEVE_TIMEOUT for the answers of a C-MOVE or
C-GET, which may take as long as the study does to travel). Failures surface as PacsError with a
message a radiology secretary can act on.
"""

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

from django.conf import settings
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.status import STATUS_PENDING, Status, code_to_category

from studies.dimse import move_scu, tls
from studies.dimse.move_scu import Response
from studies.models import PacsNode

logger = logging.getLogger(__name__)

# A C-MOVE or C-GET that ended with some sub-operations failed (PS3.4 C.4.2.1.5); pynetdicom
# names no such status.
_SUB_OPERATIONS_WARNING = 0xB000
# Failed: identifier does not match SOP class (PS3.4 C.4.2.1.5); pynetdicom names no such
# status either.
_IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900


class PacsError(Exception):
    """The PACS could not be reached or refused or failed a request."""


class _RequestFailed(PacsError):
    """The PACS answered a retrieval with a failure status, which seldom says why."""


# What went wrong, told apart by type (never by the message) where a person can act on it:
# the staff workspace words each for the radiology desk.


class PacsUnreachable(PacsError):
    """No connection to the PACS: it is down, or the address or a firewall is wrong."""


class PacsSilent(PacsError):
    """The PACS stopped answering within the time allowed."""


class PortalUnknown(PacsError):
    """The PACS refuses the portal's AE title: the portal is not among its DICOM nodes."""


class DestinationUnknown(PacsError):
    """The PACS does not know where to send a C-MOVE: the portal's AE title, host and port
    are not among its DICOM nodes."""


class StudyMissing(PacsError):
    """The PACS does not have the study."""


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    @classmethod
    def of(cls, node: PacsNode) -> "Peer":
        return cls(ae_title=node.ae_title, host=node.host, port=node.port)


@dataclass
class SubOperations:
    """Counts a C-MOVE or C-GET reports as it goes; `remaining` is None until known."""

    completed: int = 0
    failed: int = 0
    warning: int = 0
    remaining: int | None = None

    @property
    def expected(self) -> int | None:
        if self.remaining is None:
            return None
        return self.completed + self.failed + self.warning + self.remaining


ProgressCallback = Callable[[SubOperations], None]
# Called with (data set bytes without file meta, SOP class UID, SOP instance UID, transfer
# syntax UID, sender's AE title); returns the C-STORE status to answer.
StoreCallback = Callable[[bytes, str, str, str, str], int]


def _application_entity() -> AE:
    ae = AE(ae_title=settings.DICOM_AE_TITLE)
    ae.acse_timeout = settings.DICOM_CONNECT_TIMEOUT
    ae.connection_timeout = settings.DICOM_CONNECT_TIMEOUT
    ae.dimse_timeout = settings.DICOM_DIMSE_TIMEOUT
    ae.network_timeout = settings.DICOM_NETWORK_TIMEOUT
    # 0 = no limit: large PDUs are what keep a C-GET of a CT fast.
    ae.maximum_pdu_size = 0
    return ae


@contextmanager
def _association(
    peer: Peer,
    ae: AE,
    ext_neg: list | None = None,
    evt_handlers: list | None = None,
) -> Iterator[Association]:
    context = tls.client_context()
    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            ae_title=peer.ae_title,
            ext_neg=ext_neg,
            evt_handlers=evt_handlers,
            tls_args=(context, peer.host) if context is not None else None,
        )
    except (OSError, ValueError) as exc:
        raise PacsUnreachable(f"cannot reach {peer}: {exc}") from exc
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        reason = _rejection_reason(
            getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None), peer
        )
        error = _rejection_error(
            getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None)
        )
        raise error(f"{peer} rejected the association: {reason}")
    if not assoc.is_established:
        raise PacsUnreachable(
            f"cannot reach {peer}: no association (connection refused or timed out)"
        )
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _rejection_reason(source: int | None, reason: int | None, peer: Peer) -> str:
    """What an operator should check, from the A-ASSOCIATE-RJ's source and reason (PS3.8
    9.3.4)."""
    by_service_user = source == 0x01
    if by_service_user and reason == 0x03:
        return f"it does not know the portal's AE title {settings.DICOM_AE_TITLE!r}"
    if by_service_user and reason == 0x07:
        return f"its AE title is not {peer.ae_title!r}"
    return "is the portal's AE title known to it, and is its own AE title right?"


def _rejection_error(source: int | None, reason: int | None) -> type[PacsError]:
    """PortalUnknown when the PACS says it does not know the calling AE title (PS3.8 9.3.4)."""
    return PortalUnknown if source == 0x01 and reason == 0x03 else PacsError


def _check_alive(assoc: Association, peer: Peer, what: str) -> None:
    if assoc.is_aborted or not assoc.is_established:
        raise PacsError(f"{peer} dropped the association during the {what}")


def _no_answer(
    peer: Peer, what: str, since: float, answered: bool, timeout: float | None = None
) -> PacsError:
    """pynetdicom gives an empty status both when the DIMSE timeout expires and when the peer
    aborts or closes the association (which is how Orthanc, for one, refuses a request from an
    AE title it does not know): the time waited tells them apart."""
    if timeout is None:
        timeout = settings.DICOM_DIMSE_TIMEOUT
    timed_out = time.monotonic() - since >= timeout * 0.95
    return _unanswered(peer, what, timed_out=timed_out, answered=answered, timeout=timeout)


def _unanswered(
    peer: Peer, what: str, *, timed_out: bool, answered: bool, timeout: float
) -> PacsError:
    """A request whose answers stopped: the peer fell silent, or closed the association after
    some answers, or before any (which is how Orthanc refuses an AE title it does not know)."""
    if timed_out:
        return PacsSilent(f"{peer} sent no answer to the {what} within {timeout:g} s")
    if answered:
        return PacsError(f"{peer} dropped the association during the {what}")
    return PortalUnknown(
        f"{peer} closed the association instead of answering the {what} "
        f"(does it know the portal's AE title {settings.DICOM_AE_TITLE!r}?)"
    )


def echo(peer: Peer, *, timeout: float | None = None) -> None:
    """A C-ECHO; `timeout` (seconds) bounds each wait instead of the settings' (a health
    check must answer a load balancer sooner than a retrieval waits for a slow PACS)."""
    ae = _application_entity()
    if timeout is not None:
        ae.acse_timeout = ae.connection_timeout = timeout
        ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    with _association(peer, ae) as assoc:
        status = assoc.send_c_echo()
        if not status or status.Status != Status.SUCCESS:
            raise PacsError(f"{peer} did not answer the C-ECHO")


# The keys a study search asks for; the PACS fills in what it knows.
STUDY_RETURN_KEYS = (
    "StudyInstanceUID",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ReferringPhysicianName",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)


def _find(peer: Peer, identifier: Dataset, limit: int) -> list[Dataset]:
    ae = _application_entity()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    with _association(peer, ae) as assoc:
        return _find_on(assoc, peer, identifier, limit)


def _find_on(assoc: Association, peer: Peer, identifier: Dataset, limit: int) -> list[Dataset]:
    """One C-FIND over an open association."""
    results: list[Dataset] = []
    since, answered = time.monotonic(), False
    for status, match in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        if status is None or "Status" not in status:
            raise _no_answer(peer, "C-FIND", since, answered)
        since, answered = time.monotonic(), True
        code = status.Status
        pending = code_to_category(code) == STATUS_PENDING
        if pending and match is not None:
            results.append(match)
            if len(results) >= limit:
                # Ask the PACS to stop rather than draining thousands of matches.
                assoc.send_c_cancel(1, None, StudyRootQueryRetrieveInformationModelFind)
                break
        elif code != Status.SUCCESS and not pending:
            if code == Status.CANCEL:  # as we asked
                break
            raise PacsError(f"{peer} refused the C-FIND (status 0x{code:04X})")
    return results


def find_studies(peer: Peer, query: dict[str, str], limit: int = 200) -> list[Dataset]:
    """Study-level C-FIND. `query` maps keywords to matching values (wildcards allowed)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.SpecificCharacterSet = "ISO_IR 192"
    for keyword in STUDY_RETURN_KEYS:
        setattr(identifier, keyword, "")
    for keyword, value in query.items():
        setattr(identifier, keyword, value)
    return _find(peer, identifier, limit)


# More matches than any study holds: a bound on what a misbehaving PACS can make us collect.
_MAX_MATCHES = 100000


def instances_in_study(peer: Peer, study_uid: str) -> dict[str, str]:
    """SOP Instance UID → SOP Class UID of every instance of a study on the PACS.

    Asks level by level, the series of the study, then the instances of each series, on one
    association: a single IMAGE-level query with a universal Series Instance UID is a relational
    query, which PACSs that support only the hierarchical model (all PS3.4 requires) refuse.
    """
    ae = _application_entity()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    instances: dict[str, str] = {}
    with _association(peer, ae) as assoc:
        series = Dataset()
        series.QueryRetrieveLevel = "SERIES"
        series.StudyInstanceUID = study_uid
        series.SeriesInstanceUID = ""
        series_uids = {
            str(m.SeriesInstanceUID)
            for m in _find_on(assoc, peer, series, _MAX_MATCHES)
            if m.get("SeriesInstanceUID")
        }
        for series_uid in sorted(series_uids):
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "IMAGE"
            identifier.StudyInstanceUID = study_uid
            identifier.SeriesInstanceUID = series_uid
            identifier.SOPInstanceUID = ""
            identifier.SOPClassUID = ""
            for match in _find_on(assoc, peer, identifier, _MAX_MATCHES):
                if match.get("SOPInstanceUID"):
                    instances[str(match.SOPInstanceUID)] = str(match.get("SOPClassUID", ""))
    return instances


# An association holds at most 128 presentation contexts.
_MAX_CONTEXTS = 128
# The transfer syntaxes PACSs store images in, most common first. The PACS accepts a single
# transfer syntax per presentation context and transcodes an instance stored in any other
# (Orthanc turns JPEG-LS into Explicit VR Little Endian, say): a C-GET therefore offers each of
# these in a context of its own, so that every instance arrives as the PACS holds it.
_STORED_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGBaseline8Bit,
    JPEG2000,
    JPEGLSNearLossless,
    JPEGLossless,
    JPEGExtended12Bit,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)


def _storage_contexts(sop_classes: set[str]) -> list[tuple[str, list[str]]]:
    """C-GET storage contexts: per SOP class, one per common stored transfer syntax, then one
    offering all the others, within the association's limit."""
    per_class = min(len(_STORED_SYNTAXES), (_MAX_CONTEXTS - 1) // len(sop_classes))
    contexts = []
    for uid in sorted(sop_classes):
        dedicated = list(_STORED_SYNTAXES[: per_class - 1])
        rest = list(_STORED_SYNTAXES[per_class - 1 :])
        rest += [str(ts) for ts in ALL_TRANSFER_SYNTAXES if ts not in dedicated + rest]
        contexts += [(uid, [syntax]) for syntax in dedicated]
        contexts.append((uid, rest))
    return contexts


def _retrieve_identifier(study_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    return identifier


def _allow_long_silences(assoc: Association) -> None:
    """A PACS answers a C-MOVE or C-GET when its sub-operations are done, and need not say
    anything before (pending responses are optional): the wait for each answer, and the
    network silence tolerated meanwhile, are the retrieve timeout rather than the DIMSE one."""
    assoc.dimse_timeout = settings.DICOM_RETRIEVE_TIMEOUT
    assoc.network_timeout = max(settings.DICOM_RETRIEVE_TIMEOUT, settings.DICOM_NETWORK_TIMEOUT)


def _follow(
    responses: Iterator[tuple[Dataset, Dataset | None]],
    assoc: Association,
    peer: Peer,
    what: str,
    progress: ProgressCallback | None,
) -> SubOperations:
    """Follow a pynetdicom C-GET to its end."""

    def statuses() -> Iterator[Response]:
        since, answered, final_seen = time.monotonic(), False, False
        for status, _identifier in responses:
            if status is None or "Status" not in status:
                raise _no_answer(peer, what, since, answered, settings.DICOM_RETRIEVE_TIMEOUT)
            since, answered = time.monotonic(), True
            response = Response(
                status=int(status.Status),
                counters={
                    element: int(status[element].value)
                    for element in move_scu.COUNTERS
                    if element in status
                },
                error_comment=str(status.get("ErrorComment", "")),
            )
            final_seen = final_seen or not response.pending
            yield response
        if not final_seen:
            _check_alive(assoc, peer, what)

    return _tally(statuses(), peer, what, progress, settings.DICOM_AE_TITLE)


def _tally(
    responses: Iterable[Response],
    peer: Peer,
    what: str,
    progress: ProgressCallback | None,
    destination: str,
) -> SubOperations:
    """The counts of a C-MOVE or C-GET from its responses, reported as they come; the final
    status turned into an error when it is not a success."""
    counts = SubOperations()
    final: Response | None = None
    for response in responses:
        counts.completed = response.counters.get(move_scu.COMPLETED, counts.completed)
        counts.failed = response.counters.get(move_scu.FAILED, counts.failed)
        counts.warning = response.counters.get(move_scu.WARNING, counts.warning)
        counts.remaining = response.counters.get(move_scu.REMAINING, counts.remaining)
        if response.pending:
            if progress:
                progress(counts)
            continue
        final = response
        counts.remaining = 0
    if final is None:
        raise PacsError(f"{peer} ended the {what} without a final status")
    if progress:
        progress(counts)
    code = final.status
    if code not in {Status.SUCCESS, _SUB_OPERATIONS_WARNING}:
        # The error comment seldom helps a person, but may help whoever reads the PACS's log.
        logger.warning("%s ended the %s with 0x%04X: %r", peer, what, code, final.error_comment)
    if code == Status.MOVE_DESTINATION_UNKNOWN:
        raise DestinationUnknown(
            f"{peer} does not know the move destination {destination!r}: "
            "add the portal to the PACS's list of DICOM nodes"
        )
    # Refused: out of resources, to count the matches or to perform the sub-operations
    # (PS3.4 C.4.2.1.5, C.4.3.1.4).
    if code in {0xA701, 0xA702}:
        raise PacsError(f"{peer} is out of resources (status 0x{code:04X})")
    if (code & 0xF000) == 0xC000:  # Failed: unable to process (Cxxx)
        raise _RequestFailed(f"{peer} could not process the {what} (status 0x{code:04X})")
    if code not in {Status.SUCCESS, _SUB_OPERATIONS_WARNING, Status.CANCEL}:
        raise _RequestFailed(f"{peer} failed the {what} (status 0x{code:04X})")
    return counts


def _lacks_study(peer: Peer, study_uid: str) -> bool:
    """Whether the PACS says it has no such study (False when it cannot say)."""
    try:
        return not _find(peer, _retrieve_identifier(study_uid), limit=1)
    except PacsError:
        return False


def move_study(
    peer: Peer, study_uid: str, destination: str, progress: ProgressCallback | None = None
) -> SubOperations:
    """Ask the PACS to send a study to `destination` (normally the portal's own storage SCP).

    When this returns, the PACS has finished its C-STORE sub-operations, each of which the
    storage SCP acknowledged once the instance was written to the store; its index rows may
    still be on their way (the caller waits for them).
    """
    try:
        return _move(peer, study_uid, destination, progress)
    except _RequestFailed as exc:
        # Many PACSs (Orthanc, for one) answer "unable to process" for a study they do not
        # have: say which it is.
        if _lacks_study(peer, study_uid):
            raise StudyMissing(f"{peer} does not have study {study_uid}") from exc
        raise


def _move_association(peer: Peer) -> move_scu.MoveAssociation:
    """An association for C-MOVE (Study Root) with the node, as the portal's AE title."""
    return move_scu.associate(
        peer.host,
        peer.port,
        calling_ae=settings.DICOM_AE_TITLE,
        called_ae=peer.ae_title,
        abstract_syntax=str(StudyRootQueryRetrieveInformationModelMove),
        timeout=settings.DICOM_CONNECT_TIMEOUT,
    )


def _move(
    peer: Peer, study_uid: str, destination: str, progress: ProgressCallback | None
) -> SubOperations:
    move_model = str(StudyRootQueryRetrieveInformationModelMove)
    try:
        association = _move_association(peer)
    except move_scu.Rejected as exc:
        reason = _rejection_reason(exc.source, exc.reason, peer)
        error = _rejection_error(exc.source, exc.reason)
        raise error(f"{peer} rejected the association: {reason}") from exc
    except move_scu.NotSupported as exc:
        raise PacsError(f"{peer} does not offer study-root C-MOVE") from exc
    except move_scu.MoveProtocolError as exc:
        raise PacsError(f"{peer} broke the DICOM protocol: {exc}") from exc
    except move_scu.MoveError as exc:
        # The same words as when pynetdicom cannot associate; the cause stays in the chain.
        raise PacsUnreachable(
            f"cannot reach {peer}: no association (connection refused or timed out)"
        ) from exc

    answered = False

    def responses() -> Iterator[Response]:
        nonlocal answered
        # A PACS answers when its sub-operations are done and need not say anything before
        # (pending responses are optional): each answer may take as long as the study does.
        timeout = settings.DICOM_RETRIEVE_TIMEOUT
        for response in association.c_move(
            move_model, _retrieve_identifier(study_uid), destination, timeout
        ):
            answered = True
            yield response

    try:
        with association:
            return _tally(responses(), peer, "C-MOVE", progress, destination)
    except (move_scu.TimedOut, move_scu.Closed) as exc:
        timed_out = isinstance(exc, move_scu.TimedOut)
        raise _unanswered(
            peer,
            "C-MOVE",
            timed_out=timed_out,
            answered=answered,
            timeout=settings.DICOM_RETRIEVE_TIMEOUT,
        ) from exc
    except move_scu.MoveProtocolError as exc:
        raise PacsError(f"{peer} broke the DICOM protocol during the C-MOVE: {exc}") from exc


def get_study(
    peer: Peer, study_uid: str, on_store: StoreCallback, progress: ProgressCallback | None = None
) -> SubOperations:
    """Retrieve a study over the same association (C-GET); each instance goes to on_store."""
    sop_classes = set(instances_in_study(peer, study_uid).values()) - {""}
    if not sop_classes:
        raise StudyMissing(f"{peer} does not have study {study_uid}")
    if len(sop_classes) > _MAX_CONTEXTS - 1:
        raise PacsError(f"study {study_uid} has too many SOP classes for one C-GET association")
    ae = _application_entity()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for uid, syntaxes in _storage_contexts(sop_classes):
        ae.add_requested_context(uid, syntaxes)
    for uid in sorted(sop_classes):
        roles.append(build_role(uid, scp_role=True))

    def handle_store(event: Event) -> int:
        return on_store(
            event.encoded_dataset(include_meta=False),
            str(event.request.AffectedSOPClassUID),
            str(getattr(event.request, "AffectedSOPInstanceUID", "")),
            str(event.context.transfer_syntax),
            event.assoc.requestor.ae_title if event.assoc.is_acceptor else peer.ae_title,
        )

    with _association(
        peer, ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, handle_store)]
    ) as assoc:
        _allow_long_silences(assoc)
        responses = assoc.send_c_get(
            _retrieve_identifier(study_uid), StudyRootQueryRetrieveInformationModelGet
        )
        return _follow(responses, assoc, peer, "C-GET", progress)


# --- the way back: does the PACS know where the portal is? ---------------------------------


class WayBackError(PacsError):
    """The check of the way back could not be made: the node was not reached, fell silent or
    broke the protocol. Says nothing about whether the node knows the portal."""


class WayBack(StrEnum):
    """What a node's answer to a C-MOVE of a made-up study says about the portal's AE title."""

    # It took the request from the portal and did not object to the destination.
    KNOWN = "known"
    # It answered 0xA801, Move destination unknown (PS3.4 C.4.2.1.5).
    DESTINATION_UNKNOWN = "destination_unknown"
    # It refused the association as coming from an unknown calling AE title (PS3.8 9.3.4), or
    # closed it without answering, which is how Orthanc refuses an AE title it does not know:
    # a node that does not take requests from the portal's AE title does not send to it either.
    PORTAL_UNKNOWN = "portal_unknown"
    # It refused the association because its own AE title is not the one configured.
    CALLED_AE_WRONG = "called_ae_wrong"
    # It does not offer study-root C-MOVE at all.
    NO_MOVE = "no_move"
    # Another refusal (out of resources, …): its status says more than a sentence can.
    REFUSED = "refused"


@dataclass(frozen=True)
class WayBackCheck:
    outcome: WayBack
    destination: str
    # The final C-MOVE status, when the node gave one.
    status: int | None = None


def check_way_back(peer: Peer, destination: str | None = None) -> WayBackCheck:
    """Ask the node to C-MOVE a study that exists nowhere (a UID made up now) to `destination`
    (the portal's AE title by default) and tell what the answer says about the way back. No
    image moves.

    The portal calls with its own AE title, which is also the destination, and PACSs tell
    apart the peers they know by AE title: one that does not know the portal refuses the
    association (PS3.8 9.3.4: calling AE title not recognized) or, like Orthanc, closes it
    unanswered. One that knows the portal answers the C-MOVE: 0xA801 (move destination
    unknown) when it looks the destination up first and does not find it; otherwise success
    with no sub-operations (dcmtk's dcmqrscp), or a failure about the study (Orthanc answers
    0xC000 for a study it lacks, before looking at the destination at all).

    The waits are the connection and DIMSE timeouts: with nothing to send, an answer that
    takes longer than a C-FIND's is no answer.
    """
    destination = destination or str(settings.DICOM_AE_TITLE)
    move_model = str(StudyRootQueryRetrieveInformationModelMove)
    try:
        association = _move_association(peer)
    except move_scu.Rejected as exc:
        by_service_user = exc.source == 0x01
        if by_service_user and exc.reason == 0x03:
            return WayBackCheck(WayBack.PORTAL_UNKNOWN, destination)
        if by_service_user and exc.reason == 0x07:
            return WayBackCheck(WayBack.CALLED_AE_WRONG, destination)
        raise WayBackError(f"{peer} rejected the association ({exc})") from exc
    except move_scu.NotSupported:
        return WayBackCheck(WayBack.NO_MOVE, destination)
    except move_scu.MoveError as exc:
        raise WayBackError(f"cannot reach {peer}: {exc}") from exc

    final: Response | None = None
    answered = False
    try:
        with association:
            for response in association.c_move(
                move_model,
                _retrieve_identifier(generate_uid()),
                destination,
                settings.DICOM_DIMSE_TIMEOUT,
            ):
                answered = True
                if not response.pending:
                    final = response
    except move_scu.Closed as exc:
        if answered:
            raise WayBackError(f"{peer} dropped the association during the C-MOVE") from exc
        return WayBackCheck(WayBack.PORTAL_UNKNOWN, destination)
    except move_scu.MoveError as exc:
        raise WayBackError(f"{peer} did not answer the C-MOVE: {exc}") from exc
    if final is None:
        raise WayBackError(f"{peer} ended the C-MOVE without a final status")
    return WayBackCheck(_way_back_outcome(final.status), destination, final.status)


def _way_back_outcome(status: int) -> WayBack:
    if status == Status.MOVE_DESTINATION_UNKNOWN:
        return WayBack.DESTINATION_UNKNOWN
    if status in {Status.SUCCESS, _SUB_OPERATIONS_WARNING, Status.CANCEL}:
        return WayBack.KNOWN
    # "Unable to process" (0xCxxx) and "identifier does not match SOP class" (0xA900) are
    # about the made-up study: the destination was accepted, or not looked at (see above).
    if (status & 0xF000) == 0xC000 or status == _IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS:
        return WayBack.KNOWN
    return WayBack.REFUSED
