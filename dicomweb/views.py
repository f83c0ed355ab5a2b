"""What recipients get: the viewer page of a recipient session, and share-scoped DICOMweb
(which the viewer, OHIF and Weasis read). Both build on the same share check."""

import datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.db.models import QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)
from django.shortcuts import render
from django.urls import NoReverseMatch, reverse
from django.views.decorators.http import require_GET
from pydicom.uid import ExplicitVRLittleEndian

from accounts import access, services
from accounts.models import AuditEvent, Share
from dicomweb import media, multipart, qido, rendering, selectors
from studies import metadata
from studies.models import Instance
from studies.store import instance_file


def _dicom_date(value: str) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        return None


def _person_name(value: str) -> str:
    # DICOM PN: Family^Given^Middle^Prefix^Suffix, with "=" separating ideographic forms.
    family, _sep, rest = value.split("=", 1)[0].partition("^")
    given = rest.split("^", 1)[0]
    return " ".join(part for part in (given, family) if part)


# The viewport of the rendered frames the viewer asks for, as one side of a square: the first
# image is in the page before any script knows the screen, and viewer.js picks the same size on
# most screens (a phone's 375 px at 2 or 3 device pixels per CSS pixel), so that first request
# serves its slice. Frames are never enlarged: a 512×512 CT comes at its own size.
VIEWER_VIEWPORT = 1024


def _ohif_available() -> bool:
    # OHIF is optional (`make ohif`); the setting may not even exist.
    folder = getattr(settings, "OHIF_DIR", None)
    return folder is not None and (Path(folder) / "index.html").is_file()


def _weasis_url(study_uid: str) -> str | None:
    for kwargs in ({"study": study_uid}, {}):
        try:
            return reverse("dicomweb:weasis", kwargs=kwargs)
        except NoReverseMatch:
            continue
    return None


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
    if studies and not request.session.get("recipient.viewed"):
        # One event per session, not one per page load.
        services.audit(AuditEvent.Action.VIEW, request=request, share=share)
        request.session["recipient.viewed"] = True
    shown = [(study, s) for study in studies for s in study.series if s.displayable]
    study = studies[0] if studies else None
    return render(
        request,
        "dicomweb/viewer.html",
        {
            "share": share,
            "studies": studies,
            "study": study,
            "patient_name": _person_name(study.patient_name) if study else "",
            "study_date": _dicom_date(study.study_date) if study else None,
            "first_series": shown[0][1] if shown else None,
            "first_image_url": _first_image_url(*shown[0]) if shown else None,
            "viewer_data": {
                "series": [_viewer_series(*pair) for pair in shown],
                "viewport": VIEWER_VIEWPORT,
            },
            "download_url": (
                f"/download/{study.study_instance_uid}.zip"
                if study is not None and share.allow_download
                else None
            ),
            "ohif_url": (
                f"/ohif/viewer?{urlencode({'StudyInstanceUIDs': study.study_instance_uid})}"
                if study is not None and _ohif_available()
                else None
            ),
            "weasis_url": _weasis_url(study.study_instance_uid) if study else None,
        },
    )


# --- DICOMweb (PS3.18) for the session's share ------------------------------------------------
#
# Every view answers for the share of the recipient session only; anything outside it (another
# study, a series the share leaves out, a made-up UID) is the same 404 as what does not exist.


def _granted_share(request: HttpRequest) -> Share:
    share = access.recipient_share(request)
    if share is None:
        raise Http404
    return share


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
    share = _granted_share(request)
    media_type = media.accepts_json(request.headers.get("Accept"))
    if media_type is None:
        return _not_acceptable()
    granted = selectors.share_instances(share)
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
    """WADO-RS metadata (PS3.18 §10.4.1.1.2): the stored DICOM JSON of each instance."""
    share = _granted_share(request)
    instances = list(
        _scope(share, **path)
        .select_related("series__study")
        .order_by("series__series_number", "series_id", "instance_number", "pk")
    )
    media_type = media.accepts_json(request.headers.get("Accept"))
    if media_type is None:
        return _not_acceptable()
    documents = metadata.instances_metadata(instances)
    body = ",".join(
        document.replace(
            metadata.STORED_BULK_PREFIX,
            metadata.bulk_prefix(
                _rs_url(
                    request,
                    instance.series.study.study_instance_uid,
                    instance.series.series_instance_uid,
                    instance.sop_instance_uid,
                )
            ),
        )
        for instance, document in zip(instances, documents, strict=True)
    )
    return HttpResponse(f"[{body}]", content_type=media_type)


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
    stored = _scope(share, study=study, series=series, instance=instance).get()
    if media.accepts_multipart(request.headers.get("Accept"), media.OCTET_STREAM) is None:
        return _not_acceptable()
    value = metadata.bulk_value(instance_file(stored), path)
    if value is None:
        raise Http404
    parts = multipart.octet_parts([value])
    return HttpResponse(b"".join(parts.chunks()), content_type=parts.content_type)


def _frame_numbers(text: str) -> list[int]:
    numbers = text.split(",")
    if not all(n.isdigit() and len(n) <= 9 for n in numbers):
        raise rendering.InvalidParameterError("frames: expected frame numbers separated by commas.")
    return [int(n) for n in numbers]


@require_GET
def frames(
    request: HttpRequest, study: str, series: str, instance: str, numbers: str
) -> HttpResponse:
    """WADO-RS frames (PS3.18 §10.4.1.1.3): pixel data as application/octet-stream parts,
    uncompressed little endian unless `transfer-syntax=*` asks for the stored encoding."""
    share = _granted_share(request)
    stored = _scope(share, study=study, series=series, instance=instance).get()
    accepted = media.accepts_multipart(request.headers.get("Accept"), media.OCTET_STREAM)
    if accepted is None:
        return _not_acceptable()
    wanted = accepted.params.get("transfer-syntax", str(ExplicitVRLittleEndian))
    as_stored = wanted in {"*", stored.transfer_syntax_uid}
    if not as_stored and wanted != ExplicitVRLittleEndian:
        return _not_acceptable()
    path = instance_file(stored)
    try:
        wanted_frames = _frame_numbers(numbers)
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
    return _rendered(request, _scope(share, study, series, instance).get(), 1)


@require_GET
def rendered_frame(
    request: HttpRequest, study: str, series: str, instance: str, number: int
) -> HttpResponse:
    share = _granted_share(request)
    return _rendered(request, _scope(share, study, series, instance).get(), number)


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
