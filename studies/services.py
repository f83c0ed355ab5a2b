"""Writes of the studies domain: PACS nodes, and sharing a study (retrieving it if need be).

Retrieval jobs are studies.retrieval's, imports studies.imports'.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import HttpRequest
from django.utils.translation import gettext as _

from accounts import services as account_services
from accounts.models import AuditEvent, Share, User
from accounts.services import CreatedShare
from studies import dicom, retrieval, selectors, tasks
from studies.dimse import pacs
from studies.models import PacsNode, RetrievalJob, Study


def _validate_node(node: PacsNode) -> None:
    errors: dict[str, list[str]] = {}
    if not dicom.is_valid_ae_title(node.ae_title):
        errors["ae_title"] = [
            _(
                "An AE title has 1 to 16 printable characters (ASCII letters, digits, "
                "punctuation), no backslash."
            )
        ]
    if not 1 <= node.port <= 65535:
        errors["port"] = [_("A port is a number from 1 to 65535.")]
    if node.retrieve_method == PacsNode.Retrieve.WADO and not node.dicomweb_url:
        errors["dicomweb_url"] = [_("WADO-RS retrieval needs the node's DICOMweb URL.")]
    try:
        node.full_clean()
    except ValidationError as exc:
        for key, messages in exc.message_dict.items():
            errors.setdefault(key, []).extend(messages)
    if errors:
        raise ValidationError(errors)


def _node_facts(node: PacsNode) -> dict[str, Any]:
    """What the audit log keeps of a node (its configuration; nothing secret in it)."""
    return {
        "node": node.name,
        "ae_title": node.ae_title,
        "host": node.host,
        "port": node.port,
        "dicomweb_url": node.dicomweb_url,
        "retrieve": node.retrieve_method,
    }


def pacs_node_create(
    *,
    name: str,
    ae_title: str,
    host: str,
    port: int,
    dicomweb_url: str = "",
    retrieve_method: str = PacsNode.Retrieve.MOVE,
    by: User | None = None,
    request: HttpRequest | None = None,
) -> PacsNode:
    node = PacsNode(
        name=name,
        ae_title=ae_title.strip(),
        host=host,
        port=port,
        dicomweb_url=dicomweb_url,
        retrieve_method=retrieve_method,
    )
    _validate_node(node)
    node.save()
    account_services.audit(
        AuditEvent.Action.PACS_NODE_CREATED, request=request, actor=by, **_node_facts(node)
    )
    return node


def pacs_node_update(
    *,
    node: PacsNode,
    name: str,
    ae_title: str,
    host: str,
    port: int,
    dicomweb_url: str = "",
    retrieve_method: str = PacsNode.Retrieve.MOVE,
    by: User | None = None,
    request: HttpRequest | None = None,
) -> PacsNode:
    """Change a node's configuration. Jobs already running keep the address they started
    with; the next attempt and the storage SCP (which re-reads the nodes) use the new one."""
    before = _node_facts(node)
    node.name = name
    node.ae_title = ae_title.strip()
    node.host = host
    node.port = port
    node.dicomweb_url = dicomweb_url
    node.retrieve_method = retrieve_method
    try:
        _validate_node(node)
    except ValidationError:
        node.refresh_from_db()
        raise
    node.save()
    after = _node_facts(node)
    changed = {key: [before[key], value] for key, value in after.items() if before[key] != value}
    account_services.audit(
        AuditEvent.Action.PACS_NODE_UPDATED,
        request=request,
        actor=by,
        node=node.name,
        changed=changed,
    )
    return node


class PacsNodeInUse(Exception):
    """The node has retrieval jobs queued or running: removing it would leave them without a
    PACS to ask."""

    def __init__(self, jobs: int) -> None:
        super().__init__(f"{jobs} retrieval jobs queued or running")
        self.jobs = jobs


def pacs_node_delete(
    *, node: PacsNode, by: User | None = None, request: HttpRequest | None = None
) -> None:
    """Remove a node, unless retrieval jobs from it are queued or running (PacsNodeInUse).

    What it leaves: the studies it sent stay in the store (their source is forgotten), the
    finished jobs stay as history, and the storage SCP refuses its associations from then on
    (only configured nodes may send)."""
    with transaction.atomic():
        node = PacsNode.objects.select_for_update().get(pk=node.pk)
        jobs = selectors.pacs_node_jobs_unfinished(node)
        if jobs:
            raise PacsNodeInUse(jobs)
        facts = _node_facts(node)
        node.delete()
    account_services.audit(AuditEvent.Action.PACS_NODE_DELETED, request=request, actor=by, **facts)


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    # The technical cause when it failed (English: for whoever configures the PACS).
    detail: str = ""


def pacs_node_echo(
    *, node: PacsNode, by: User | None = None, request: HttpRequest | None = None
) -> EchoResult:
    """C-ECHO the node, and record that it was checked and how it went."""
    try:
        pacs.echo(pacs.Peer.of(node))
    except pacs.PacsError as exc:
        result = EchoResult(ok=False, detail=str(exc))
    else:
        result = EchoResult(ok=True)
    account_services.audit(
        AuditEvent.Action.PACS_NODE_ECHO,
        request=request,
        actor=by,
        node=node.name,
        ok=result.ok,
        error=result.detail,
    )
    return result


@dataclass(frozen=True)
class WayBackResult:
    """The check of the way back: its outcome, or None with the cause when it could not be
    made (the node unreachable or silent)."""

    check: pacs.WayBackCheck | None
    detail: str = ""


def pacs_node_check_way_back(
    *, node: PacsNode, by: User | None = None, request: HttpRequest | None = None
) -> WayBackResult:
    """Ask the node to move a made-up study to the portal (studies.dimse.pacs.check_way_back)
    and record what it answered."""
    try:
        result = WayBackResult(check=pacs.check_way_back(pacs.Peer.of(node)))
    except pacs.PacsError as exc:
        result = WayBackResult(check=None, detail=str(exc))
    check = result.check
    account_services.audit(
        AuditEvent.Action.PACS_NODE_WAY_BACK,
        request=request,
        actor=by,
        node=node.name,
        destination=check.destination if check else settings.DICOM_AE_TITLE,
        outcome=check.outcome.value if check else "unreachable",
        status=check.status if check else None,
        error=result.detail,
    )
    return result


# --- shares -----------------------------------------------------------------------------------


def patient_shares_revoke(
    *, patient_id: str, by: User | None = None, request: HttpRequest | None = None
) -> list[int]:
    """Revoke every live share of a patient at once, whatever node their studies came from
    (studies.selectors.patient_live_shares), in one transaction: each is revoked and audited
    as one revocation, and one more event records the whole. Returns the ids revoked.

    Revocation takes effect at the recipients' next request: their sessions and viewer tokens
    are checked against the share each time (accounts.access, accounts.selectors)."""
    with transaction.atomic():
        shares = list(selectors.patient_live_shares(patient_id).select_for_update(of=("self",)))
        for share in shares:
            account_services.share_revoke(share=share, by=by, request=request)
        ids = [share.pk for share in shares]
        account_services.audit(
            AuditEvent.Action.PATIENT_SHARES_REVOKED,
            request=request,
            actor=by,
            patient_id=patient_id.strip(),
            shares=ids,
        )
    return ids


@dataclass(frozen=True)
class SharedStudy:
    """What `study_share` made: the share with its link and access code (shown once), the
    retrieval jobs it queued for the studies the store lacked (the current study's first), and
    whether the store held every study."""

    created: CreatedShare
    jobs: list[RetrievalJob]
    in_store: bool

    @property
    def job(self) -> RetrievalJob | None:
        return self.jobs[0] if self.jobs else None


def _check_one_patient(uids: list[str]) -> None:
    """Priors are the same patient's studies: refuse a share that would show another
    patient's images, as far as the store can tell (studies not yet retrieved are checked by
    staff when they pick them from the same patient's search results)."""
    patients = set(
        Study.objects.filter(study_instance_uid__in=uids)
        .exclude(patient_id="")
        .values_list("patient_id", flat=True)
    )
    if len(patients) > 1:
        raise ValidationError({"study_uid": [_("These studies belong to different patients.")]})


def study_share(
    *,
    study_instance_uid: str,
    prior_study_instance_uids: Sequence[str] = (),
    node: PacsNode | None = None,
    recipient: str,
    channel: str,
    contact: str,
    days: int | None = None,
    allow_download: bool = True,
    single_use: bool = False,
    note: str = "",
    language: str = "",
    created_by: User | None = None,
    request: HttpRequest | None = None,
) -> SharedStudy:
    """Share a study (and priors of the same patient to compare it with) with a recipient
    and, for each study the store lacks when a node is given, queue its retrieval from that
    node.

    Until every study is in the store the share is "pending" (accounts.selectors.share_status):
    the recipient can already open it, and sees "being prepared".
    """
    uids = list(dict.fromkeys([study_instance_uid, *prior_study_instance_uids]))
    # The one definition of a valid UID is here, in studies: accounts may not import it.
    if not all(dicom.is_valid_uid(uid) for uid in uids):
        raise ValidationError({"study_uid": [_("This is not a valid Study Instance UID.")]})
    _check_one_patient(uids)
    created = account_services.share_create(
        study_instance_uid=study_instance_uid,
        prior_study_instance_uids=uids[1:],
        recipient=recipient,
        channel=channel,
        contact=contact,
        days=days,
        allow_download=allow_download,
        single_use=single_use,
        note=note,
        language=language,
        created_by=created_by,
        request=request,
    )
    missing = [uid for uid in uids if not selectors.study_in_store(uid)]
    jobs = []
    if node is not None:
        for uid in missing:
            job = retrieval.retrieval_job_create(node=node, study_uid=uid, requested_by=created_by)
            tasks.retrieval_job_enqueue(job)
            jobs.append(job)
    return SharedStudy(created=created, jobs=jobs, in_store=not missing)


def retrieval_job_retry(
    *, job: RetrievalJob, by: User | None = None, request: HttpRequest | None = None
) -> RetrievalJob:
    """Try a failed retrieval again, at staff's request (once the cause is fixed: the PACS
    back up, the portal added to its nodes): a new job for the same study and node, queued
    at once. A job not failed is returned as it is; so is one whose node was removed."""
    if job.status != RetrievalJob.Status.FAILED or job.pacs is None:
        return job
    new = retrieval.retrieval_job_create(
        node=job.pacs, study_uid=job.study_instance_uid, requested_by=by
    )
    tasks.retrieval_job_enqueue(new)
    account_services.audit(
        AuditEvent.Action.RETRIEVAL_RETRIED,
        request=request,
        actor=by,
        study=job.study_instance_uid,
        node=job.pacs.name,
        job=new.pk,
        failed_job=job.pk,
    )
    return new


def _last_source(study_instance_uid: str) -> PacsNode | None:
    """The node the study was last retrieved from (still configured)."""
    job = (
        RetrievalJob.objects.filter(study_instance_uid=study_instance_uid, pacs__isnull=False)
        .select_related("pacs")
        .order_by("-created_at", "-pk")
        .first()
    )
    return job.pacs if job is not None else None


def share_rearm(
    *,
    share: Share,
    node: PacsNode | None = None,
    by: User | None = None,
    request: HttpRequest | None = None,
) -> list[RetrievalJob]:
    """Retrieve again the studies of a live share that the store no longer holds (a copy
    lost to a purge that raced the share's creation, a store restored from an older backup, a
    share made without a node for a study the store lacked): from `node`, else from the node
    each study last came from. Nothing is queued unless every missing study has a node. An
    ended share is refused: it cannot come back (accounts.services.share_extend), the study is
    shared again instead. Returns the jobs queued (none if the store has everything)."""
    if share.refusal() is not None:
        raise ValidationError(
            {"share": [_("This share has ended: share the study again instead.")]}
        )
    missing = [uid for uid in share.study_uids if not selectors.study_in_store(uid)]
    sources = {uid: node or _last_source(uid) for uid in missing}
    unknown = [uid for uid, source in sources.items() if source is None]
    if unknown:
        raise ValidationError(
            {
                "node": [
                    _("No PACS node is known for study %(uid)s: choose one to retrieve it from.")
                    % {"uid": unknown[0]}
                ]
            }
        )
    jobs = []
    for uid, source in sources.items():
        assert source is not None
        job = retrieval.retrieval_job_create(node=source, study_uid=uid, requested_by=by)
        tasks.retrieval_job_enqueue(job)
        jobs.append(job)
    if jobs:
        account_services.audit(
            AuditEvent.Action.SHARE_REARMED,
            request=request,
            share=share,
            actor=by,
            studies=missing,
            jobs=[job.pk for job in jobs],
        )
    return jobs
