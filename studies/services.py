"""Writes of the studies domain: PACS nodes, and sharing a study (retrieving it if need be).

Retrieval jobs are studies.retrieval's, imports studies.imports'.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import HttpRequest
from django.utils.translation import gettext as _

from accounts import services as account_services
from accounts.models import User
from accounts.services import CreatedShare
from studies import dicom, retrieval, tasks
from studies.models import PacsNode, RetrievalJob, Study
from studies.selectors import study_in_store


def pacs_node_create(
    *,
    name: str,
    ae_title: str,
    host: str,
    port: int,
    dicomweb_url: str = "",
    retrieve_method: str = PacsNode.Retrieve.MOVE,
) -> PacsNode:
    node = PacsNode(
        name=name,
        ae_title=ae_title.strip(),
        host=host,
        port=port,
        dicomweb_url=dicomweb_url,
        retrieve_method=retrieve_method,
    )
    errors: dict[str, list[str]] = {}
    if not dicom.is_valid_ae_title(ae_title):
        errors["ae_title"] = [
            "An AE title has 1 to 16 printable characters (ASCII letters, digits, punctuation), "
            "no backslash."
        ]
    if not 1 <= port <= 65535:
        errors["port"] = ["A port is a number from 1 to 65535."]
    if retrieve_method == PacsNode.Retrieve.WADO and not dicomweb_url:
        errors["dicomweb_url"] = ["WADO-RS retrieval needs the node's DICOMweb URL."]
    try:
        node.full_clean()
    except ValidationError as exc:
        for key, messages in exc.message_dict.items():
            errors.setdefault(key, []).extend(messages)
    if errors:
        raise ValidationError(errors)
    node.save()
    return node


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
    with transaction.atomic():
        # Serialised with `purge` on the studies' rows (it locks the row of the copy it
        # deletes, then checks again that no live share needs it): either the purge sees this
        # share, or it ends before this looks at what the store holds and the study is
        # retrieved again. Without the lock, a share made while a copy is being deleted would
        # see the copy, queue no retrieval, and be left with nothing to show. Rows locked in
        # one order, the purge's own included, so that two sharers never deadlock.
        list(
            Study.objects.select_for_update()
            .filter(study_instance_uid__in=uids)
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        created = account_services.share_create(
            study_instance_uid=study_instance_uid,
            prior_study_instance_uids=uids[1:],
            recipient=recipient,
            channel=channel,
            contact=contact,
            days=days,
            allow_download=allow_download,
            single_use=single_use,
            created_by=created_by,
            request=request,
        )
        missing = [uid for uid in uids if not study_in_store(uid)]
        jobs = []
        if node is not None:
            for uid in missing:
                job = retrieval.retrieval_job_create(
                    node=node, study_uid=uid, requested_by=created_by
                )
                tasks.retrieval_job_enqueue(job)  # once the share is committed
                jobs.append(job)
    return SharedStudy(created=created, jobs=jobs, in_store=not missing)
