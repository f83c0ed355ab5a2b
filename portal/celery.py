"""The Celery application: retrieval jobs and scheduled work run here."""

import os
from typing import Any

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.setup_logging.connect
def configure_worker_logging(**kwargs: Any) -> None:
    """The worker logs through settings.LOGGING, as the web and the storage SCP do: its records
    go through the redaction filter and carry the request id, in the same format. Connected,
    this signal also keeps Celery from installing handlers of its own (on the root logger and on
    `celery.task`), which would write past the filter, and from redirecting standard output into
    a logger."""
    from django.conf import settings
    from django.utils.log import configure_logging

    configure_logging(settings.LOGGING_CONFIG, settings.LOGGING)


@signals.before_task_publish.connect
def send_request_id(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """A task queued while a request (or another task) runs carries that request's id."""
    from portal.logs import TASK_HEADER, request_id

    current = request_id.get()
    if headers is not None and current is not None:
        headers[TASK_HEADER] = current


@signals.task_prerun.connect
def bind_request_id(task: Any = None, **kwargs: Any) -> None:
    """The task's log lines carry the id of the request that queued it, or one of their own
    (a scheduled task, a job resumed at start-up). A task run eagerly, inside its caller, keeps
    its caller's."""
    from portal.logs import TASK_HEADER, new_request_id, request_id, valid_request_id

    if task is None:
        return
    sent = valid_request_id(task.request.get(TASK_HEADER))
    if sent is None and task.request.is_eager:
        sent = request_id.get()
    task.request.portal_request_id_token = request_id.set(sent or new_request_id())


@signals.task_postrun.connect
def unbind_request_id(task: Any = None, **kwargs: Any) -> None:
    from portal.logs import request_id

    token = task.request.get("portal_request_id_token") if task is not None else None
    if token is not None:
        request_id.reset(token)
