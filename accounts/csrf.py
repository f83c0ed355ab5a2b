"""CSRF protection that works with `Referrer-Policy: no-referrer`.

Every page is served with `no-referrer`, so that no URL of the portal ever reaches another site.
With that policy browsers post forms with `Origin: null` and no Referer, which Django's
middleware takes for a foreign origin (or, over HTTPS, a missing Referer). Here a `null` origin
and a missing Referer are not held against a request; everything else stands: a real foreign
Origin or Referer is refused, and the CSRF token must match the CSRF cookie, which browsers do
not send with cross-site posts (SameSite) and which no other site can set (`__Host-`, HSTS).

A `null` origin is also what a sandboxed frame or a `data:` page sends. Browsers that say where
a request comes from (`Sec-Fetch-Site`) are held to it: with a `null` origin, only
`same-origin` (our own pages) and `none` (typed or bookmarked by the user) pass.
"""

from django.http import HttpRequest
from django.middleware.csrf import CsrfViewMiddleware

_OWN_SITE = {"same-origin", "none"}


class NoReferrerCsrfViewMiddleware(CsrfViewMiddleware):
    def _origin_verified(self, request: HttpRequest) -> bool:
        if request.META.get("HTTP_ORIGIN") == "null":
            site = request.META.get("HTTP_SEC_FETCH_SITE")
            return site is None or site in _OWN_SITE
        return super()._origin_verified(request)  # type: ignore[misc]

    def _check_referer(self, request: HttpRequest) -> None:
        if not request.META.get("HTTP_REFERER"):
            return
        super()._check_referer(request)  # type: ignore[misc]
