"""The audit trail: a hash chain of events, its verification, its export and its pruning.

Each event's digest is SHA-256 over a canonical serialisation of its fields and the digest of
the event before it, so that changing, inserting or deleting a row (as someone with write
access to the database could) breaks the chain at that row. Appending takes the chain's head
row (`AuditChain`) under lock inside the inserting transaction: writers in every process and on
every machine take their turn, and the chain never forks.

Exports (CSV, JSON lines, FHIR R4 AuditEvent) hold what an event holds: never a token, a code
or a patient's name, since events never hold them. One writer per format, used by the `audit`
command and by the staff audit log alike.
"""

import csv
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings
from django.db import models, transaction
from django.utils import timezone

from accounts.models import AuditChain, AuditEvent, Share, User

# Bumped if the serialisation ever changes; part of what is hashed.
DIGEST_VERSION = 1


# --- the chain --------------------------------------------------------------------------------


def event_digest(
    *,
    prev_digest: str,
    at: datetime,
    action: str,
    share_id: int | None,
    actor_id: int | None,
    ip_address: str | None,
    user_agent: str,
    detail: Any,
) -> str:
    """SHA-256 (hex) of one event chained to the one before it. The serialisation is JSON with
    sorted keys and no spaces, the time in UTC to the microsecond (what both databases keep)."""
    payload = {
        "v": DIGEST_VERSION,
        "prev": prev_digest,
        "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
        "action": action,
        "share": share_id,
        "actor": actor_id,
        "ip": ip_address,
        "ua": user_agent,
        "detail": detail,
    }
    data = json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(data.encode()).hexdigest()


def _chain_locked() -> AuditChain:
    """The chain's head, held until the transaction ends (a row lock on PostgreSQL; SQLite's
    transactions take the database's write lock when they begin)."""
    chain, _created = AuditChain.objects.select_for_update().get_or_create(pk=AuditChain.SINGLETON)
    return chain


def event_append(
    *,
    action: str,
    share: Share | None = None,
    actor: User | None = None,
    ip_address: str | None = None,
    user_agent: str = "",
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the chain: the only place events are created."""
    # As the database will give them back: JSON (tuples become lists), a normalised IPv6
    # address, a user agent within its column.
    detail = json.loads(json.dumps(detail or {}, allow_nan=False))
    ip_address = AuditEvent._meta.get_field("ip_address").get_prep_value(ip_address)
    user_agent = user_agent[:255]
    with transaction.atomic():
        chain = _chain_locked()
        event = AuditEvent(
            at=timezone.now(),
            action=action,
            share=share,
            actor=actor,
            ip_address=ip_address,
            user_agent=user_agent,
            detail=detail,
            prev_digest=chain.head_digest,
        )
        event.digest = event_digest(
            prev_digest=event.prev_digest,
            at=event.at,
            action=action,
            share_id=share.pk if share is not None else None,
            actor_id=actor.pk if actor is not None else None,
            ip_address=ip_address,
            user_agent=user_agent,
            detail=detail,
        )
        event.save()
        AuditChain.objects.filter(pk=chain.pk).update(
            head_digest=event.digest, events=models.F("events") + 1
        )
    return event


@dataclass(frozen=True)
class ChainReport:
    """What `audit_verify` found: intact, or the first event where the chain breaks."""

    intact: bool
    events: int
    broken_event_id: int | None = None
    broken_at: datetime | None = None
    reason: str = ""


def audit_verify() -> ChainReport:
    """Walk the chain from its first kept event. The first event whose fields do not match
    its digest (changed), or whose previous digest is not the digest of the event before it
    (an event inserted or deleted there), is the first broken link; events cut off the end
    show as a head that is not the last event's digest."""
    chain = AuditChain.objects.filter(pk=AuditChain.SINGLETON).first()
    expected_prev = chain.anchor_digest if chain is not None else ""
    rows = AuditEvent.objects.order_by("pk").values_list(
        "pk",
        "at",
        "action",
        "share_id",
        "actor_id",
        "ip_address",
        "user_agent",
        "detail",
        "prev_digest",
        "digest",
    )
    count = 0
    last: tuple[int, datetime] | None = None
    for pk, at, action, share_id, actor_id, ip, ua, detail, prev, digest in rows.iterator(
        chunk_size=2000
    ):
        if prev != expected_prev:
            return ChainReport(
                False,
                count,
                pk,
                at,
                "it does not chain to the event before it (one was inserted or deleted there)",
            )
        recomputed = event_digest(
            prev_digest=prev,
            at=at,
            action=action,
            share_id=share_id,
            actor_id=actor_id,
            ip_address=ip,
            user_agent=ua,
            detail=detail,
        )
        if recomputed != digest:
            return ChainReport(False, count, pk, at, "its content does not match its digest")
        expected_prev = digest
        count += 1
        last = (pk, at)
    head = chain.head_digest if chain is not None else ""
    if head != expected_prev:
        pk_at = last or (None, None)
        return ChainReport(False, count, pk_at[0], pk_at[1], "events after this one were deleted")
    return ChainReport(True, count)


# --- export -----------------------------------------------------------------------------------


class TextOut(Protocol):
    """Where an export is written: a text file, a response, the command's output."""

    def write(self, text: str, /) -> Any: ...


EXPORT_FORMATS = ("csv", "ndjson", "fhir", "fhir-ndjson")
CSV_COLUMNS = (
    "id",
    "at",
    "action",
    "share",
    "actor",
    "ip_address",
    "user_agent",
    "detail",
    "prev_digest",
    "digest",
)
# A spreadsheet runs a cell starting with these as a formula (CSV injection): the user agent
# and some details come from whoever sent the request.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def events_for_export(*, since: datetime | None = None) -> models.QuerySet[AuditEvent]:
    events = AuditEvent.objects.select_related("actor").order_by("pk")
    if since is not None:
        events = events.filter(at__gte=since)
    return events


def event_record(event: AuditEvent) -> dict[str, Any]:
    """One event as plain data: what every export format holds."""
    return {
        "id": event.pk,
        "at": event.at.astimezone(UTC).isoformat(timespec="microseconds"),
        "action": event.action,
        "share": event.share_id,
        "actor": event.actor.get_username() if event.actor is not None else None,
        "ip_address": event.ip_address,
        "user_agent": event.user_agent,
        "detail": event.detail,
        "prev_digest": event.prev_digest,
        "digest": event.digest,
    }


_FORMULA_AFTER_SEPARATOR = re.compile("([,;\t|])([" + re.escape("".join(_FORMULA_START)) + "])")


def csv_cell(value: Any) -> str:
    """A CSV cell a spreadsheet shows as text: a leading formula character is quoted away."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        value = json.dumps(value, sort_keys=True, ensure_ascii=False)
    text = str(value)
    if text.startswith(_FORMULA_START):
        text = "'" + text
    # A spreadsheet set to another separator (";" in French and German locales) splits the
    # cell there, and a piece that starts a formula would run: those pieces are quoted too.
    return _FORMULA_AFTER_SEPARATOR.sub(r"\1'\2", text)


class _Line:
    """What csv.writer writes to: it hands each row back as its text."""

    def write(self, text: str) -> str:
        return text


def csv_lines(events: Iterable[AuditEvent]) -> Iterator[str]:
    """The CSV export line by line, header first (for a streamed response)."""
    # Every cell quoted: a separator inside a cell never reads as the end of it.
    writer = csv.writer(_Line(), quoting=csv.QUOTE_ALL)
    yield writer.writerow(CSV_COLUMNS)
    for event in events:
        record = event_record(event)
        yield writer.writerow([csv_cell(record[column]) for column in CSV_COLUMNS])


def write_csv(events: Iterable[AuditEvent], out: TextOut) -> int:
    lines = csv_lines(events)
    out.write(next(lines))
    count = 0
    for line in lines:
        out.write(line)
        count += 1
    return count


def write_ndjson(events: Iterable[AuditEvent], out: TextOut) -> int:
    count = 0
    for event in events:
        out.write(json.dumps(event_record(event), sort_keys=True, ensure_ascii=False) + "\n")
        count += 1
    return count


# DICOM PS3.16 CID 400 (Audit Event ID), the codes FHIR's AuditEvent.type takes from DCM.
DCM = "http://dicom.nema.org/resources/ontology/DCM"
_DCM_TYPES = {
    "110100": "Application Activity",
    "110101": "Audit Log Used",
    "110103": "DICOM Instances Accessed",
    "110105": "DICOM Study Deleted",
    "110106": "Export",
    "110113": "Security Alert",
    "110114": "User Authentication",
}
_A = AuditEvent.Action
# The portal's action → (DICOM audit event type, FHIR action code: C R U D E).
_FHIR_KIND: dict[str, tuple[str, str]] = {
    _A.SHARE_CREATED: ("110113", "C"),
    _A.SHARE_REVOKED: ("110113", "U"),
    _A.SHARE_UNLOCKED: ("110113", "U"),
    _A.SHARE_EXPIRED: ("110113", "U"),
    _A.SHARE_REARMED: ("110113", "U"),
    _A.PASSKEY_ENROLLED: ("110113", "C"),
    _A.PASSKEY_DELETED: ("110113", "D"),
    _A.LOCKOUT: ("110113", "E"),
    _A.FAILURE_ALERT: ("110113", "E"),
    _A.STUDY_OVERWRITE_REFUSED: ("110113", "E"),
    _A.STORE_OVER_CAP: ("110113", "E"),
    _A.RECIPIENTS_CLOSED: ("110113", "U"),
    _A.RECIPIENTS_OPENED: ("110113", "U"),
    _A.VIEW: ("110103", "R"),
    _A.VIEWER_TOKEN: ("110103", "R"),
    _A.DOWNLOAD: ("110106", "R"),
    _A.STUDY_PURGED: ("110105", "D"),
    _A.AUDIT_EXPORTED: ("110101", "R"),
    _A.AUDIT_PRUNED: ("110101", "D"),
    # Each step of a recipient's authentication.
    **{
        action: ("110114", "E")
        for action in (
            _A.LINK_OPENED,
            _A.LINK_FAILED,
            _A.CODE_OK,
            _A.CODE_FAILED,
            _A.OTP_SENT,
            _A.OTP_SEND_FAILED,
            _A.OTP_SEND_LIMIT,
            _A.OTP_OK,
            _A.OTP_FAILED,
            _A.PASSKEY_OK,
            _A.PASSKEY_FAILED,
            _A.LOGOUT,
            _A.SESSION_EXPIRED,
        )
    },
}
_FAILURES = {
    _A.LINK_FAILED,
    _A.CODE_FAILED,
    _A.OTP_FAILED,
    _A.OTP_SEND_FAILED,
    _A.OTP_SEND_LIMIT,
    _A.PASSKEY_FAILED,
    _A.LOCKOUT,
    _A.STUDY_OVERWRITE_REFUSED,
}
# The portal's own code system for its actions (AuditEvent.subtype).
ACTION_SYSTEM = "urn:x-image-portal:audit-action"
SHARE_SYSTEM = "urn:x-image-portal:share"
STAFF_SYSTEM = "urn:x-image-portal:staff"


def fhir_audit_event(event: AuditEvent) -> dict[str, Any]:
    """One event as a FHIR R4 AuditEvent resource (R4B, whose AuditEvent is R4's)."""
    # An action without a code of its own is the portal's activity (staff work on nodes…).
    code, fhir_action = _FHIR_KIND.get(event.action, ("110100", "E"))
    if event.actor is not None:
        username = event.actor.get_username()
        who: dict[str, Any] = {
            "identifier": {"system": STAFF_SYSTEM, "value": username},
            "display": username,
        }
    elif event.share_id is not None:
        # A recipient is no user: the share they proved possession of stands for them.
        who = {
            "identifier": {"system": SHARE_SYSTEM, "value": str(event.share_id)},
            "display": f"recipient of share {event.share_id}",
        }
    else:
        who = {"display": "image portal"}
    agent: dict[str, Any] = {
        "who": who,
        "requestor": event.actor is not None or bool(event.share_id),
    }
    if event.ip_address:
        # Network access point type 2: an IP address.
        agent["network"] = {"address": event.ip_address, "type": "2"}
    if event.user_agent:
        agent["name"] = event.user_agent
    details = [
        {"type": key, "valueString": json.dumps(value, sort_keys=True, ensure_ascii=False)}
        for key, value in sorted(event.detail.items())
    ]
    details += [
        {"type": "prev_digest", "valueString": event.prev_digest or "-"},
        {"type": "digest", "valueString": event.digest or "-"},
    ]
    entity: dict[str, Any] = {"detail": details}
    if event.share_id is not None:
        entity["what"] = {"identifier": {"system": SHARE_SYSTEM, "value": str(event.share_id)}}
        entity["type"] = {
            "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
            "code": "2",
            "display": "System Object",
        }
    return {
        "resourceType": "AuditEvent",
        "id": str(event.pk),
        "type": {"system": DCM, "code": code, "display": _DCM_TYPES[code]},
        "subtype": [{"system": ACTION_SYSTEM, "code": event.action}],
        "action": fhir_action,
        "recorded": event.at.astimezone(UTC).isoformat(timespec="microseconds"),
        # 0 success, 4 minor failure (a wrong code, a refused request).
        "outcome": "4" if event.action in _FAILURES else "0",
        "agent": [agent],
        "source": {
            "site": settings.BASE_URL,
            "observer": {"display": "image portal"},
            "type": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4",
                    "display": "Application Server",
                }
            ],
        },
        "entity": [entity],
    }


def write_fhir_bundle(events: Iterable[AuditEvent], out: TextOut) -> int:
    """A FHIR Bundle (type collection) of AuditEvent resources, written as it goes so that a
    large export needs no memory for the whole."""
    head = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": timezone.now().astimezone(UTC).isoformat(timespec="seconds"),
    }
    out.write(json.dumps(head)[:-1] + ', "entry": [')
    count = 0
    for event in events:
        if count:
            out.write(",")
        out.write("\n" + json.dumps({"resource": fhir_audit_event(event)}, ensure_ascii=False))
        count += 1
    out.write("\n]}\n")
    return count


def write_fhir_ndjson(events: Iterable[AuditEvent], out: TextOut) -> int:
    """One AuditEvent resource per line (FHIR bulk data's NDJSON)."""
    count = 0
    for event in events:
        out.write(json.dumps(fhir_audit_event(event), ensure_ascii=False) + "\n")
        count += 1
    return count


def audit_export(events: Iterable[AuditEvent], out: TextOut, *, fmt: str) -> int:
    """Write events in one of EXPORT_FORMATS; returns how many."""
    writers = {
        "csv": write_csv,
        "ndjson": write_ndjson,
        "fhir": write_fhir_bundle,
        "fhir-ndjson": write_fhir_ndjson,
    }
    if fmt not in writers:
        raise ValueError(f"unknown export format {fmt!r}")
    if isinstance(events, models.QuerySet):
        events = events.iterator(chunk_size=2000)
    return writers[fmt](events, out)


# --- retention --------------------------------------------------------------------------------


class AuditChainBroken(Exception):
    """The events to prune do not verify: pruning them would destroy the evidence."""


@dataclass(frozen=True)
class PruneReport:
    events: int
    through: datetime | None
    output: Path | None


def _write_atomically(path: Path, fill: Any) -> None:
    """Write through a temporary file in the same folder, synced, then renamed: an export
    is whole or absent, never half-written, before anything is deleted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def audit_prune(
    *, output: Path, fmt: str = "ndjson", now: datetime | None = None, days: int | None = None
) -> PruneReport:
    """Export, then delete, the events older than the retention (settings.AUDIT_RETENTION_DAYS):
    the oldest ones, in chain order, up to the first event within the retention. The digest of
    the last pruned event becomes the chain's anchor, so the kept events still verify. Refuses
    (AuditChainBroken) when the chain is broken among the events to prune, and never
    overwrites an existing file."""
    if output.exists():
        raise FileExistsError(f"{output} exists: an export is never overwritten")
    now = now or timezone.now()
    days = settings.AUDIT_RETENTION_DAYS if days is None else days
    cutoff = now - timedelta(days=days)
    first_kept = (
        AuditEvent.objects.filter(at__gte=cutoff).order_by("pk").values_list("pk", flat=True)
    ).first()
    old = AuditEvent.objects.order_by("pk")
    if first_kept is not None:
        old = old.filter(pk__lt=first_kept)
    last = old.last()
    if last is None:
        return PruneReport(0, None, None)
    report = audit_verify()
    if report.broken_event_id is not None and report.broken_event_id <= last.pk:
        raise AuditChainBroken(
            f"the audit chain is broken at event {report.broken_event_id}: {report.reason}"
        )
    doomed = old.filter(pk__lte=last.pk)
    # Events are never changed, so what is exported now is what is deleted below.
    _write_atomically(
        output, lambda out: audit_export(doomed.select_related("actor"), out, fmt=fmt)
    )
    with transaction.atomic():
        chain = _chain_locked()
        count = doomed.count()
        # The one deletion of audit events there is: past the model's refusal on purpose.
        models.QuerySet.delete(doomed)
        chain.anchor_digest = last.digest
        chain.pruned_events += count
        chain.pruned_through = last.at
        chain.events = max(0, chain.events - count)
        chain.save(update_fields=["anchor_digest", "pruned_events", "pruned_through", "events"])
    event_append(
        action=AuditEvent.Action.AUDIT_PRUNED,
        detail={
            "events": count,
            "through": last.at.astimezone(UTC).isoformat(),
            "retention_days": days,
            "file": output.name,
        },
    )
    return PruneReport(count, last.at, output)
