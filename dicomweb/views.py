"""What recipients get: the viewer page of a recipient session, and share-scoped DICOMweb
(which the viewer, OHIF and Weasis read). Both build on the same share check."""

import logging
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

from django.conf import settings
from django.db.models import QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    HttpResponseRedirect,
    JsonResponse,
    StreamingHttpResponse,
)
from django.shortcuts import render
from django.urls import reverse
from django.utils.http import content_disposition_header
from django.utils.translation import get_language
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from pydicom.uid import ExplicitVRLittleEndian

from accounts import access, services
from accounts import selectors as account_selectors
from accounts.models import AuditEvent, Share
from dicomweb import archive, bearer, documents, media, multipart, ohif, qido, rendering, selectors
from studies import dicom, metadata
from studies.models import Instance
from studies.store import instance_file

logger = logging.getLogger(__name__)


# The viewport of the rendered frames the viewer asks for, as one side of a square: the first
# image is in the page before any script knows the screen, and viewer.js picks the same size on
# most screens (a phone's 375 px at 2 or 3 device pixels per CSS pixel), so that first request
# serves its slice. Frames are never enlarged: a 512×512 CT comes at its own size.
VIEWER_VIEWPORT = 1024


def _viewer_series(study: selectors.ViewerStudy, series: selectors.ViewerSeries) -> dict[str, Any]:
    """What viewer.js needs of a series: how to build the URL of each slice (PS3.18 §10.4.1.1.4
    rendered frames) and of its metadata."""
    base = reverse(
        "dicomweb:qido-instances",
        kwargs={"study": study.study_instance_uid, "series": series.series_instance_uid},
    )
    return {
        "uid": series.series_instance_uid,
        "modality": series.modality,
        "base": base + "/",
        "slices": series.slices,
    }


def _first_image_url(study: selectors.ViewerStudy, series: selectors.ViewerSeries) -> str:
    """The URL viewer.js builds for the first slice at the viewer's usual viewport."""
    sop, frame = series.slices[0]
    path = reverse(
        "dicomweb:rs-rendered-frame",
        kwargs={
            "study": study.study_instance_uid,
            "series": series.series_instance_uid,
            "instance": sop,
            "number": frame,
        },
    )
    return f"{path}?viewport={VIEWER_VIEWPORT},{VIEWER_VIEWPORT}"


@require_GET
@access.recipient_required
def viewer(request: access.RecipientRequest) -> HttpResponse:
    """The viewer: everything the first image needs is in the page (its <img> and the slices of
    every series as JSON), so that it is painted without a round trip after the one-time code."""
    share = request.share
    studies = selectors.viewer_studies(share)
    for shown_study in studies:
        access.record_view(request, share=share, study_instance_uid=shown_study.study_instance_uid)
    shown = [(study, s) for study in studies for s in study.series if s.displayable]
    study = studies[0] if studies else None
    return render(
        request,
        "dicomweb/viewer.html",
        {
            "share": share,
            "studies": studies,
            "study": study,
            "patient_name": dicom.display_name(study.patient_name) if study else "",
            "study_date": dicom.date_value(study.study_date) if study else None,
            "first_series": shown[0][1] if shown else None,
            "first_image_url": _first_image_url(*shown[0]) if shown else None,
            "viewer_data": {
                "series": [_viewer_series(*pair) for pair in shown],
                "viewport": VIEWER_VIEWPORT,
            },
            "download_url": (
                reverse("dicomweb:download", kwargs={"study": study.study_instance_uid})
                if study is not None and share.allow_download
                else None
            ),
            "ohif_url": (
                ohif.viewer_path(study.study_instance_uid)
                if study is not None and ohif.is_installed()
                else None
            ),
            "weasis_url": (
                reverse("dicomweb:weasis", kwargs={"study": study.study_instance_uid})
                if study is not None
                else None
            ),
        },
    )


# --- Documents: what is not an image, opened for what it is (dicomweb.documents) ---------------

# The PDF opens in a tab of its own, in the browser's PDF viewer. Its policy replaces the
# portal's for this answer only: `sandbox` gives the document an opaque origin, so that what
# a hostile PDF may run (PDF viewers run scripts of their own) reaches neither the session's
# cookies nor the portal's URLs; nothing is loaded from anywhere and nothing may frame it.
# Chromium's viewer renders a top-level PDF under this policy (and X-Frame-Options: DENY):
# tests/test_viewer_documents.py opens one.
# The header is set by the view, and django-csp leaves a response's own policy as it is.
DOCUMENT_CONTENT_SECURITY_POLICY = "sandbox; default-src 'none'; frame-ancestors 'none'"


def _document(share: Share, study: str, series: str, instance: str, kind: documents.Kind) -> Path:
    """The file of a granted instance of that kind, or 404 (another kind is not there)."""
    stored = _instance(share, study, series, instance)
    if documents.document_kind(stored.sop_class_uid) != kind:
        raise Http404
    return instance_file(stored)


@require_GET
@access.recipient_required
def document(
    request: access.RecipientRequest, study: str, series: str, instance: str
) -> HttpResponse:
    """An Encapsulated PDF's document, byte for byte, shown inline (the session's share only)."""
    path = _document(request.share, study, series, instance, documents.Kind.PDF)
    try:
        pdf = documents.encapsulated_pdf(path)
    except documents.UnreadableDocument:
        raise Http404 from None
    access.record_view(request, share=request.share, study_instance_uid=study)
    response = HttpResponse(pdf, content_type="application/pdf")
    response["Content-Disposition"] = 'inline; filename="report.pdf"'
    response["Content-Security-Policy"] = DOCUMENT_CONTENT_SECURITY_POLICY
    return response


@require_GET
@access.recipient_required
def report(
    request: access.RecipientRequest, study: str, series: str, instance: str
) -> HttpResponse:
    """A structured report's content tree as a page (the session's share only)."""
    path = _document(request.share, study, series, instance, documents.Kind.REPORT)
    try:
        content = documents.structured_report(path)
    except documents.UnreadableDocument:
        raise Http404 from None
    access.record_view(request, share=request.share, study_instance_uid=study)
    return render(request, "dicomweb/report.html", {"report": content})


# --- DICOMweb (PS3.18) for the session's share ------------------------------------------------
#
# Every view answers for the share of the recipient session only; anything outside it (another
# study, a series the share leaves out, a made-up UID) is the same 404 as what does not exist.


def _grant(request: HttpRequest) -> tuple[Share, str | None]:
    """The share a DICOMweb request may read, and the one study it is held to when it came
    with a viewer token (None: the session's whole share).

    With an `Authorization` header the token alone decides (dicomweb.bearer): a bad one raises
    InvalidBearerToken (401), and a URL under another study than the token's is the same 404
    as anything else outside the grant, whatever view it reaches. Without the header, the
    verified recipient session decides, or 404.
    """
    token = bearer.bearer_token(request)
    if token is None:
        share = access.recipient_share(request)
        if share is None:
            raise Http404
        return share, None
    viewer = account_selectors.share_for_viewer_token(token)
    if viewer is None:
        raise bearer.InvalidBearerToken
    match = request.resolver_match
    path_study = match.kwargs.get("study") if match is not None else None
    if path_study is not None and path_study != viewer.study_instance_uid:
        raise Http404
    return viewer.share, viewer.study_instance_uid


def _granted_share(request: HttpRequest) -> Share:
    return _grant(request)[0]


def _record_view(request: HttpRequest, share: Share, study: str) -> None:
    """One VIEW event per session and study. A viewer token's requests have no session to
    remember it in (and must not be given one); minting the token was audited instead."""
    if bearer.bearer_token(request) is None:
        access.record_view(request, share=share, study_instance_uid=study)


def _scope(
    share: Share, study: str, series: str | None = None, instance: str | None = None
) -> QuerySet[Instance]:
    """The granted instances under a path, or 404 if there are none."""
    instances = selectors.share_instances(share).filter(series__study__study_instance_uid=study)
    if series is not None:
        instances = instances.filter(series__series_instance_uid=series)
    if instance is not None:
        instances = instances.filter(sop_instance_uid=instance)
    if not instances.exists():
        raise Http404
    return instances


def _instance(share: Share, study: str, series: str, instance: str) -> Instance:
    """The one granted instance at a path, or 404: one query, where `_scope(…).get()` takes
    two (a warm rendered frame spends most of its time building queries)."""
    instances = selectors.share_instances(share).filter(
        series__study__study_instance_uid=study,
        series__series_instance_uid=series,
        sop_instance_uid=instance,
    )
    try:
        return instances.get()
    except Instance.DoesNotExist:
        raise Http404 from None


def _rs_url(request: HttpRequest, *uids: str) -> str:
    names = ("study", "series", "instance")
    name = ("dicomweb:rs-study", "dicomweb:rs-series", "dicomweb:rs-instance")[len(uids) - 1]
    return request.build_absolute_uri(reverse(name, kwargs=dict(zip(names, uids, strict=False))))


def _bad_request(reason: str) -> HttpResponse:
    return HttpResponse(reason, status=400, content_type="text/plain; charset=utf-8")


def _not_acceptable() -> HttpResponse:
    return HttpResponse(
        "None of the media types this resource offers is acceptable to the request.",
        status=406,
        content_type="text/plain; charset=utf-8",
    )


def _search(request: HttpRequest, level: qido.Level, scope: dict[str, str]) -> HttpResponse:
    share, token_study = _grant(request)
    media_type = media.accepts_json(request.headers.get("Accept"))
    if media_type is None:
        return _not_acceptable()
    granted = selectors.share_instances(share)
    if token_study is not None:
        granted = granted.filter(series__study__study_instance_uid=token_study)
    if scope:
        granted = _scope(share, **scope)
    try:
        search = qido.parse(request.GET, level)
    except qido.QueryError as exc:
        return _bad_request(str(exc))
    retrieve_url = partial(_rs_url, request)
    if level == qido.Level.STUDY:
        results = qido.search_studies(granted, search, retrieve_url)
    elif level == qido.Level.SERIES:
        results = qido.search_series(granted, search, retrieve_url)
    else:
        results = qido.search_instances(granted, search, retrieve_url)
    response = JsonResponse(results, safe=False, content_type=media_type)
    warning = qido.ignored_warning(search)
    if warning:
        response["Warning"] = warning
    return response


@require_GET
def qido_studies(request: HttpRequest) -> HttpResponse:
    return _search(request, qido.Level.STUDY, {})


@require_GET
def qido_series(request: HttpRequest, study: str | None = None) -> HttpResponse:
    return _search(request, qido.Level.SERIES, {"study": study} if study else {})


@require_GET
def qido_instances(
    request: HttpRequest, study: str | None = None, series: str | None = None
) -> HttpResponse:
    scope = {k: v for k, v in (("study", study), ("series", series)) if v}
    return _search(request, qido.Level.INSTANCE, scope)


def _retrieve(request: HttpRequest, **path: str) -> HttpResponseBase:
    """WADO-RS retrieve (PS3.18 §10.4): the Part 10 files as multipart/related parts,
    streamed from disk."""
    share = _granted_share(request)
    instances = _scope(share, **path)
    accepted = media.accepts_multipart(request.headers.get("Accept"), media.DICOM)
    if accepted is None:
        return _not_acceptable()
    _record_view(request, share, path["study"])
    ordered = list(
        instances.order_by("series__series_number", "series_id", "instance_number", "pk")
    )
    # No transfer-syntax parameter means Explicit VR Little Endian (PS3.18 §8.7.3.5.2); "*"
    # means as stored: the PACS's bytes unchanged.
    wanted = accepted.params.get("transfer-syntax", str(ExplicitVRLittleEndian))
    if wanted == "*":
        transfer_syntax = None
    elif wanted == ExplicitVRLittleEndian or all(i.transfer_syntax_uid == wanted for i in ordered):
        transfer_syntax = wanted
    else:
        return _not_acceptable()
    parts = multipart.dicom_parts(ordered, transfer_syntax=transfer_syntax)
    return StreamingHttpResponse(parts.chunks(), content_type=parts.content_type)


@require_GET
def wado_study(request: HttpRequest, study: str) -> HttpResponseBase:
    return _retrieve(request, study=study)


@require_GET
def wado_series(request: HttpRequest, study: str, series: str) -> HttpResponseBase:
    return _retrieve(request, study=study, series=series)


@require_GET
def wado_instance(request: HttpRequest, study: str, series: str, instance: str) -> HttpResponseBase:
    return _retrieve(request, study=study, series=series, instance=instance)


def _metadata(request: HttpRequest, **path: str) -> HttpResponse:
    """WADO-RS metadata (PS3.18 §10.4.1.1.2): the stored DICOM JSON of each instance, joined
    as they are (rows, not model objects: a CT study is hundreds of them)."""
    share = _granted_share(request)
    rows = list(
        _scope(share, **path)
        .order_by("series__series_number", "series_id", "instance_number", "pk")
        .values_list("pk", "series__series_instance_uid", "sop_instance_uid", "metadata")
    )
    media_type = media.accepts_json(request.headers.get("Accept"))
    if media_type is None:
        return _not_acceptable()
    _record_view(request, share, path["study"])
    missing = [pk for pk, _series, _sop, document in rows if not document]
    if missing:
        # Pushed by a modality and never asked for yet: computed once, kept for next time.
        computed = Instance.objects.filter(pk__in=missing).order_by("pk")
        filled = dict(
            zip(sorted(missing), metadata.instances_metadata(list(computed)), strict=True)
        )
        rows = [(pk, se, sop, doc or filled[pk]) for pk, se, sop, doc in rows]
    series_urls: dict[str, str] = {}
    documents = []
    for _pk, series_uid, sop_uid, document in rows:
        if series_uid not in series_urls:
            series_urls[series_uid] = _rs_url(request, path["study"], series_uid)
        # PS3.18 §10.4.1: an instance's resource is its series' followed by /instances/{uid}.
        instance_url = f"{series_urls[series_uid]}/instances/{sop_uid}"
        documents.append(
            document.replace(metadata.STORED_BULK_PREFIX, metadata.bulk_prefix(instance_url))
        )
    return HttpResponse(f"[{','.join(documents)}]", content_type=media_type)


@require_GET
def metadata_study(request: HttpRequest, study: str) -> HttpResponse:
    return _metadata(request, study=study)


@require_GET
def metadata_series(request: HttpRequest, study: str, series: str) -> HttpResponse:
    return _metadata(request, study=study, series=series)


@require_GET
def metadata_instance(request: HttpRequest, study: str, series: str, instance: str) -> HttpResponse:
    return _metadata(request, study=study, series=series, instance=instance)


@require_GET
def bulkdata(
    request: HttpRequest, study: str, series: str, instance: str, path: str
) -> HttpResponse:
    """The value a metadata BulkDataURI points at, as one application/octet-stream part."""
    share = _granted_share(request)
    stored = _instance(share, study, series, instance)
    if media.accepts_multipart(request.headers.get("Accept"), media.OCTET_STREAM) is None:
        return _not_acceptable()
    value = metadata.bulk_value(instance_file(stored), path)
    if value is None:
        raise Http404
    parts = multipart.octet_parts([value])
    return HttpResponse(b"".join(parts.chunks()), content_type=parts.content_type)


# Frames one request may ask for, and the pixel bytes they may hold: a viewer asks for one or a
# few; a list of thousands (repeats included) would hold gigabytes in the serving process.
MAX_FRAMES_PER_REQUEST = 64
MAX_FRAME_BYTES_PER_REQUEST = 256 * 1024 * 1024


def _frame_numbers(text: str, stored: Instance) -> list[int]:
    numbers = text.split(",")
    if not all(n.isdigit() and len(n) <= 9 for n in numbers):
        raise rendering.InvalidParameterError("frames: expected frame numbers separated by commas.")
    values = [int(n) for n in numbers]
    if len(values) > MAX_FRAMES_PER_REQUEST or len(set(values)) != len(values):
        raise rendering.InvalidParameterError(
            f"frames: at most {MAX_FRAMES_PER_REQUEST} frames, each once."
        )
    # Samples and bytes per sample are not in the index: 3 samples of 2 bytes is the most.
    if (stored.rows or 0) * (stored.columns or 0) * 6 * len(values) > MAX_FRAME_BYTES_PER_REQUEST:
        raise rendering.InvalidParameterError("frames: too many frames of this size at once.")
    return values


@require_GET
def frames(
    request: HttpRequest, study: str, series: str, instance: str, numbers: str
) -> HttpResponse:
    """WADO-RS frames (PS3.18 §10.4.1.1.3): pixel data as application/octet-stream parts,
    uncompressed little endian unless `transfer-syntax=*` asks for the stored encoding."""
    share = _granted_share(request)
    stored = _instance(share, study, series, instance)
    accepted = media.accepts_multipart(request.headers.get("Accept"), media.OCTET_STREAM)
    if accepted is None:
        return _not_acceptable()
    wanted = accepted.params.get("transfer-syntax", str(ExplicitVRLittleEndian))
    as_stored = wanted in {"*", stored.transfer_syntax_uid}
    if not as_stored and wanted != ExplicitVRLittleEndian:
        return _not_acceptable()
    path = instance_file(stored)
    try:
        wanted_frames = _frame_numbers(numbers, stored)
        if as_stored:
            values, syntax = metadata.stored_frames(path, wanted_frames), stored.transfer_syntax_uid
        else:
            values = [rendering.uncompressed_frame_bytes(path, n) for n in wanted_frames]
            syntax = str(ExplicitVRLittleEndian)
    except rendering.InvalidParameterError as exc:
        return _bad_request(str(exc))
    except (rendering.NotAnImageError, rendering.NoSuchFrameError, metadata.NoSuchFrame):
        raise Http404 from None
    parts = multipart.octet_parts(values, transfer_syntax=syntax)
    return HttpResponse(b"".join(parts.chunks()), content_type=parts.content_type)


def _rendered(request: HttpRequest, stored: Instance, frame_number: int) -> HttpResponse:
    """PS3.18 §10.4.1.1.4: one frame as a consumer image, with the window and viewport asked."""
    media_type = media.accepts_image(request.headers.get("Accept"))
    if media_type is None:
        return _not_acceptable()
    params = request.GET
    try:
        window = rendering.parse_window(params["window"]) if "window" in params else None
        viewport = rendering.parse_viewport(params["viewport"]) if "viewport" in params else None
        quality = (
            rendering.parse_quality(params["quality"])
            if "quality" in params
            else rendering.DEFAULT_QUALITY
        )
        image = rendering.render(
            instance_file(stored),
            frame_number,
            media_type=rendering.MediaType(media_type),
            window=window,
            viewport=viewport,
            quality=quality,
        )
    except rendering.InvalidParameterError as exc:
        return _bad_request(str(exc))
    except (rendering.NotAnImageError, rendering.NoSuchFrameError):
        raise Http404 from None
    return HttpResponse(image, content_type=media_type)


@require_GET
def rendered_instance(request: HttpRequest, study: str, series: str, instance: str) -> HttpResponse:
    share = _granted_share(request)
    return _rendered(request, _instance(share, study, series, instance), 1)


@require_GET
def rendered_frame(
    request: HttpRequest, study: str, series: str, instance: str, number: int
) -> HttpResponse:
    share = _granted_share(request)
    return _rendered(request, _instance(share, study, series, instance), number)


@require_GET
def thumbnail(
    request: HttpRequest, study: str, series: str | None = None, instance: str | None = None
) -> HttpResponse:
    """PS3.18 §10.4.1.1.5: a small image that stands for the instance, series or study (its
    middle image)."""
    share = _granted_share(request)
    if media.accepts_image(request.headers.get("Accept"), only_jpeg=True) is None:
        return _not_acceptable()
    candidates = list(
        _scope(share, study, series, instance)
        .filter(rows__isnull=False)
        .order_by("series__series_number", "series_id", "instance_number", "pk")
    )
    if not candidates:
        raise Http404
    try:
        image = rendering.thumbnail(instance_file(candidates[len(candidates) // 2]))
    except (rendering.NotAnImageError, rendering.NoSuchFrameError):
        raise Http404 from None
    return HttpResponse(image, content_type="image/jpeg")


# --- Study download: a ZIP with a DICOMDIR (dicomweb.archive) ----------------------------------


def _preview(instance: archive.ArchiveInstance) -> bytes | None:
    """The JPEG shown for a series in the ZIP's INDEX.HTM; None for what cannot be drawn (a
    report, a pixel encoding no decoder here reads): the archive then shows no picture."""
    try:
        return rendering.thumbnail(instance.path)
    except rendering.RenderingError:
        return None


def _download_filename(study: archive.ArchiveInstance) -> str:
    date = dicom.date_value(study.study_date)
    return f"IMAGES-{date:%Y-%m-%d}.zip" if date else "IMAGES.zip"


@require_http_methods(["GET"])  # not HEAD: a HEAD must not pack (or count) a download
def download(request: HttpRequest, study: str) -> HttpResponseBase:
    """The session's study as a ZIP streamed from the store: DICOMDIR, the instances byte for
    byte, README.TXT and INDEX.HTM in the recipient's language.

    Session only (no viewer token). Outside the share: 404 like everything else; a share that
    does not allow downloads: 403 with a page that says so. One DOWNLOAD event is recorded when
    the last byte has been taken, so a download broken off is not counted.
    """
    share = access.recipient_share(request)
    if share is None:
        raise Http404
    instances = _scope(share, study)
    if not share.allow_download:
        return render(request, "dicomweb/download_unavailable.html", {"refused": True}, status=403)
    records = selectors.archive_instances(instances)

    def on_complete() -> None:
        services.audit(
            AuditEvent.Action.DOWNLOAD,
            request=request,
            share=share,
            study=study,
            instances=len(records),
        )

    try:
        chunks = archive.study_zip(
            records, previews=_preview, language=get_language(), on_complete=on_complete
        )
    except archive.ArchiveError:
        # The index and the store disagree: said before the first byte, with a page.
        logger.exception("download of a study of share %s failed", share.pk)
        return render(request, "dicomweb/download_unavailable.html", {"refused": False}, status=500)
    response = StreamingHttpResponse(chunks, content_type="application/zip")
    response["Content-Disposition"] = content_disposition_header(
        as_attachment=True, filename=_download_filename(records[0])
    )
    return response


# --- Viewer tokens for external DICOMweb viewers (Weasis, scripts) ----------------------------
#
# A verified recipient session mints a bearer token for one study of its share: short-lived
# (settings.VIEWER_TOKEN_MINUTES), read-only (DICOMweb answers GET and HEAD only), never stored
# and checked against the share at every request (accounts.selectors.share_for_viewer_token).


def _dicomweb_root(request: HttpRequest) -> str:
    return request.build_absolute_uri(reverse("dicomweb:qido-studies").removesuffix("/studies"))


def _session_token(request: HttpRequest, study: str) -> tuple[Share, str]:
    """A new viewer token for a study of the session's share (404 outside it). A session
    only: a token never mints another, so no token outlives its minutes."""
    share = access.recipient_share(request)
    if share is None or not dicom.is_valid_uid(study):
        raise Http404
    _scope(share, study)
    token = services.viewer_token_create(share=share, study_instance_uid=study, request=request)
    return share, token


@require_POST
def viewer_token(request: HttpRequest) -> JsonResponse:
    """`POST /dicomweb/token` (field `study`, CSRF-protected like every form): a token for a
    DICOMweb client the recipient runs (RFC 6749 §5.1's field names)."""
    study = request.POST.get("study", "")
    _share, token = _session_token(request, study)
    return JsonResponse(
        {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": settings.VIEWER_TOKEN_MINUTES * 60,
            "dicomweb_url": _dicomweb_root(request),
            "study_instance_uid": study,
        }
    )


class _WeasisRedirect(HttpResponseRedirect):
    allowed_schemes = ["weasis"]


def weasis_launch_url(*, dicomweb_url: str, study: str, token: str) -> str:
    """A `weasis://` URI: Weasis's `$dicom:rs` command (load a study from a DICOMweb server,
    with a request header), URL-encoded as the Weasis protocol wants it."""
    command = (
        f'$dicom:rs --url "{dicomweb_url}" -r "studyUID={study}" -H "Authorization: Bearer {token}"'
    )
    return "weasis://" + quote(command, safe="")


@require_GET
def weasis(request: HttpRequest, study: str) -> HttpResponse:
    """Open the study in Weasis: mint a viewer token and redirect to the `weasis://` URI.

    A GET, so that it is a plain link: it changes nothing about the share, and only gives this
    session's own study, read-only and for minutes, to the viewer on this computer. Another
    site cannot use it: the session cookie is SameSite and HttpOnly, and even a navigation it
    triggers sends the token to the visitor's own Weasis, never to that site. Mail scanners and
    link previews have no session and get 404.
    """
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in {"same-origin", "none"}:
        # Another site sending the signed-in patient here would launch their Weasis and write
        # to their history: only the portal's own link (or a typed address) mints a token.
        raise Http404
    share, token = _session_token(request, study)
    # Weasis's requests carry the token, not the session: the view is recorded here.
    access.record_view(request, share=share, study_instance_uid=study)
    return _WeasisRedirect(
        weasis_launch_url(dicomweb_url=_dicomweb_root(request), study=study, token=token)
    )
