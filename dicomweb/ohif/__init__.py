"""OHIF, the full-featured DICOMweb viewer, served by the portal itself under /ohif/.

It is not part of the source tree: `manage.py install_ohif` (`make ohif`) fetches the published
build of the `@ohif/app` npm package at the pinned version, checks it against the pinned
checksum, and adapts it to the /ohif/ path and to the recipient session's /dicomweb/
(dicomweb.ohif.install). dicomweb.ohif.views serves it to recipient sessions only, with a
Content Security Policy of its own.

To move to another version: set VERSION and INTEGRITY from
`npm view @ohif/app@<version> dist.integrity`, run `make ohif`, then the OHIF tests.
"""

import json
from pathlib import Path

from django.conf import settings

PACKAGE = "@ohif/app"
VERSION = "3.13.2"
# The npm registry's Subresource Integrity string of the package tarball (`dist.integrity`).
INTEGRITY = (
    "sha512-"
    "WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
)

# Where the viewer is served and where its data comes from (both on the portal's own origin).
MOUNT = "/ohif/"
DICOMWEB_ROOT = "/dicomweb"

# Written last by the installer, so that a half-made install never counts as installed.
MARKER = ".installed.json"


def directory() -> Path:
    return Path(settings.OHIF_DIR)


def is_installed() -> bool:
    """Whether OHIF can be offered (templates show its button only then)."""
    folder = directory()
    return (folder / MARKER).is_file() and (folder / "index.html").is_file()


def worker_scripts() -> frozenset[str]:
    """The build's web worker scripts, as the installer found them."""
    try:
        names = json.loads((directory() / MARKER).read_text()).get("workers", [])
    except (OSError, ValueError, AttributeError):
        return frozenset()
    return frozenset(str(name) for name in names)


def viewer_path(study_instance_uid: str) -> str:
    """OHIF's viewer route for one study of the session's share."""
    return f"{MOUNT}viewer?StudyInstanceUIDs={study_instance_uid}"
