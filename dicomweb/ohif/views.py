"""OHIF's files for the recipient session, under /ohif/, with OHIF's own CSP.

Only a session that opened its share gets them (anything else goes to the access page, as for
the viewer page); what OHIF then asks of /dicomweb/ is scoped to that share. The files come from
settings.OHIF_DIR only: a path that leaves it, names a hidden file or goes through a link out of
it is a 404. A path without a file name extension is one of OHIF's client-side routes
(`/ohif/viewer?StudyInstanceUIDs=…`) and gets index.html. Everything is `no-store`, as all
recipient URLs (accounts.middleware).
"""

import mimetypes
from pathlib import Path

from csp.decorators import csp
from django.conf import settings
from django.core.exceptions import SuspiciousFileOperation
from django.http import FileResponse, Http404, HttpRequest, HttpResponseBase
from django.shortcuts import redirect
from django.utils._os import safe_join
from django.views.decorators.http import require_safe

from accounts import access
from dicomweb import ohif

# What OHIF needs beyond the portal's own policy (portal.settings.CONTENT_SECURITY_POLICY),
# found by loading it in Chromium (a stack, MPR, a JPEG-LS series) and reading the console's
# violations:
# - style-src 'unsafe-inline': its UI libraries set style attributes and insert <style>
#   elements. (No inline script: the installer moved the published page's into a file.)
# - img-src data: blob:: icons inlined as data: URLs, images made in the browser as blob: ones
#   (the portal's own policy allows them already).
# - worker-src 'self': its decoders run in web workers of its own files.
OHIF_CONTENT_SECURITY_POLICY = {
    **settings.CONTENT_SECURITY_POLICY["DIRECTIVES"],
    "style-src": ["'self'", "'unsafe-inline'"],
    "worker-src": ["'self'"],
}
# A web worker runs under the policy its own script is served with. OHIF's image decoders
# (JPEG, JPEG-LS, JPEG 2000, HTJ2K) are WebAssembly built with Emscripten's embind, which makes
# functions from strings: their workers need 'unsafe-eval' (which allows WebAssembly too). It
# is granted to those worker scripts only, never to the page, which has the DOM and the session.
OHIF_WORKER_CONTENT_SECURITY_POLICY = {
    **OHIF_CONTENT_SECURITY_POLICY,
    "script-src": ["'self'", "'unsafe-eval'"],
}

# Content types browsers insist on (WebAssembly streaming compilation needs application/wasm)
# whatever the system's MIME table says.
_CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".wasm": "application/wasm",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
}


def _file(path: str) -> Path | None:
    """The file under OHIF's folder that `path` names, or None."""
    root = ohif.directory().resolve()
    if any(part.startswith(".") for part in path.split("/")) or "\\" in path:
        return None
    try:
        candidate = Path(safe_join(str(root), path)).resolve()
    except (SuspiciousFileOperation, ValueError, OSError):
        return None
    if not candidate.is_relative_to(root):
        return None
    try:
        return candidate if candidate.is_file() else None
    except (ValueError, OSError):  # e.g. a NUL byte in the name
        return None


def _is_route(path: str) -> bool:
    return "." not in path.rsplit("/", 1)[-1]


def _content_type(file: Path) -> str:
    known = _CONTENT_TYPES.get(file.suffix.lower())
    if known:
        return known
    guessed, _encoding = mimetypes.guess_type(file.name)
    return guessed or "application/octet-stream"


@require_safe
def ohif_file(request: HttpRequest) -> HttpResponseBase:
    if access.recipient_share(request) is None:
        return redirect("accounts:access")
    file = _requested_file(request)
    if file.parent == ohif.directory().resolve() and file.name in ohif.worker_scripts():
        return _worker_script(request)
    return _page_file(request)


def _requested_file(request: HttpRequest) -> Path:
    # The path as Django decoded it (%2e%2e and the like are dots here, and refused below).
    path = request.path_info.removeprefix(ohif.MOUNT)
    file = _file(path) if path else None
    if file is None and _is_route(path):
        file = _file("index.html")
    if file is None:
        raise Http404
    return file


def _file_response(request: HttpRequest) -> HttpResponseBase:
    file = _requested_file(request)
    return FileResponse(file.open("rb"), content_type=_content_type(file))


@csp(OHIF_CONTENT_SECURITY_POLICY)
def _page_file(request: HttpRequest) -> HttpResponseBase:
    return _file_response(request)


@csp(OHIF_WORKER_CONTENT_SECURITY_POLICY)
def _worker_script(request: HttpRequest) -> HttpResponseBase:
    return _file_response(request)
