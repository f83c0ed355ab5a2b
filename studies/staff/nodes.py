"""PACS nodes (administrators): list, add, edit, remove; a C-ECHO; and the check of the way
back, which asks a node to C-MOVE a made-up study to the portal and tells, in words, whether the
node knows where the portal is. Every change needs a recent second factor.

Thin views over studies.services; the checks' answers are turned into sentences here, for the
people who read them."""

from urllib.parse import urlsplit

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import path
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts.models import User
from accounts.staff import recent_second_factor_required, staff_required
from studies import selectors, services
from studies.dimse.pacs import WayBack, WayBackCheck
from studies.models import PacsNode
from studies.staff.node_forms import PacsNodeForm


def _staff_user(request: HttpRequest) -> User:
    # staff_required has checked it.
    assert isinstance(request.user, User)
    return request.user


def _add_errors(form: PacsNodeForm, exc: ValidationError) -> None:
    for field, errors in exc.message_dict.items():
        form.add_error(field if field in form.fields else None, errors)


@staff_required(User.Role.ADMIN)
@require_GET
def node_list(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "studies/staff/nodes_list.html",
        {
            "staff_section": "nodes",
            "nodes": selectors.pacs_node_list(),
            "portal_ae_title": settings.DICOM_AE_TITLE,
            "portal_address": _portal_address(),
        },
    )


@staff_required(User.Role.ADMIN)
@require_http_methods(["GET", "POST"])
@recent_second_factor_required
def node_add(request: HttpRequest) -> HttpResponse:
    form = PacsNodeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            node = services.pacs_node_create(
                **form.cleaned_data, by=_staff_user(request), request=request
            )
        except ValidationError as exc:
            _add_errors(form, exc)
        else:
            messages.success(request, _("The node %(name)s is added.") % {"name": node.name})
            return redirect("staff:nodes")
    return render(
        request,
        "studies/staff/nodes_form.html",
        {"staff_section": "nodes", "form": form, "node": None},
    )


@staff_required(User.Role.ADMIN)
@require_http_methods(["GET", "POST"])
@recent_second_factor_required
def node_edit(request: HttpRequest, pk: int) -> HttpResponse:
    node = get_object_or_404(PacsNode, pk=pk)
    form = PacsNodeForm(request.POST) if request.method == "POST" else PacsNodeForm.of(node)
    if request.method == "POST" and form.is_valid():
        try:
            node = services.pacs_node_update(
                node=node, **form.cleaned_data, by=_staff_user(request), request=request
            )
        except ValidationError as exc:
            _add_errors(form, exc)
        else:
            messages.success(request, _("The node %(name)s is saved.") % {"name": node.name})
            return redirect("staff:nodes")
    return render(
        request,
        "studies/staff/nodes_form.html",
        {"staff_section": "nodes", "form": form, "node": node},
    )


@staff_required(User.Role.ADMIN)
@require_http_methods(["GET", "POST"])
@recent_second_factor_required
def node_remove(request: HttpRequest, pk: int) -> HttpResponse:
    """GET: what removing the node does, and a button; POST: remove it (refused while
    retrieval jobs from it are queued or running)."""
    node = get_object_or_404(PacsNode, pk=pk)
    if request.method == "POST":
        try:
            services.pacs_node_delete(node=node, by=_staff_user(request), request=request)
        except services.PacsNodeInUse as exc:
            messages.error(
                request,
                _(
                    "The node %(name)s is still in use: %(jobs)d retrievals from it are "
                    "queued or running. Remove it once they are done."
                )
                % {"name": node.name, "jobs": exc.jobs},
            )
            return redirect("staff:node_remove", pk=node.pk)
        messages.success(request, _("The node %(name)s is removed.") % {"name": node.name})
        return redirect("staff:nodes")
    return render(
        request,
        "studies/staff/nodes_remove.html",
        {
            "staff_section": "nodes",
            "node": node,
            "jobs": selectors.pacs_node_jobs_unfinished(node),
        },
    )


@staff_required(User.Role.ADMIN)
@require_POST
def node_echo(request: HttpRequest, pk: int) -> HttpResponse:
    node = get_object_or_404(PacsNode, pk=pk)
    result = services.pacs_node_echo(node=node, by=_staff_user(request), request=request)
    facts = {"name": node.name, "peer": f"{node.ae_title}@{node.host}:{node.port}"}
    if result.ok:
        messages.success(request, _("%(name)s answered: the portal can reach it.") % facts)
    else:
        messages.error(
            request,
            _(
                "%(name)s did not answer (%(peer)s). Check its host, port and AE title, that it "
                "is switched on, and that it accepts the portal's AE title %(portal)s. "
                "Details: %(detail)s"
            )
            % {**facts, "portal": settings.DICOM_AE_TITLE, "detail": result.detail},
        )
    return redirect("staff:nodes")


@staff_required(User.Role.ADMIN)
@require_POST
def node_check_way_back(request: HttpRequest, pk: int) -> HttpResponse:
    node = get_object_or_404(PacsNode, pk=pk)
    result = services.pacs_node_check_way_back(node=node, by=_staff_user(request), request=request)
    if result.check is None:
        messages.error(
            request,
            _(
                "The check could not be made: %(name)s did not answer (%(detail)s). Try the "
                "C-ECHO button first."
            )
            % {"name": node.name, "detail": result.detail},
        )
    elif result.check.outcome == WayBack.KNOWN:
        messages.success(request, way_back_sentence(node, result.check))
    else:
        messages.error(request, way_back_sentence(node, result.check))
    return redirect("staff:nodes")


def _portal_address() -> str:
    """Where a PACS sends images to the portal: this server's name and its DICOM port."""
    host = urlsplit(settings.BASE_URL).hostname or "?"
    return f"{host}:{settings.DICOM_PORT}"


def way_back_sentence(node: PacsNode, check: WayBackCheck) -> str:
    """The outcome of the check of the way back, in words a radiology secretary can pass on
    to whoever runs the PACS."""
    facts = {
        "name": node.name,
        "portal": check.destination,
        "address": _portal_address(),
        "aet": node.ae_title,
        "status": f"0x{check.status:04X}" if check.status is not None else "—",
    }
    sentences = {
        WayBack.KNOWN: _(
            "%(name)s knows the way back: it takes requests from the portal's AE title "
            "%(portal)s and did not refuse it as a destination. (Some PACSs look at the "
            "address only when there are images to send: the first retrieval confirms it.)"
        ),
        WayBack.DESTINATION_UNKNOWN: _(
            "%(name)s does not know the portal's AE title %(portal)s as a destination: it "
            "cannot send images back. Declare %(portal)s at %(address)s on the PACS."
        ),
        WayBack.PORTAL_UNKNOWN: _(
            "%(name)s does not know the portal's AE title %(portal)s: it refused the "
            "portal's request and cannot send images back. Declare %(portal)s at "
            "%(address)s on the PACS."
        ),
        WayBack.CALLED_AE_WRONG: _(
            "%(name)s refused the portal, saying its own AE title is not %(aet)s: check the "
            "node's AE title here, and that the PACS knows the portal's AE title %(portal)s "
            "(some PACSs answer this way to an AE title they do not know)."
        ),
        WayBack.NO_MOVE: _(
            "%(name)s does not offer C-MOVE: choose C-GET or WADO-RS as its retrieve method."
        ),
        WayBack.REFUSED: _(
            "%(name)s refused the request (status %(status)s): ask whoever runs the PACS to "
            "look at its log."
        ),
    }
    return sentences[check.outcome] % facts


urlpatterns = [
    path("nodes/", node_list, name="nodes"),
    path("nodes/add/", node_add, name="node_add"),
    path("nodes/<int:pk>/edit/", node_edit, name="node_edit"),
    path("nodes/<int:pk>/remove/", node_remove, name="node_remove"),
    path("nodes/<int:pk>/echo/", node_echo, name="node_echo"),
    path("nodes/<int:pk>/way-back/", node_check_way_back, name="node_check_way_back"),
]
