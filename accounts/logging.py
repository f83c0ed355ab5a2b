"""A logging filter that keeps share link tokens out of every log line.

The portal never logs a token itself, but Django's request loggers print paths ("Not Found:
/s/…", the development server's request lines) and axes records the path of a failed attempt.
Attached to those loggers (settings.LOGGING), it rewrites `/s/<token>` to `/s/[redacted]` in
the record before any handler sees it.
"""

import logging
import re

_LINK = re.compile(r"/s/[^\s\"'?#/]+")
REDACTED = "/s/[redacted]"


def redact(text: str) -> str:
    return _LINK.sub(REDACTED, text)


class RedactShareLinks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is not ours to fix
            return True
        if "/s/" in message:
            record.msg = redact(message)
            record.args = None
        # The development server also hands the request itself to its records.
        request = getattr(record, "request", None)
        if request is not None and "/s/" in str(getattr(request, "path", "")):
            record.request = None
        return True
