"""Fetch, check and adapt the published OHIF build (the `dist/` folder of `@ohif/app`).

The tarball comes from the npm registry through the npm client (`npm pack`), and nothing of it
is used before its SHA-512 matches the pinned integrity string. The build is made to be served
from `/` with a demo data source; the portal serves it from /ohif/ with its own DICOMweb, so:

- index.html is replaced by one the portal writes: the same bundles under /ohif/, and none of
  the published page's inline scripts (the portal's CSP allows no inline script) nor its
  service worker, manifest or icon links;
- app-config.js is replaced by one the portal writes: one data source, the portal's /dicomweb/
  on the page's own origin, and the router under /ohif;
- the bundles' public path (where webpack's runtime loads chunks, workers and WebAssembly from)
  is changed from "/" to "/ohif/";
- what the portal never serves (service worker, other deployments' configurations, the OpenID
  Connect helpers, source maps) is left out.

The new build is made beside the old one and swapped in at the end: a failure leaves the
installed version as it was.
"""

import base64
import hashlib
import hmac
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dicomweb import ohif

NPM_TIMEOUT = 600  # seconds; the tarball is about 50 MB

# Files of the published build that the portal does not serve.
_LEFT_OUT = {
    "_headers",
    "_redirects",
    "serve.json",
    "sw.js",
    "init-service-worker.js",
    "google.js",
    "oidc-client.min.js",
    "silent-refresh.html",
    "manifest.json",
}
_LEFT_OUT_SUFFIXES = (".map",)

# index.html of the published build: its deferred bundles and its style sheets.
_SCRIPT = re.compile(r'<script defer(?:="defer")? src="/([\w.-]+\.js)"></script>')
_STYLE = re.compile(r'<link href="/([\w.-]+\.css)" rel="stylesheet">')
# webpack's runtime: where chunks, workers and WebAssembly are loaded from.
_PUBLIC_PATH = '__webpack_require__.p = "/";'
# Style sheets: files named from the root (fonts), as in `url(/a34f9d1faa5f3315.woff2)`.
_CSS_ROOT_URL = re.compile(r"""url\((["']?)/(?!/)""")


class OhifInstallError(Exception):
    """The package could not be fetched, does not match its pin, or is not the expected build."""


@dataclass(frozen=True)
class Pin:
    version: str
    integrity: str


PINNED = Pin(version=ohif.VERSION, integrity=ohif.INTEGRITY)


def installed_pin(folder: Path) -> Pin | None:
    try:
        data = json.loads((folder / ohif.MARKER).read_text())
        return Pin(version=str(data["version"]), integrity=str(data["integrity"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ohif_install(
    *,
    target: Path | None = None,
    pin: Pin = PINNED,
    tarball: Path | None = None,
    force: bool = False,
) -> bool:
    """Install OHIF into `target` (settings.OHIF_DIR); False when that pin is already there.

    `tarball`: a package file already at hand instead of asking the registry (checked all the
    same).
    """
    target = target or ohif.directory()
    if not force and installed_pin(target) == pin and (target / "index.html").is_file():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ohif-", dir=target.parent) as work_dir:
        work = Path(work_dir)
        if tarball is None:
            tarball = npm_pack(pin.version, work)
        verify_integrity(tarball, pin.integrity)
        build = extract_dist(tarball, work / "extract")
        workers = adapt_build(build, version=pin.version)
        (build / ohif.MARKER).write_text(
            json.dumps({"version": pin.version, "integrity": pin.integrity, "workers": workers})
        )
        _swap(build, target, work)
    return True


def npm_pack(version: str, into: Path) -> Path:
    """The package tarball as the registry serves it, through the npm client."""
    npm = shutil.which("npm")
    if npm is None:
        raise OhifInstallError("npm is needed to fetch OHIF (Debian: apt-get install npm)")
    try:
        done = subprocess.run(
            [
                npm,
                "pack",
                f"{ohif.PACKAGE}@{version}",
                "--ignore-scripts",
                "--json",
                "--pack-destination",
                str(into),
            ],
            cwd=into,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise OhifInstallError(f"npm pack took more than {NPM_TIMEOUT} s") from exc
    if done.returncode != 0:
        raise OhifInstallError(f"npm pack failed: {done.stderr.strip()[-500:]}")
    try:
        filename = json.loads(done.stdout)[0]["filename"]
    except (ValueError, LookupError, TypeError) as exc:
        raise OhifInstallError("npm pack did not say which file it wrote") from exc
    # npm writes a scoped package's tarball as "ohif-app-<version>.tgz".
    path = into / Path(str(filename)).name
    if not path.is_file():
        raise OhifInstallError(f"npm pack wrote no {path.name}")
    return path


def verify_integrity(tarball: Path, integrity: str) -> None:
    """Compare the file with a Subresource Integrity string ("sha512-<base64>"), as npm does."""
    algorithm, _, expected = integrity.partition("-")
    if algorithm != "sha512" or not expected:
        raise OhifInstallError(f"the pinned integrity is not a sha512 one: {integrity!r}")
    digest = hashlib.sha512()
    with tarball.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    actual = base64.b64encode(digest.digest()).decode()
    if not hmac.compare_digest(actual, expected):
        raise OhifInstallError(
            f"{tarball.name} does not match the pinned checksum: "
            f"expected sha512-{expected}, got sha512-{actual}"
        )


def extract_dist(tarball: Path, into: Path) -> Path:
    """The package's dist/ folder, less what the portal does not serve. Tar's "data" filter
    refuses absolute names, links out of the folder, devices and odd permissions."""
    prefix = "package/dist/"
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            members = [
                m
                for m in archive.getmembers()
                if m.name.startswith(prefix)
                and (m.isfile() or m.isdir())
                and not _left_out(m.name[len(prefix) :])
            ]
            archive.extractall(into, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise OhifInstallError(f"{tarball.name} is not a readable package: {exc}") from exc
    build = into / "package" / "dist"
    if not (build / "index.html").is_file():
        raise OhifInstallError(f"{tarball.name} has no dist/index.html: not an OHIF build")
    return build


def _left_out(name: str) -> bool:
    return name in _LEFT_OUT or name.endswith(_LEFT_OUT_SUFFIXES)


def adapt_build(build: Path, *, version: str) -> list[str]:
    """Adapt the build to /ohif/; return its web workers' scripts (the bundles, other than the
    page's, that start a webpack runtime of their own)."""
    published = (build / "index.html").read_text(encoding="utf-8")
    scripts = _SCRIPT.findall(published)
    styles = _STYLE.findall(published)
    if not scripts:
        raise OhifInstallError("index.html loads no bundle: not the expected OHIF build")
    workers = sorted(set(_rewrite_public_path(build)) - set(scripts))
    for sheet in build.glob("*.css"):
        text = sheet.read_text(encoding="utf-8")
        sheet.write_text(_CSS_ROOT_URL.sub(rf"url(\1{ohif.MOUNT}", text), encoding="utf-8")
    (build / "index.html").write_text(_index_html(scripts, styles), encoding="utf-8")
    (build / "app-config.js").write_text(_app_config(version), encoding="utf-8")
    (build / SETUP_SCRIPT).write_text(_setup_script(), encoding="utf-8")
    return workers


def _rewrite_public_path(build: Path) -> list[str]:
    changed = []
    for bundle in build.glob("*.js"):
        text = bundle.read_text(encoding="utf-8")
        count = text.count(_PUBLIC_PATH)
        if count == 0:
            continue
        if count > 1:
            raise OhifInstallError(f"{bundle.name} sets webpack's public path {count} times")
        bundle.write_text(
            text.replace(_PUBLIC_PATH, f"__webpack_require__.p = {json.dumps(ohif.MOUNT)};"),
            encoding="utf-8",
        )
        changed.append(bundle.name)
    if not changed:
        raise OhifInstallError("no bundle sets webpack's public path: not the expected build")
    return changed


# Set before the bundles run: where OHIF is mounted, and the import function its extensions
# call (the published page defines both in inline scripts, which the portal's CSP forbids).
SETUP_SCRIPT = "portal-setup.js"


def _setup_script() -> str:
    return (
        f"window.PUBLIC_URL = {json.dumps(ohif.MOUNT)};\n"
        "window.browserImportFunction = function (url) { return import(url); };\n"
    )


def _index_html(scripts: list[str], styles: list[str]) -> str:
    mount = ohif.MOUNT
    head = [
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="theme-color" content="#000000">',
        "<title>OHIF Viewer</title>",
        f'<link rel="icon" href="{mount}assets/favicon.ico">',
        f'<script src="{mount}{SETUP_SCRIPT}"></script>',
        f'<script src="{mount}app-config.js"></script>',
        *(f'<script defer src="{mount}{name}"></script>' for name in scripts),
        *(f'<link href="{mount}{name}" rel="stylesheet">' for name in styles),
    ]
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n'
        + "\n".join(head)
        + "\n</head>\n<body>\n"
        + "<noscript>OHIF needs JavaScript.</noscript>\n"
        + '<div id="react-portal"></div>\n<div id="root"></div>\n'
        + "</body>\n</html>\n"
    )


def _app_config(version: str) -> str:
    """OHIF's configuration (docs: ohif.org, "Configuration"): one DICOMweb data source, the
    portal's, which answers for the recipient session's share only; nothing from elsewhere."""
    return f"""\
// Written by the portal (manage.py install_ohif) for {ohif.PACKAGE} {version}.
// One data source: the portal's DICOMweb on this origin, scoped to the recipient's share.
(function () {{
  var root = window.location.origin + {json.dumps(ohif.DICOMWEB_ROOT)};
  window.config = {{
    routerBasename: {json.dumps(ohif.MOUNT.rstrip("/"))},
    extensions: [],
    modes: [],
    customizationService: {{}},
    showStudyList: true,
    maxNumberOfWebWorkers: 3,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    maxNumRequests: {{ interaction: 100, thumbnail: 5, prefetch: 25 }},
    showErrorDetails: 'production',
    defaultDataSourceName: 'portal',
    dataSources: [
      {{
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'portal',
        configuration: {{
          friendlyName: 'Image portal',
          name: 'portal',
          wadoUriRoot: root,
          qidoRoot: root,
          wadoRoot: root,
          qidoSupportsIncludeField: false,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          omitQuotationForMultipartRequest: true,
          bulkDataURI: {{ enabled: true }},
        }},
      }},
    ],
  }};
}})();
"""


def _swap(build: Path, target: Path, work: Path) -> None:
    old = work / "previous"
    if target.exists():
        target.rename(old)
    build.rename(target)
