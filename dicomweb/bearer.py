"""Viewer tokens on DICOMweb requests: `Authorization: Bearer <token>` (RFC 6750 §2.1).

An external viewer (Weasis, a script) has no session cookie; it sends the short-lived,
study-scoped token a recipient session minted for it (accounts.credentials). Only the header
form is read: a token in the query string (RFC 6750 §2.3) would end up in access logs and
proxies' caches, so `?access_token=` is never looked at.

A request that brings an Authorization header is judged by it alone: a bad, stale or revoked
token is refused with 401 and a `WWW-Authenticate: Bearer error="invalid_token"` challenge
(RFC 6750 §3.1), and never falls back to a session cookie that came along with it. A request
without the header is the session's business, as before (404 without one).
"""

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

# RFC 6750 §3: the realm names the protected space; the same for every DICOMweb resource.
CHALLENGE = 'Bearer realm="dicomweb", error="invalid_token"'


class InvalidBearerToken(Exception):
    """The request's Authorization header opens nothing (answered 401 by the middleware)."""


def bearer_token(request: HttpRequest) -> str | None:
    """The token of an `Authorization: Bearer` header; None when the request has no
    Authorization header at all. Any other header (another scheme, an empty token) raises
    InvalidBearerToken: it asked for something other than the session."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _sep, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise InvalidBearerToken
    return token


def unauthorized() -> HttpResponse:
    response = HttpResponse(
        "The bearer token is not valid (expired, revoked or not one of ours).",
        status=401,
        content_type="text/plain; charset=utf-8",
    )
    response["WWW-Authenticate"] = CHALLENGE
    return response


class BearerTokenMiddleware:
    """Turns InvalidBearerToken, raised by a DICOMweb view, into the 401 answer."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, InvalidBearerToken):
            return unauthorized()
        return None
