"""The share form, the share page with live retrieval progress, and the printed handout.

A share's link and access code exist in clear only when they are made (`study_share`,
`share_regenerate`): the member of staff who made them sees them on the share page and the
handout until they share another study or sign out. They are kept for that one share in the
staff session, encrypted with a key that lives only in a cookie of that browser: the session
row in the database holds ciphertext, and neither is ever logged.
"""

import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import segno
from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.shortcuts import get_object_or_404, redirect, render
from django.templatetags.static import static
from django.urls import path, reverse
from django.utils import timezone, translation
from django.utils.cache import add_never_cache_headers
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts import selectors as account_selectors
from accounts import services as account_services
from accounts.models import AuditEvent, Share, User
from accounts.staff import recent_second_factor_required, staff_required
from studies import services
from studies.models import PacsNode, RetrievalJob
from studies.search import LOCAL, StudyHit, StudyQuery, studies_search
from studies.selectors import StudyProgress, share_progress
from studies.staff.forms import ShareForm

logger = logging.getLogger(__name__)

_SECRETS = "staff.share_secrets"
_KEY_COOKIE = ("__Host-" if settings.SESSION_COOKIE_SECURE else "") + "portal_handout_key"


# --- the link and code of the share just made ---------------------------------------------------


@dataclass(frozen=True)
class ShareSecrets:
    url: str
    access_code: str | None


def _secrets_keep(
    request: HttpRequest, response: HttpResponse, share: Share, secrets: ShareSecrets
) -> None:
    """Keep the link and code of this share (and of no other) for this member of staff."""
    key = Fernet.generate_key()
    sealed = Fernet(key).encrypt(
        json.dumps({"url": secrets.url, "code": secrets.access_code}).encode()
    )
    request.session[_SECRETS] = {"share": share.pk, "sealed": sealed.decode()}
    response.set_cookie(
        _KEY_COOKIE,
        key.decode(),
        max_age=settings.STAFF_SESSION_MAX,
        secure=settings.SESSION_COOKIE_SECURE,
        httponly=True,
        samesite="Strict",
    )


def _secrets_of(request: HttpRequest, share: Share) -> ShareSecrets | None:
    kept = request.session.get(_SECRETS)
    key = request.COOKIES.get(_KEY_COOKIE)
    if not isinstance(kept, dict) or kept.get("share") != share.pk or not key:
        return None
    try:
        data = json.loads(Fernet(key.encode()).decrypt(str(kept["sealed"]).encode()))
    except (InvalidToken, ValueError, KeyError):
        return None
    return ShareSecrets(url=str(data["url"]), access_code=data.get("code"))


def _secrets_update_link(
    request: HttpRequest, response: HttpResponse, share: Share, url: str
) -> None:
    """A new link for the share; the code kept for it, if any, stays (it was not replaced)."""
    previous = _secrets_of(request, share)
    code = previous.access_code if previous is not None else None
    _secrets_keep(request, response, share, ShareSecrets(url=url, access_code=code))


# --- the share form -----------------------------------------------------------------------------


def _source(request: HttpRequest) -> PacsNode | None:
    name = request.GET.get("source", LOCAL)
    if name == LOCAL:
        return None
    node = PacsNode.objects.filter(name=name).first()
    if node is None:
        raise Http404("no such PACS node")
    return node


class _SourceSilent(Exception):
    """The node the study comes from did not answer: nothing to share from it for now."""


@dataclass
class _Candidates:
    study: StudyHit
    priors: list[StudyHit]


def _candidates(request: HttpRequest, study_uid: str, node: PacsNode | None) -> _Candidates:
    """The study to share and the same patient's other studies, from the node it comes from
    and the local archive (what the share can retrieve, or already holds)."""
    nodes = [node] if node is not None else []
    found = studies_search(StudyQuery(study_instance_uid=study_uid), nodes=nodes)
    matches = [hit for hit in found.studies if hit.study_instance_uid == study_uid]
    if not matches and found.silent:
        raise _SourceSilent(node.name if node is not None else "")
    if not matches:
        raise Http404("no such study")
    study = matches[0]
    priors: list[StudyHit] = []
    if study.patient_id:
        same_patient = studies_search(StudyQuery(patient_id=study.patient_id), nodes=nodes)
        priors = [hit for hit in same_patient.studies if hit.study_instance_uid != study_uid]
        account_services.audit(
            AuditEvent.Action.STUDY_SEARCH,
            request=request,
            criteria={"PatientID": study.patient_id},
            matches=len(same_patient.studies),
            purpose="priors",
        )
    return _Candidates(study=study, priors=priors)


def _prior_label(hit: StudyHit) -> str:
    parts = [_display_date(hit.study_date), hit.description or _("(no description)")]
    if hit.modalities:
        parts.append(" ".join(hit.modalities))
    return " · ".join(part for part in parts if part)


def _display_date(da: str) -> str:
    if len(da) == 8 and da.isdigit():
        return f"{da[6:8]}/{da[4:6]}/{da[0:4]}"
    return da


@staff_required(User.Role.SHARER)
@require_http_methods(["GET", "POST"])
def share_new(request: HttpRequest) -> HttpResponseBase:
    study_uid = request.GET.get("study", "")
    node = _source(request)
    try:
        candidates = _candidates(request, study_uid, node)
    except _SourceSilent as exc:
        messages.error(
            request,
            _(
                "The PACS %(node)s did not answer: the study cannot be shared from it now. "
                "Try again in a moment."
            )
            % {"node": str(exc)},
        )
        return redirect("staff:home")
    choices = [(hit.study_instance_uid, _prior_label(hit)) for hit in candidates.priors]
    if request.method == "POST":
        return _share_create(request, candidates, node, choices)
    form = ShareForm(prior_choices=choices)
    return _share_form_page(request, form, candidates, node)


def _share_form_page(
    request: HttpRequest,
    form: ShareForm,
    candidates: _Candidates,
    node: PacsNode | None,
    status: int = 200,
) -> HttpResponse:
    return render(
        request,
        "studies/staff/share_form.html",
        {
            "staff_section": "search",
            "form": form,
            "study": candidates.study,
            "node": node,
            "back": request.get_full_path(),
        },
        status=status,
    )


# Where a service's errors go on the form (its field names are the service's arguments).
_FIELD_OF = {"days": "days", "note": "note", "recipient": "recipient", "channel": "channel"}


@recent_second_factor_required
def _share_create(
    request: HttpRequest,
    candidates: _Candidates,
    node: PacsNode | None,
    choices: list[tuple[str, str]],
) -> HttpResponse:
    """Every contact here is typed by hand: a sensitive action, behind a recent second
    factor (accounts.staff)."""
    form = ShareForm(request.POST, prior_choices=choices)
    if form.is_valid():
        data = form.cleaned_data
        user = request.user if isinstance(request.user, User) else None
        try:
            shared = services.study_share(
                study_instance_uid=candidates.study.study_instance_uid,
                prior_study_instance_uids=data["priors"],
                node=node,
                recipient=data["recipient"],
                channel=data["channel"],
                contact=data["contact"],
                days=data["days"],
                allow_download=data["allow_download"],
                note=data["note"],
                language=data["language"],
                created_by=user,
                request=request,
            )
        except ValidationError as exc:
            for key, errors in exc.message_dict.items():
                field = form.contact_field() if key == "contact" else _FIELD_OF.get(key)
                for error in errors:
                    form.add_error(field, error)
        else:
            created = shared.created
            response = redirect("staff:share_detail", pk=created.share.pk)
            _secrets_keep(
                request,
                response,
                created.share,
                ShareSecrets(url=created.url, access_code=created.access_code),
            )
            messages.success(request, _("The share is made. Print the handout or send the link."))
            if data["send_now"]:
                _send_link(request, created.share, created.url, user)
            return response
    return _share_form_page(request, form, candidates, node, status=400)


def _send_link(request: HttpRequest, share: Share, url: str, user: User | None) -> None:
    if account_services.share_link_send(share=share, url=url, by=user, request=request):
        if share.channel == Share.Channel.SMS:
            messages.success(request, _("The link was sent by text message."))
        else:
            messages.success(request, _("The link was sent by email."))
    else:
        messages.error(
            request,
            _("The link could not be sent. Print the handout, or try sending it again later."),
        )


# --- the share page and its progress ------------------------------------------------------------


def _share(pk: int) -> Share:
    return get_object_or_404(Share.objects.select_related("created_by"), pk=pk)


def failure_sentence(item: StudyProgress) -> str:
    """What went wrong with a study's retrieval, in words for the radiology desk (from the
    kind of failure the worker recorded; the technical account is shown below it)."""
    job = item.job
    if item.state != RetrievalJob.Status.FAILED or job is None:
        return ""
    node = job.pacs
    if node is None:
        return _("The PACS node this study was to come from has been removed.")
    words = {
        "node": node.name,
        "pacs": f"{node.ae_title} ({node.host}:{node.port})",
        "ae": settings.DICOM_AE_TITLE,
        "portal": f"{urlsplit(settings.BASE_URL).hostname}:{settings.DICOM_PORT}",
        "failed": job.failed,
        "total": job.failed + job.received,
    }
    Failure = RetrievalJob.Failure
    sentences = {
        Failure.DESTINATION_UNKNOWN: _(
            "The PACS %(node)s could not send the images back to the portal: it does not "
            "know the portal's AE title %(ae)s at %(portal)s. Ask the PACS administrator to "
            "add the portal to its DICOM nodes, then try again."
        ),
        Failure.PORTAL_UNKNOWN: _(
            "The PACS %(node)s refuses to talk to the portal: it does not know the portal's "
            "AE title %(ae)s. Ask the PACS administrator to add the portal to its DICOM "
            "nodes, then try again."
        ),
        Failure.UNREACHABLE: _(
            "The portal cannot reach the PACS %(node)s at %(pacs)s: it may be stopped, or the "
            "network between them cut. Try again in a few minutes; if it goes on, call the "
            "PACS administrator."
        ),
        Failure.SILENT: _(
            "The PACS %(node)s stopped answering while it was sending the images. Try again; "
            "if it goes on, call the PACS administrator."
        ),
        Failure.STUDY_MISSING: _(
            "The PACS %(node)s does not have this study (any more). Search for it again: it "
            "may be on another PACS."
        ),
        Failure.PARTIAL: _(
            "The PACS %(node)s could not send %(failed)d of the %(total)d images. Try again; "
            "if it happens again, call the PACS administrator."
        ),
        Failure.NOTHING_SENT: _(
            "The PACS %(node)s sent no image of this study. Try again; if it happens again, "
            "call the PACS administrator."
        ),
        Failure.NOT_INDEXED: _(
            "The PACS %(node)s sent the images, but the portal could not keep all of them. "
            "Try again; if it happens again, call the portal's administrator."
        ),
        Failure.STORE: _(
            "The portal could not store the images (its disk may be full). Call the portal's "
            "administrator."
        ),
    }
    sentence = sentences.get(RetrievalJob.Failure(job.error_kind)) if job.error_kind else None
    if sentence is None:
        sentence = _(
            "The images could not be brought from the PACS %(node)s. Try again; if it happens "
            "again, call the PACS administrator with the details below."
        )
    return sentence % words


def _state_label(item: StudyProgress) -> str:
    labels = {
        "ready": _("Ready"),
        RetrievalJob.Status.QUEUED: _("Waiting for its turn"),
        RetrievalJob.Status.RUNNING: _("Arriving"),
        RetrievalJob.Status.FAILED: _("Failed"),
        "waiting": _("Not in the portal"),
    }
    return str(labels.get(item.state, item.state))


def _progress_rows(share: Share) -> list[dict[str, Any]]:
    rows = []
    for item in share_progress(share.study_uids):
        rows.append(
            {
                "uid": item.study_instance_uid,
                "state": item.state,
                "label": _state_label(item),
                "received": item.received,
                "expected": item.expected,
                "percent": item.percent,
                "failure": failure_sentence(item),
                "detail": item.job.error if item.job is not None and item.state == "failed" else "",
                "job": item.job.pk if item.job is not None else None,
                "description": item.description,
                "date": _display_date(item.study_date),
            }
        )
    return rows


def _status_label(share: Share) -> str:
    status = account_selectors.share_status(share)
    labels = {
        "pending": _("Images on their way: the recipient can already sign in"),
        "active": _("Active"),
        "expired": _("Expired"),
        "revoked": _("Revoked"),
        "used": _("Used (single use)"),
    }
    label = str(labels.get(status, status))
    if account_selectors.share_is_locked(share):
        label += " · " + _("locked after wrong codes")
    return label


@staff_required(User.Role.SHARER)
@require_GET
def share_detail(request: HttpRequest, pk: int) -> HttpResponse:
    share = _share(pk)
    response = render(
        request,
        "studies/staff/share_detail.html",
        {
            "staff_section": "shares",
            "share": share,
            "status": _status_label(share),
            "status_value": account_selectors.share_status(share),
            "rows": _progress_rows(share),
            "secrets": _secrets_of(request, share),
            "max_days": settings.SHARE_MAX_DAYS,
        },
    )
    add_never_cache_headers(response)
    return response


@staff_required(User.Role.SHARER)
@require_GET
def share_progress_json(request: HttpRequest, pk: int) -> JsonResponse:
    share = _share(pk)
    rows = _progress_rows(share)
    response = JsonResponse(
        {
            "status": account_selectors.share_status(share),
            "status_label": _status_label(share),
            "done": all(row["state"] in ("ready", "failed") for row in rows),
            "studies": rows,
        }
    )
    add_never_cache_headers(response)
    return response


@staff_required(User.Role.SHARER)
@require_POST
def share_retry(request: HttpRequest, pk: int) -> HttpResponse:
    share = _share(pk)
    job = get_object_or_404(
        RetrievalJob, pk=request.POST.get("job") or 0, study_instance_uid__in=share.study_uids
    )
    user = request.user if isinstance(request.user, User) else None
    new = services.retrieval_job_retry(job=job, by=user, request=request)
    if new.pk != job.pk:
        messages.success(request, _("The retrieval starts again."))
    return redirect("staff:share_detail", pk=share.pk)


@staff_required(User.Role.SHARER)
@require_POST
@recent_second_factor_required
def share_regenerate(request: HttpRequest, pk: int) -> HttpResponse:
    share = _share(pk)
    user = request.user if isinstance(request.user, User) else None
    response = redirect("staff:share_detail", pk=share.pk)
    try:
        new = account_services.share_regenerate(share=share, by=user, request=request)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return response
    _secrets_keep(request, response, share, ShareSecrets(url=new.url, access_code=new.access_code))
    messages.success(
        request,
        _(
            "A new link and a new code replace the old ones, which no longer work. "
            "Print the new handout."
        ),
    )
    return response


@staff_required(User.Role.SHARER)
@require_POST
@recent_second_factor_required
def share_resend(request: HttpRequest, pk: int) -> HttpResponse:
    """Send the link again: the old one is not stored anywhere, so a new one replaces it (the
    printed access code stays valid)."""
    share = _share(pk)
    user = request.user if isinstance(request.user, User) else None
    response = redirect("staff:share_detail", pk=share.pk)
    try:
        new = account_services.share_regenerate(share=share, code=False, by=user, request=request)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return response
    _secrets_update_link(request, response, share, new.url)
    _send_link(request, share, new.url, user)
    return response


# --- the handout --------------------------------------------------------------------------------


def _qr_svg(url: str, title: str) -> str:
    """The link as a QR code, inline SVG made on the server (no script, no external image)."""
    qr = segno.make(url, error="m")
    return str(qr.svg_inline(scale=4, border=4, title=title, omitsize=True))


def _logo_url() -> str:
    logo = str(settings.HOSPITAL_LOGO)
    if not logo or logo.startswith(("https://", "http://", "/")):
        return logo
    return static(logo)


@staff_required(User.Role.SHARER)
@require_GET
def share_handout(request: HttpRequest, pk: int) -> HttpResponse:
    share = _share(pk)
    secrets = _secrets_of(request, share)
    with translation.override(share.language):
        context: dict[str, Any] = {
            "share": share,
            "secrets": secrets,
            "hospital": settings.HOSPITAL_NAME,
            "logo": _logo_url(),
            "helpdesk": settings.HELPDESK_PHONE or settings.SUPPORT_CONTACT,
            "portal": settings.BASE_URL,
            "expires_at": timezone.localtime(share.expires_at),
            "studies": share_progress(share.study_uids),
        }
        if secrets is not None and secrets.access_code is not None:
            context["qr"] = _qr_svg(secrets.url, _("QR code of your link"))
            # The page that carries the code in clear: who opened it, and when.
            account_services.audit(
                AuditEvent.Action.HANDOUT_PRINTED,
                request=request,
                share=share,
                language=share.language,
            )
        response = render(request, "studies/staff/handout.html", context)
    add_never_cache_headers(response)
    return response


def share_new_url(study_uid: str, source: str) -> str:
    return f"{reverse('staff:share_new')}?{urlencode({'study': study_uid, 'source': source})}"


urlpatterns = [
    path("share/new/", share_new, name="share_new"),
    path("share/<int:pk>/", share_detail, name="share_detail"),
    path("share/<int:pk>/progress/", share_progress_json, name="share_progress"),
    path("share/<int:pk>/retry/", share_retry, name="share_retry"),
    path("share/<int:pk>/regenerate/", share_regenerate, name="share_regenerate"),
    path("share/<int:pk>/resend/", share_resend, name="share_resend"),
    path("share/<int:pk>/handout/", share_handout, name="share_handout"),
]
