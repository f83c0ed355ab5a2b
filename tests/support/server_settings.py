"""Settings of a portal served by gunicorn in the tests (tests.support.gunicorn): production's,
with static files found where they are written (no collectstatic in tests) and the captcha
answerable by a script."""

from portal.settings import *  # noqa: F403
from portal.settings import STORAGES

STORAGES = {
    **STORAGES,
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True
# django-simple-captcha's test answer, "PASSED": these servers are attacked by scripts.
CAPTCHA_TEST_MODE = True
