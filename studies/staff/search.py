"""The workspace's home: search the PACS nodes and the local archive at once (the search
itself is the selector studies.search; each search is audited)."""

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path
from django.views.decorators.http import require_GET

from accounts import services as account_services
from accounts.models import AuditEvent, User
from accounts.staff import home_url, role_allows, staff_required
from studies.search import LOCAL, QueryError, SearchResult, studies_search
from studies.staff.forms import SearchForm


@staff_required()
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    user = request.user
    assert isinstance(user, User)  # staff_required
    if not role_allows(user, User.Role.SHARER):
        # The workspace's address is everyone's way in (a bookmark, a link from elsewhere):
        # an auditor lands on the audit log, not on a refusal.
        return redirect(home_url(user))
    # A search is a GET (a bookmarkable, repeatable read); an empty form is the start page.
    searched = bool(request.GET)
    form = SearchForm(request.GET if searched else None)
    result: SearchResult | None = None
    problem = ""
    if searched and form.is_valid():
        query = form.query()
        try:
            result = studies_search(query)
        except QueryError as exc:
            problem = str(exc)
        else:
            account_services.audit(
                AuditEvent.Action.STUDY_SEARCH,
                request=request,
                criteria={key: str(value) for key, value in query.dicom_filters().items()},
                matches=len(result.studies),
                sources={s.name: (s.matches if s.answered else None) for s in result.sources},
            )
    return render(
        request,
        "studies/staff/search.html",
        {
            "staff_section": "search",
            "form": form,
            "result": result,
            "problem": problem,
            "local": LOCAL,
        },
    )


urlpatterns = [
    path("", home, name="home"),
]
