from django.urls import path, re_path, register_converter

from dicomweb import views
from dicomweb.ohif import views as ohif_views

app_name = "dicomweb"


class UidConverter:
    """A DICOM UID in a path: digits and dots, at most 64 characters (PS3.5 §9.1). Anything
    else matches no URL, and so gets the same 404 as a UID the share does not grant."""

    regex = r"[0-9.]{1,64}"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(UidConverter, "uid")

_STUDY = "dicomweb/studies/<uid:study>"
_SERIES = _STUDY + "/series/<uid:series>"
_INSTANCE = _SERIES + "/instances/<uid:instance>"
_FRAME = _INSTANCE + "/frames/<int:number>"

urlpatterns = [
    path("viewer/", views.viewer, name="viewer"),
    # What is not an image (dicomweb.documents): an encapsulated PDF, a structured report.
    path(
        "viewer/document/<uid:study>/<uid:series>/<uid:instance>.pdf",
        views.document,
        name="document",
    ),
    path("viewer/report/<uid:study>/<uid:series>/<uid:instance>", views.report, name="report"),
    # QIDO-RS (PS3.18 §10.6)
    path("dicomweb/studies", views.qido_studies, name="qido-studies"),
    path("dicomweb/series", views.qido_series, name="qido-all-series"),
    path("dicomweb/instances", views.qido_instances, name="qido-all-instances"),
    path(_STUDY + "/series", views.qido_series, name="qido-series"),
    path(_STUDY + "/instances", views.qido_instances, name="qido-study-instances"),
    path(_SERIES + "/instances", views.qido_instances, name="qido-instances"),
    # WADO-RS (PS3.18 §10.4)
    path(_STUDY, views.wado_study, name="rs-study"),
    path(_SERIES, views.wado_series, name="rs-series"),
    path(_INSTANCE, views.wado_instance, name="rs-instance"),
    path(_STUDY + "/metadata", views.metadata_study, name="rs-study-metadata"),
    path(_SERIES + "/metadata", views.metadata_series, name="rs-series-metadata"),
    path(_INSTANCE + "/metadata", views.metadata_instance, name="rs-instance-metadata"),
    path(_INSTANCE + "/bulk/<path:path>", views.bulkdata, name="rs-bulkdata"),
    path(_INSTANCE + "/frames/<str:numbers>", views.frames, name="rs-frames"),
    path(_INSTANCE + "/rendered", views.rendered_instance, name="rs-rendered"),
    path(
        _INSTANCE + "/frames/<int:number>/rendered", views.rendered_frame, name="rs-rendered-frame"
    ),
    path(_STUDY + "/thumbnail", views.thumbnail, name="rs-study-thumbnail"),
    path(_SERIES + "/thumbnail", views.thumbnail, name="rs-series-thumbnail"),
    path(_INSTANCE + "/thumbnail", views.thumbnail, name="rs-thumbnail"),
    # The study download, viewer tokens for external DICOMweb clients, the Weasis launch.
    path("download/<uid:study>.zip", views.download, name="download"),
    path("dicomweb/token", views.viewer_token, name="token"),
    path("viewer/weasis/<uid:study>", views.weasis, name="weasis"),
    # OHIF (dicomweb.ohif), when installed: its files, and index.html for its own routes.
    re_path(r"^ohif/", ohif_views.ohif_file, name="ohif"),
]
