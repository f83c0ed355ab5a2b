"""Log lines an operator can follow: one request id per HTTP request, on every line logged while
it runs, on its response (`X-Request-ID`), and on the lines of the Celery tasks it queued.

The id comes from the reverse proxy when the request comes from a trusted one (nginx sends its
`$request_id`, which its own access log shows too), else it is made here. It lives in a context
variable: each gunicorn thread, each task, has its own. `RequestIdFilter` copies it onto every
log record; the JSON formatter (settings.LOGGING, `PORTAL_LOG_FORMAT=json`) then writes it as a
field. Celery carries it in a message header of its own (portal.celery).

Only the id travels: nothing here reads a path, a body or a header other than `X-Request-ID`,
and a client's own `X-Request-ID` is ignored (it could be anything, a token or a forged line).
"""

import logging
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from django.http import HttpRequest, HttpResponseBase
from pythonjsonlogger import json as pythonjsonlogger_json
from pythonjsonlogger.core import RESERVED_ATTRS

from accounts.net import from_trusted_proxy

REQUEST_ID_HEADER = "X-Request-ID"
# The Celery message header that carries the id from the publisher to the task.
TASK_HEADER = "portal_request_id"
# What a proxy's id may look like: nginx's `$request_id` (32 hex digits), a UUID, or another
# proxy's token of letters, digits and dashes. Anything else is replaced, never logged.
_VALID_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")

request_id: ContextVar[str | None] = ContextVar("portal_request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def valid_request_id(value: object) -> str | None:
    """`value` if it may serve as a request id, else None."""
    if isinstance(value, str) and _VALID_ID.fullmatch(value):
        return value
    return None


@contextmanager
def request_id_bound(value: str) -> Iterator[str]:
    """Within this block, log records carry `value` as their request id."""
    token = request_id.set(value)
    try:
        yield value
    finally:
        request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record ("-" outside a request or task): the JSON formatter
    writes it, and a text format may name it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get() or "-"
        return True


class RequestIdMiddleware:
    """First in MIDDLEWARE, so that every line logged while the request runs carries its id.

    The id stays set after the middleware returns, until Django's `request_finished`
    (`forget_request_id`): Django logs a 4xx or 5xx answer after the middleware chain, and a
    streamed answer (a ZIP) is produced, and may fail, after it too."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        proposed = None
        if from_trusted_proxy(request):
            proposed = valid_request_id(request.headers.get(REQUEST_ID_HEADER))
        current = proposed or new_request_id()
        request_id.set(current)
        response = self.get_response(request)
        response[REQUEST_ID_HEADER] = current
        return response


def forget_request_id(**kwargs: Any) -> None:
    """Connected to `request_finished` (portal.apps): the request's lines are all written."""
    request_id.set(None)


class JsonFormatter(pythonjsonlogger_json.JsonFormatter):
    """One JSON object a line: time, level, logger, message, request id, and the extra fields a
    caller gave (`status_code`…). The request object Django's request loggers attach is left
    out: it has no JSON form, and its text would be the path, which may hold a link token."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("fmt", ["levelname", "name", "message"])
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        kwargs.setdefault("timestamp", "time")
        kwargs.setdefault("reserved_attrs", [*RESERVED_ATTRS, "request"])
        super().__init__(*args, **kwargs)
