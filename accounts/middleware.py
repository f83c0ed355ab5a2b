"""Recipient sessions reach recipient URLs only, expire on time, and are never cached."""

from collections.abc import Callable

from django.http import Http404, HttpRequest, HttpResponse
from django.utils.cache import add_never_cache_headers

from accounts import access

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
