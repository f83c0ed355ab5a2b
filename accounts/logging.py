"""A logging filter that keeps share link tokens and viewer tokens out of every log line.

The portal never logs a token itself, but Django's request loggers print paths ("Not Found:
/s/…", the development server's request lines) and axes records the path of a failed attempt.
Attached to those loggers (settings.LOGGING), it rewrites `/s/<token>` to `/s/[redacted]` and
`Bearer <token>` to `Bearer [redacted]` in the record before any handler sees it. Django's
request loggers also hand the request itself to handlers (an error mail lists its headers):
a request that carries an Authorization header (a viewer token) is taken off the record.
"""

import logging
import re

_LINK = re.compile(r"/s/[^\s\"'?#/]+")
REDACTED = "/s/[redacted]"
_BEARER = re.compile(r"(Bearer\s+)[^\s\"',]+", re.IGNORECASE)


def redact(text: str) -> str:
    return _BEARER.sub(r"\1[redacted]", _LINK.sub(REDACTED, text))


class RedactShareLinks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is not ours to fix
            return True
        if "/s/" in message or "bearer" in message.lower():
            record.msg = redact(message)
            record.args = None
        # The development server also hands the request itself to its records.
        request = getattr(record, "request", None)
        if request is not None and (
            "/s/" in str(getattr(request, "path", ""))
            or "HTTP_AUTHORIZATION" in getattr(request, "META", {})
        ):
            record.request = None
        return True
