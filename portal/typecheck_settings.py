"""The settings as mypy's Django plugin loads them: the portal's own, in debug mode.

The plugin imports the settings to learn the models, in a process that serves nothing and has no
configuration; `portal.settings` refuses the demo key with DEBUG off, so it is read here with
PORTAL_DEBUG on (unless the environment says otherwise). Never used to run the portal.
"""

import os

os.environ.setdefault("PORTAL_DEBUG", "true")

from portal.settings import *  # noqa: F403
