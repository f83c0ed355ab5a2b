"""Writes of the studies domain: PACS nodes, and sharing a study (retrieving it if need be).

Retrieval jobs are studies.retrieval's, imports studies.imports'.
"""

from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.http import HttpRequest
from django.utils.translation import gettext as _

from accounts import services as account_services
from accounts.models import User
from accounts.services import CreatedShare
from studies import dicom, retrieval, tasks
from studies.models import PacsNode, RetrievalJob
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
    retrieval job it queued if the store lacked the study, and whether the store held it."""

    created: CreatedShare
    job: RetrievalJob | None
    in_store: bool


def study_share(
    *,
    study_instance_uid: str,
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
    """Share a study with a recipient and, if the store lacks it and a node is given, queue
    its retrieval from that node.

    Until the study is in the store the share is "pending" (accounts.selectors.share_status):
    the recipient can already open it, and sees "being prepared".
    """
    # The one definition of a valid UID is here, in studies: accounts may not import it.
    if not dicom.is_valid_uid(study_instance_uid):
        raise ValidationError({"study_uid": [_("This is not a valid Study Instance UID.")]})
    created = account_services.share_create(
        study_instance_uid=study_instance_uid,
        recipient=recipient,
        channel=channel,
        contact=contact,
        days=days,
        allow_download=allow_download,
        single_use=single_use,
        created_by=created_by,
        request=request,
    )
    in_store = study_in_store(study_instance_uid)
    job = None
    if node is not None and not in_store:
        job = retrieval.retrieval_job_create(
            node=node, study_uid=study_instance_uid, requested_by=created_by
        )
        tasks.retrieval_job_enqueue(job)
    return SharedStudy(created=created, job=job, in_store=in_store)
