"""gunicorn's logger for the portal (deploy/gunicorn.conf.py names it): access lines that can
never hold a link token, a code or a viewer token, whatever `access_log_format` says.

A link token travels in the path of a legacy link (`GET /s/<token>`); codes and new-style
tokens travel in request bodies, which no access log shows; a viewer token travels in the
`Authorization` header. So the atoms a format may name are cut down before any format sees
them: the path with `/s/<anything>` redacted, the request line without its query string, no
query string, no referrer, no request headers but `X-Request-ID`, no environment variables. Its
error log (gunicorn writes the request's URI there when a request fails) goes through the
portal's redaction filter too.

`JsonLogger` writes both logs as JSON lines (the access line's fields named), `TextLogger` as
text; gunicorn.conf.py picks one from `PORTAL_LOG_FORMAT`, as the settings do for the portal.
"""

import logging
import re
from typing import Any

from gunicorn.glogging import Logger

from accounts.logging import RedactShareLinks, redact
from portal.logs import REQUEST_ID_HEADER, JsonFormatter

_REQUEST_ID = REQUEST_ID_HEADER.lower()
_QUERY = re.compile(r"\?[^\s\"']*")


class DropQueryStrings(logging.Filter):
    """gunicorn's error log names the URI of a request that failed, query string included:
    keep the path only (a client may put anything in a query string, a token too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            record.msg = _QUERY.sub("?[redacted]", message)
            record.args = None
        return True


def redacted_path(path: str) -> str:
    return redact(path or "/")


class TextLogger(Logger):
    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.addFilter(RedactShareLinks())
                handler.addFilter(DropQueryStrings())

    def atoms(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> dict:
        given = super().atoms(resp, req, environ, request_time)
        path = redacted_path(environ.get("PATH_INFO", ""))
        method = environ.get("REQUEST_METHOD", "-")
        atoms = {
            key: value
            for key, value in given.items()
            # Headers ({…}i, {…}o) and environment variables ({…}e) may carry anything.
            if not key.startswith("{")
        }
        atoms.update(
            {
                "r": f"{method} {path} {environ.get('SERVER_PROTOCOL', '-')}",
                "U": path,
                "q": "-",
                "f": "-",
                "{x-request-id}o": self._request_id(resp),
            }
        )
        return atoms

    @staticmethod
    def _request_id(resp: Any) -> str:
        for name, value in getattr(resp, "headers", None) or []:
            if name.lower() == _REQUEST_ID:
                return str(value)
        return "-"


class JsonLogger(TextLogger):
    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(JsonFormatter())

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        atoms = self.atoms(resp, req, environ, request_time)
        fields = {
            "client": atoms["h"],
            "method": atoms["m"],
            "path": atoms["U"],
            "status": atoms["s"],
            "bytes": atoms["B"],
            "duration_ms": atoms["M"],
            "request_id": atoms["{x-request-id}o"],
        }
        self.access_log.log(logging.INFO, "request", extra=fields)
