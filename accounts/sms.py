"""Text messages to recipients' phones: one-time codes only.

The backend is chosen by `PORTAL_SMS_BACKEND`:

- `console`: the message is printed on standard output (the demo);
- `file`: one JSON file per message, `{"to": "+33…", "body": "…"}`, in `PORTAL_SMS_FILE_PATH`
  (the tests read codes from there);
- `http`: a gateway reached by a JSON POST (see `HttpGatewayBackend`);
- or the dotted path of a class with the same `send(to, body)` method.

Every failure to hand a message over is an `SmsError`, with nothing secret in its text.
"""

import json
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Protocol

import requests
from django.conf import settings
from django.utils import timezone
from django.utils.module_loading import import_string


class SmsError(Exception):
    """The message could not be handed to the gateway."""


class SmsBackend(Protocol):
    def send(self, to: str, body: str) -> None: ...


class ConsoleBackend:
    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout

    def send(self, to: str, body: str) -> None:
        self.stream.write(f"SMS to {to}:\n{body}\n\n")
        self.stream.flush()


class FileBackend:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path or settings.SMS_FILE_PATH)

    def send(self, to: str, body: str) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            name = f"{timezone.now():%Y%m%d-%H%M%S-%f}-{uuid.uuid4().hex[:8]}.json"
            # Written aside and renamed, so a reader never sees half a message.
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"to": to, "body": body}, handle, ensure_ascii=False)
            os.replace(tmp, self.path / name)
        except OSError as exc:
            raise SmsError(f"cannot write the message file: {exc.strerror}") from exc


class HttpGatewayBackend:
    """A gateway that takes one message per request:

        POST {PORTAL_SMS_GATEWAY_URL}
        Authorization: Bearer {PORTAL_SMS_GATEWAY_TOKEN}
        Content-Type: application/json

        {"to": "+33612345642", "body": "…", "sender": "{PORTAL_SMS_SENDER}"}

    Any 2xx answer means accepted. Other answers, connection errors and time-outs
    (`PORTAL_SMS_TIMEOUT` seconds, for connecting and again for the answer) raise SmsError.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        sender: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self.url = url or settings.SMS_GATEWAY_URL
        self.token = token if token is not None else settings.SMS_GATEWAY_TOKEN
        self.sender = sender if sender is not None else settings.SMS_SENDER
        self.timeout = timeout or settings.SMS_TIMEOUT

    def send(self, to: str, body: str) -> None:
        if not self.url:
            raise SmsError("PORTAL_SMS_GATEWAY_URL is not set")
        try:
            response = requests.post(
                self.url,
                json={"to": to, "body": body, "sender": self.sender},
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=(self.timeout, self.timeout),
                allow_redirects=False,
            )
        except requests.Timeout as exc:
            raise SmsError("the SMS gateway did not answer in time") from exc
        except requests.RequestException as exc:
            raise SmsError(f"cannot reach the SMS gateway: {type(exc).__name__}") from exc
        if not 200 <= response.status_code < 300:
            raise SmsError(f"the SMS gateway refused the message (HTTP {response.status_code})")


_BACKENDS = {
    "console": ConsoleBackend,
    "file": FileBackend,
    "http": HttpGatewayBackend,
}


def get_backend() -> SmsBackend:
    name = settings.SMS_BACKEND
    cls = _BACKENDS.get(name) or import_string(name)
    backend: SmsBackend = cls()
    return backend


def send_sms(to: str, body: str) -> None:
    get_backend().send(to, body)
