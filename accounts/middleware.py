"""Recipient sessions reach recipient URLs only, expire on time, and are never cached."""

from collections.abc import Callable

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.cache import add_never_cache_headers

from accounts import access, net, selectors, services, staff, throttle
from accounts.models import AuditEvent, Share, User

NOTICE = "recipient.notice"


class RecipientSessionMiddleware:
    """After SessionMiddleware and AuthenticationMiddleware.

    - A recipient session past its idle (15 min) or absolute (2 h) limit is ended here.
    - A recipient session asking for anything but recipient URLs (staff pages, the admin…)
      gets 404: it is bound to one share and can reach nothing else.
    - Every recipient URL but static files answers with `Cache-Control: no-store`
      (Django's never-cache headers); views do not set it themselves.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        path = request.path_info
        recipient_url = path == access.HOME_PATH or path.startswith(access.RECIPIENT_PATHS)
        if access.is_recipient_session(request):
            if not access.check_session_age(request):
                request.session[NOTICE] = "expired"
            elif not recipient_url:
                raise Http404
        response = self.get_response(request)
        if recipient_url and not path.startswith("/static/"):
            # The one place recipient answers are marked: patient data, codes, lock pages.
            add_never_cache_headers(response)
        return response


class RecipientClosureMiddleware:
    """The emergency close of recipient access (accounts.services.recipients_close). After
    SessionMiddleware, LocaleMiddleware and AuthenticationMiddleware, before
    RecipientSessionMiddleware and the views.

    - While access is closed, every recipient URL (access.CLOSED_PATHS and the home page)
      answers 503 with `Retry-After` and the maintenance page, in the visitor's language.
    - A recipient session that was live when access closed ends at its next request, whatever
      it asks for, and stays ended once access opens again.
    - Staff pages never read the state: staff work goes on.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if access.is_recipient_session(request):
            state = selectors.recipient_access(request)
            if state.last_closed_at is not None and access.started_before(
                request, state.last_closed_at
            ):
                share = Share.objects.filter(pk=int(request.session[access.SHARE])).first()
                services.audit(
                    AuditEvent.Action.SESSION_EXPIRED,
                    request=request,
                    share=share,
                    reason="recipients_closed",
                )
                access.end(request)
        if access.closes_with_recipient_access(request.path_info):
            closure = selectors.recipients_closed(request)
            if closure is not None:
                return _closed_response(request, closure)
        return self.get_response(request)


def _closed_response(request: HttpRequest, closure: selectors.Closure) -> HttpResponse:
    response = render(
        request,
        "accounts/closed.html",
        {"message": closure.message, "support_contact": settings.SUPPORT_CONTACT},
        status=503,
    )
    response["Retry-After"] = str(settings.RECIPIENTS_CLOSED_RETRY_AFTER)
    # Chosen, not a fault: no "Service Unavailable" error line per request while closed.
    response._has_been_logged = True  # type: ignore[attr-defined]
    add_never_cache_headers(response)
    return response


# The unauthenticated URLs: each request costs a lookup, a hash or a captcha image (and the
# staff sign-in, past its lockout, still an audit event).
BUDGETED_PATHS = ("/s/", "/access/", "/captcha/", "/staff/login/")


class RecipientRequestBudgetMiddleware:
    """Requests per minute from one client address to BUDGETED_PATHS, counted in the shared
    cache (settings.RECIPIENT_REQUESTS_PER_MINUTE, accounts.throttle): past it, 429 with
    Retry-After until the minute ends, before any session, lookup or hash.

    A request whose client address cannot be told is not counted here: the steps that count
    failures refuse it (accounts.net.ClientAddressUnknown)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path_info.startswith(BUDGETED_PATHS):
            key = net.client_limit_key(request)
            wait = throttle.request_budget_wait(key) if key is not None else 0
            if wait:
                response = render(request, "accounts/busy.html", {"seconds": wait}, status=429)
                response["Retry-After"] = str(wait)
                add_never_cache_headers(response)
                return response
        return self.get_response(request)


class StaffSessionMiddleware:
    """After OTPMiddleware. A signed-in staff session past its idle (30 min) or absolute (12 h)
    limit, or whose account got locked, is ended here, server side, before any view: the next
    page is the sign-in page (staff_required sends there, with a word on why)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        reason = staff.session_end_reason(request)
        if reason is not None:
            user = request.user
            services.audit(
                AuditEvent.Action.SESSION_EXPIRED,
                request=request,
                actor=user if isinstance(user, User) else None,
                reason=reason,
            )
            staff.end(request, notice="locked" if reason == "locked" else "expired")
        if _cross_site_staff_page(request):
            # A link from elsewhere (an email, another site) opens the workspace's home, never
            # a page that acts or is audited in the staff member's name (a search for a
            # patient, a handout printed, an export).
            return redirect("staff:home")
        response = self.get_response(request)
        if request.path_info.startswith(STAFF_PATH):
            # Patient data on shared ward computers: nothing of the workspace in a cache or
            # behind the back button once the session ends.
            add_never_cache_headers(response)
        return response


STAFF_PATH = "/staff/"


def _cross_site_staff_page(request: HttpRequest) -> bool:
    if not request.path_info.startswith(STAFF_PATH):
        return False
    if request.headers.get("Sec-Fetch-Site") != "cross-site":
        return False
    # The home page and the sign-in are where such a link may land (no loop).
    landing = (reverse("staff:home"), reverse("staff:login"))
    return request.get_full_path() != landing[0] and request.path_info != landing[1]
