"""`pacs` and `retrieve`: what operators type, and the errors they get for bad input."""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from io import StringIO
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from django.conf import settings as django_settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.utils import timezone
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice
from pytest_django.fixtures import Settings

from accounts.models import Share, User
from studies import services
from studies.models import Instance, PacsNode, RetrievalJob, Series, Study
from tests.support import free_port

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--aet", "SEVENTEEN_CHARS_X", "--host", "pacs.example.org", "--port", "104"],
            "ae_title: An AE title has 1 to 16 printable characters",
        ),
        (
            ["--aet", "BACK\\SLASH", "--host", "pacs.example.org", "--port", "104"],
            "ae_title: An AE title has 1 to 16 printable characters",
        ),
        (
            # Not in the AE repertoire (PS3.5 6.2): a PACS would refuse it, or garble it.
            ["--aet", "PÄCS", "--host", "pacs.example.org", "--port", "104"],
            "ae_title: An AE title has 1 to 16 printable characters (ASCII",
        ),
        (
            ["--aet", "PACS", "--host", "pacs.example.org", "--port", "0"],
            "port: A port is a number from 1 to 65535.",
        ),
        (
            ["--aet", "PACS", "--host", "pacs.example.org", "--port", "65536"],
            "port: A port is a number from 1 to 65535.",
        ),
        (
            ["--aet", "PACS", "--host", "pacs.example.org", "--port", "104", "--retrieve", "wado"],
            "dicomweb_url: WADO-RS retrieval needs the node's DICOMweb URL.",
        ),
        (
            ["--aet", "PACS", "--host", "h", "--port", "104", "--dicomweb", "not a url"],
            "dicomweb_url: Enter a valid URL.",
        ),
    ],
)
def test_pacs_add_refuses_bad_input_and_creates_nothing(args: list[str], message: str) -> None:
    with pytest.raises(CommandError) as raised:
        run("pacs", "add", "main-pacs", *args)

    assert str(raised.value).startswith("Cannot add the node: ")
    assert message in str(raised.value)
    assert not PacsNode.objects.exists()


def test_pacs_add_refuses_a_name_already_taken() -> None:
    run("pacs", "add", "main-pacs", "--aet", "PACS", "--host", "10.0.0.1", "--port", "104")

    with pytest.raises(CommandError, match=r"name: .*already exists"):
        run("pacs", "add", "main-pacs", "--aet", "OTHER", "--host", "10.0.0.2", "--port", "11112")

    assert list(PacsNode.objects.values_list("ae_title", "host")) == [("PACS", "10.0.0.1")]


def test_pacs_add_then_list_json_has_exactly_the_contract_shape() -> None:
    added = json.loads(
        run(
            "pacs",
            "add",
            "web-pacs",
            "--aet",
            "WEBPACS",
            "--host",
            "pacs.example.org",
            "--port",
            "4242",
            "--dicomweb",
            "https://pacs.example.org/dicom-web",
            "--retrieve",
            "wado",
            "--json",
        )
    )
    run("pacs", "add", "archive", "--aet", "ARCHIVE", "--host", "10.1.2.3", "--port", "104")

    listed = json.loads(run("pacs", "list", "--json"))

    web_pacs = {
        "name": "web-pacs",
        "aet": "WEBPACS",
        "host": "pacs.example.org",
        "port": 4242,
        "dicomweb": "https://pacs.example.org/dicom-web",
        "retrieve": "wado",
    }
    assert added == web_pacs
    assert listed == [
        {
            "name": "archive",
            "aet": "ARCHIVE",
            "host": "10.1.2.3",
            "port": 104,
            "dicomweb": "",
            "retrieve": "move",
        },
        web_pacs,
    ]


def test_pacs_list_json_is_an_empty_list_without_nodes() -> None:
    assert json.loads(run("pacs", "list", "--json")) == []


def test_pacs_echo_of_a_node_that_does_not_answer_says_so() -> None:
    port = free_port()
    services.pacs_node_create(name="silent", ae_title="SILENT", host="127.0.0.1", port=port)

    with pytest.raises(CommandError, match=rf"cannot reach SILENT@127\.0\.0\.1:{port}"):
        run("pacs", "echo", "silent")


def test_retrieve_from_an_unknown_node_is_a_clear_error_and_queues_nothing() -> None:
    with pytest.raises(CommandError) as raised:
        run("retrieve", "nowhere", "1.2.840.113619.2.55.3.1", "--json")

    assert str(raised.value) == "No PACS node named 'nowhere'."
    assert not RetrievalJob.objects.exists()


def test_retrieve_refuses_an_invalid_study_uid() -> None:
    services.pacs_node_create(name="main", ae_title="PACS", host="127.0.0.1", port=104)

    with pytest.raises(CommandError, match=r"This is not a valid Study Instance UID\."):
        run("retrieve", "main", "1.2.3/../../etc")

    assert not RetrievalJob.objects.exists()


def test_retrieve_wait_from_an_unreachable_node_fails_with_the_reason() -> None:
    port = free_port()
    services.pacs_node_create(name="down", ae_title="DOWN", host="127.0.0.1", port=port)

    with pytest.raises(CommandError) as raised:
        run("retrieve", "down", "1.2.840.113619.2.55.3.2", "--wait")

    job = RetrievalJob.objects.get()
    assert job.status == RetrievalJob.Status.FAILED
    assert str(raised.value) == f"Job {job.pk} failed: {job.error}"
    assert f"cannot reach DOWN@127.0.0.1:{port}" in job.error


def test_demo_data_twice_keeps_one_copy_of_everything_and_prints_working_credentials(
    settings: Settings,
) -> None:
    run("demo_data")
    second = run("demo_data")

    assert Study.objects.count() == 2
    assert Instance.objects.count() == 30
    assert set(Series.objects.values_list("modality", flat=True)) == {"CT", "MR"}
    user = User.objects.get()
    assert (user.username, user.role, user.is_staff) == ("demo", User.Role.ADMIN, True)
    password = re.search(r"user demo, password (\S+)", second)
    assert password is not None and user.check_password(password.group(1))
    device = TOTPDevice.objects.get(user=user)
    assert device.confirmed
    assert device.config_url in second
    assert second.count("otpauth://totp/") == 1
    # Only the share printed last still opens.
    live = Share.objects.filter(revoked_at__isnull=True)
    assert live.count() == 1
    assert Share.objects.count() == 2
    assert f"{settings.BASE_URL}/s/" in second
    assert re.search(r"Access code:  [0-9A-Z]{4}(-[0-9A-Z]{4})+", second)

    # The staff login printed works with the printed password and a code from the printed secret.
    login = re.search(r"Staff login:  (\S+)", second)
    secret = re.search(r"otpauth://totp/\S*?secret=([A-Z2-7]+)", second)
    assert login is not None and secret is not None
    key = base64.b32decode(secret.group(1) + "=" * (-len(secret.group(1)) % 8))
    token = f"{TOTP(key, device.step, device.t0, device.digits).token():06d}"
    client = Client()
    answer = client.post(
        urlsplit(login.group(1)).path,
        {"username": "demo", "password": password.group(1), "next": "/admin/"},
    )
    assert answer.status_code == 302, answer.content[:300]
    answer = client.post(answer["Location"], {"otp": token})
    assert answer.status_code == 302, answer.content[:300]
    assert answer["Location"] == "/admin/"
    assert client.get("/admin/").status_code == 200


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # The parent pid is the second field after the parenthesised command name.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_serve_demo_runs_web_worker_and_storage_scp_and_ctrl_c_stops_them_all(
    tmp_path: Path,
) -> None:
    web_port, dicom_port = free_port(), free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PORTAL_", "CELERY_")) and key != "DATABASE_URL"
    }
    env.update(
        {
            "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",
            "PORTAL_BROKER_DIR": str(tmp_path / "broker"),
            "PORTAL_STORE_DIR": str(tmp_path / "store"),
            # As `make demo` runs it (the demo key is refused with DEBUG off).
            "PORTAL_DEBUG": "true",
        }
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "serve_demo",
            "--port",
            str(web_port),
            "--dicom-port",
            str(dicom_port),
        ],
        cwd=django_settings.BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                health = requests.get(f"http://127.0.0.1:{web_port}/healthz", timeout=2)
                if _port_open(dicom_port):
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        assert health is not None and health.status_code == 200
        assert health.json()["database"] == "ok"
        assert _port_open(dicom_port)
        children = _children(process.pid)
        assert sorted(
            next(word for word in ("run_storescp", "worker", "runserver") if word in cmdline)
            for cmdline in children.values()
        ) == ["run_storescp", "runserver", "worker"]

        process.send_signal(signal.SIGINT)  # what Ctrl-C does
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0, output.decode(errors="replace")
    assert b"The demo is stopped." in output
    assert not _port_open(web_port)
    assert not _port_open(dicom_port)
    for pid in children:
        assert not Path(f"/proc/{pid}").exists(), children[pid]


def test_share_unlock_and_revoke_print_the_share_as_json() -> None:
    """`--json` on every share action: one object, the shape `share list --json` lists."""
    created = json.loads(
        run("share", "create", "1.2.826.0.1.3680043.8.498.77", "--patient-phone", "+33612345678",
            "--json")
    )  # fmt: skip
    share_id = created["id"]
    Share.objects.filter(pk=share_id).update(
        locked_until=timezone.now() + timedelta(minutes=15), otp_failures=5
    )
    assert json.loads(run("share", "list", "--json"))[0]["locked"] is True

    unlocked = json.loads(run("share", "unlock", str(share_id), "--json"))

    assert unlocked["id"] == share_id
    assert unlocked["locked"] is False
    assert unlocked == json.loads(run("share", "list", "--json"))[0]

    revoked = json.loads(run("share", "revoke", str(share_id), "--json"))

    assert revoked["id"] == share_id
    assert revoked["status"] == "revoked"
    assert revoked == json.loads(run("share", "list", "--json"))[0]
    assert Share.objects.get(pk=share_id).revoked_at is not None


def test_share_revoke_of_an_unknown_share_says_so() -> None:
    with pytest.raises(CommandError, match=r"^No share 4242\.$"):
        run("share", "revoke", "4242", "--json")
