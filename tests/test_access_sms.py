"""SMS backends: console, one JSON file per message, and an HTTP gateway (a local server)."""

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from accounts import sms
from tests.support.access import make_share, make_study, open_link


class TestFileBackend:
    def test_it_writes_one_json_file_per_message(self, tmp_path: Path) -> None:
        backend = sms.FileBackend(tmp_path / "out")
        backend.send("+33612345642", "123456 est votre code")
        backend.send("+33600000001", "second")
        files = sorted((tmp_path / "out").glob("*.json"))
        assert len(files) == 2
        messages = [json.loads(f.read_text(encoding="utf-8")) for f in files]
        assert {"to": "+33612345642", "body": "123456 est votre code"} in messages
        assert {"to": "+33600000001", "body": "second"} in messages
        assert not list((tmp_path / "out").glob(".*"))  # no half-written leftovers

    def test_it_raises_its_own_error_when_it_cannot_write(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("")
        with pytest.raises(sms.SmsError):
            sms.FileBackend(blocker).send("+33612345642", "x")

    def test_the_setting_chooses_the_backend(self, settings: Any, tmp_path: Path) -> None:
        settings.SMS_BACKEND = "file"
        settings.SMS_FILE_PATH = str(tmp_path)
        sms.send_sms("+33612345642", "hello")
        assert len(list(tmp_path.glob("*.json"))) == 1
        settings.SMS_BACKEND = "console"
        assert isinstance(sms.get_backend(), sms.ConsoleBackend)
        settings.SMS_BACKEND = "http"
        assert isinstance(sms.get_backend(), sms.HttpGatewayBackend)


def test_the_console_backend_prints_the_message() -> None:
    out = io.StringIO()
    sms.ConsoleBackend(out).send("+33612345642", "hello")
    assert "+33612345642" in out.getvalue() and "hello" in out.getvalue()


class _Gateway(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []
    status = 202
    delay = 0.0

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        type(self).received.append(
            {
                "path": self.path,
                "authorization": self.headers.get("Authorization"),
                "content_type": self.headers.get("Content-Type"),
                "json": json.loads(body),
            }
        )
        if self.delay:
            threading.Event().wait(self.delay)
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"id": "msg-1"}')

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[tuple[str, type[_Gateway]]]:
    handler = type("Gateway", (_Gateway,), {"received": [], "status": 202, "delay": 0.0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/messages", handler
    finally:
        server.shutdown()
        server.server_close()


class TestHttpGateway:
    def test_it_posts_json_with_a_bearer_token(self, gateway) -> None:  # type: ignore[no-untyped-def]
        url, handler = gateway
        sms.HttpGatewayBackend(url=url, token="s3cret", sender="CHU").send("+33612345642", "hi")
        assert handler.received == [
            {
                "path": "/v1/messages",
                "authorization": "Bearer s3cret",
                "content_type": "application/json",
                "json": {"to": "+33612345642", "body": "hi", "sender": "CHU"},
            }
        ]

    def test_a_refusal_is_an_sms_error_without_the_message(self, gateway) -> None:  # type: ignore[no-untyped-def]
        url, handler = gateway
        handler.status = 500
        with pytest.raises(sms.SmsError) as info:
            sms.HttpGatewayBackend(url=url, token="t").send("+33612345642", "123456")
        assert "500" in str(info.value)
        assert "123456" not in str(info.value)

    def test_a_slow_gateway_times_out(self, gateway) -> None:  # type: ignore[no-untyped-def]
        url, handler = gateway
        handler.delay = 2.0
        with pytest.raises(sms.SmsError, match="in time"):
            sms.HttpGatewayBackend(url=url, token="t", timeout=0.3).send("+33612345642", "x")

    def test_an_unreachable_gateway_is_an_sms_error(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(sms.SmsError, match="cannot reach"):
            sms.HttpGatewayBackend(url=f"http://127.0.0.1:{port}/", token="t", timeout=2).send(
                "+33612345642", "x"
            )

    def test_it_is_used_for_one_time_codes(self, gateway, settings, db) -> None:  # type: ignore[no-untyped-def]
        url, handler = gateway
        settings.SMS_BACKEND = "http"
        settings.SMS_GATEWAY_URL = url
        settings.SMS_GATEWAY_TOKEN = "tok"
        make_study()
        created = make_share()
        client = Client()
        open_link(client, created)
        client.post("/access/verify", {"action": "send"})
        assert len(handler.received) == 1
        assert handler.received[0]["json"]["to"] == "+33612345642"
        from accounts.models import ShareOTPDevice

        token = ShareOTPDevice.objects.get(share=created.share).token
        assert token and token in handler.received[0]["json"]["body"]
