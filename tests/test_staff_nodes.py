"""PACS nodes in the staff workspace (administrators only): add, edit, remove, C-ECHO and the
check of the way back, against the session's Orthanc and dcmtk's dcmqrscp. carol is an
administrator, alice a sharer, bob an auditor; mallory forges requests."""

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelMove,
)

from accounts.models import AuditEvent, User
from studies import services
from studies.dimse import pacs
from studies.models import PacsNode, RetrievalJob
from tests.support import dcmtk, free_port
from tests.support.orthanc import OrthancServer
from tests.support.staff import staff_client

pytestmark = pytest.mark.django_db

NODE = {
    "name": "main-pacs",
    "ae_title": "MAINPACS",
    "host": "pacs.example.org",
    "port": "104",
    "dicomweb_url": "",
    "retrieve_method": "move",
}


def _user(username: str, role: str) -> User:
    return User.objects.create_user(username, f"{username}@example.org", "x" * 20, role=role)


@pytest.fixture
def alice() -> User:
    return _user("alice", User.Role.SHARER)


@pytest.fixture
def bob() -> User:
    return _user("bob", User.Role.AUDITOR)


@pytest.fixture
def carol() -> User:
    return _user("carol", User.Role.ADMIN)


@pytest.fixture
def node() -> PacsNode:
    return services.pacs_node_create(name="old-pacs", ae_title="OLDPACS", host="10.0.0.9", port=104)


def _messages(response: Any) -> str:
    return " ".join(str(m) for m in response.context["messages"])


class TestWhoMay:
    def test_alice_the_sharer_and_bob_the_auditor_cannot_reach_nodes(
        self, alice: User, bob: User, node: PacsNode
    ) -> None:
        for user in (alice, bob):
            client = staff_client(user)
            for path in ("/staff/nodes/", "/staff/nodes/add/", f"/staff/nodes/{node.pk}/edit/"):
                assert client.get(path).status_code == 403, (user, path)
            for path in (
                "/staff/nodes/add/",
                f"/staff/nodes/{node.pk}/remove/",
                f"/staff/nodes/{node.pk}/echo/",
                f"/staff/nodes/{node.pk}/way-back/",
            ):
                assert client.post(path, NODE).status_code == 403, (user, path)
        assert list(PacsNode.objects.values_list("name", flat=True)) == ["old-pacs"]

    def test_mallory_cannot_forge_a_change(self, carol: User, node: PacsNode) -> None:
        browser = Client(enforce_csrf_checks=True)
        browser.cookies = staff_client(carol).cookies
        assert browser.post("/staff/nodes/add/", NODE).status_code == 403
        assert browser.post(f"/staff/nodes/{node.pk}/remove/").status_code == 403
        assert list(PacsNode.objects.values_list("name", flat=True)) == ["old-pacs"]

    def test_every_change_needs_a_recent_second_factor(self, carol: User, node: PacsNode) -> None:
        client = staff_client(carol, second_factor_at=time.time() - 3600)
        assert client.get("/staff/nodes/").status_code == 200
        for path in ("/staff/nodes/add/", f"/staff/nodes/{node.pk}/edit/"):
            response = client.get(path)
            assert response["Location"].startswith(reverse("staff:reauth")), path
        for path in ("/staff/nodes/add/", f"/staff/nodes/{node.pk}/remove/"):
            response = client.post(path, {**NODE, "next": path})
            assert response["Location"].startswith(reverse("staff:reauth")), path
        assert list(PacsNode.objects.values_list("name", flat=True)) == ["old-pacs"]


class TestChanges:
    def test_carol_adds_a_node(self, carol: User) -> None:
        response = staff_client(carol).post("/staff/nodes/add/", NODE, follow=True)

        assert "The node main-pacs is added" in _messages(response)
        node = PacsNode.objects.get(name="main-pacs")
        assert (node.ae_title, node.host, node.port) == ("MAINPACS", "pacs.example.org", 104)
        event = AuditEvent.objects.get(action=AuditEvent.Action.PACS_NODE_CREATED)
        assert event.actor == carol and event.detail["node"] == "main-pacs"

    def test_bad_input_gets_clear_errors_and_loses_nothing(self, carol: User) -> None:
        client = staff_client(carol)
        bad = {**NODE, "ae_title": "BAD\\AE", "port": "70000", "retrieve_method": "wado"}
        response = client.post("/staff/nodes/add/", bad)

        assert response.status_code == 200
        page = response.content.decode()
        assert "65535" in page
        assert 'value="BAD\\AE"' in page and 'value="pacs.example.org"' in page
        assert not PacsNode.objects.exists()

        response = client.post("/staff/nodes/add/", {**bad, "port": "104"})
        page = response.content.decode()
        assert "An AE title has 1 to 16 printable characters" in page
        assert "WADO-RS retrieval needs the node" in page
        assert not PacsNode.objects.exists()

    def test_a_name_is_unique(self, carol: User, node: PacsNode) -> None:
        response = staff_client(carol).post("/staff/nodes/add/", {**NODE, "name": "old-pacs"})
        assert response.status_code == 200 and "already exists" in response.content.decode()
        assert PacsNode.objects.count() == 1

    def test_carol_edits_a_node(self, carol: User, node: PacsNode) -> None:
        client = staff_client(carol)
        assert 'value="OLDPACS"' in client.get(f"/staff/nodes/{node.pk}/edit/").content.decode()

        client.post(f"/staff/nodes/{node.pk}/edit/", {**NODE, "name": "old-pacs", "port": "11112"})

        node.refresh_from_db()
        assert (node.ae_title, node.port) == ("MAINPACS", 11112)
        event = AuditEvent.objects.get(action=AuditEvent.Action.PACS_NODE_UPDATED)
        assert event.detail["changed"]["port"] == [104, 11112]

    def test_carol_removes_a_node(self, carol: User, node: PacsNode) -> None:
        client = staff_client(carol)
        page = client.get(f"/staff/nodes/{node.pk}/remove/").content.decode()
        assert "refuses the images it sends" in page

        response = client.post(f"/staff/nodes/{node.pk}/remove/", follow=True)

        assert "is removed" in _messages(response)
        assert not PacsNode.objects.exists()
        assert AuditEvent.objects.filter(action=AuditEvent.Action.PACS_NODE_DELETED).exists()

    def test_a_node_with_running_retrievals_stays(self, carol: User, node: PacsNode) -> None:
        RetrievalJob.objects.create(
            pacs=node,
            study_instance_uid="1.2.3.4",
            method="move",
            status=RetrievalJob.Status.RUNNING,
        )
        client = staff_client(carol)
        assert (
            "cannot be removed now"
            in client.get(f"/staff/nodes/{node.pk}/remove/").content.decode()
        )

        response = client.post(f"/staff/nodes/{node.pk}/remove/", follow=True)

        assert "still in use: 1 retrievals from it are queued or running" in _messages(response)
        assert PacsNode.objects.filter(pk=node.pk).exists()


class TestEcho:
    def test_orthanc_answers(self, carol: User, orthanc_node: PacsNode) -> None:
        response = staff_client(carol).post(f"/staff/nodes/{orthanc_node.pk}/echo/", follow=True)

        assert "orthanc answered: the portal can reach it" in _messages(response)
        event = AuditEvent.objects.get(action=AuditEvent.Action.PACS_NODE_ECHO)
        assert event.detail == {"node": "orthanc", "ok": True, "error": ""}

    def test_a_closed_port_is_told_in_words(self, carol: User) -> None:
        node = services.pacs_node_create(
            name="gone", ae_title="GONE", host="127.0.0.1", port=free_port()
        )
        response = staff_client(carol).post(f"/staff/nodes/{node.pk}/echo/", follow=True)

        text = _messages(response)
        assert "gone did not answer" in text and "Check its host, port and AE title" in text
        assert AuditEvent.objects.get(action=AuditEvent.Action.PACS_NODE_ECHO).detail["ok"] is False


class TestTheWayBack:
    def test_orthanc_knows_the_way_back(self, carol: User, orthanc_node: PacsNode) -> None:
        response = staff_client(carol).post(
            f"/staff/nodes/{orthanc_node.pk}/way-back/", follow=True
        )

        assert "orthanc knows the way back" in _messages(response)
        event = AuditEvent.objects.get(action=AuditEvent.Action.PACS_NODE_WAY_BACK)
        assert event.detail["outcome"] == "known" and event.detail["destination"] == "PORTAL"

    def test_orthanc_does_not_know_another_ae_title(
        self, carol: User, orthanc_node: PacsNode, settings: Any
    ) -> None:
        """Orthanc refuses a request from an AE title it does not know by closing the
        association: it will not send to that AE title either."""
        settings.DICOM_AE_TITLE = "STRANGER"
        settings.DICOM_PORT = 11112
        settings.BASE_URL = "https://portal.example.org"

        response = staff_client(carol).post(
            f"/staff/nodes/{orthanc_node.pk}/way-back/", follow=True
        )

        assert "orthanc does not know the portal's AE title STRANGER" in _messages(
            response
        ) and "Declare STRANGER at portal.example.org:11112 on the PACS" in _messages(response)
        event = AuditEvent.objects.get(action=AuditEvent.Action.PACS_NODE_WAY_BACK)
        assert event.detail["outcome"] == "portal_unknown"

    def test_a_wrong_ae_title_for_the_node_is_told(self, orthanc: OrthancServer) -> None:
        """The session's Orthanc checks the AE title it is called by."""
        check = pacs.check_way_back(pacs.Peer("NOTORTHANC", orthanc.host, orthanc.dicom_port))
        assert check.outcome == pacs.WayBack.CALLED_AE_WRONG

    def test_an_unreachable_node_is_an_error_not_an_answer(self, carol: User) -> None:
        with pytest.raises(pacs.WayBackError):
            pacs.check_way_back(pacs.Peer("GONE", "127.0.0.1", free_port()))
        node = services.pacs_node_create(
            name="gone", ae_title="GONE", host="127.0.0.1", port=free_port()
        )
        response = staff_client(carol).post(f"/staff/nodes/{node.pk}/way-back/", follow=True)
        assert "The check could not be made: gone did not answer" in _messages(response)


@pytest.fixture(scope="module")
def qr_pacs(
    tmp_path_factory: pytest.TempPathFactory, portal_ae_title: str
) -> Iterator[dcmtk.QueryRetrieveSCP]:
    """dcmtk's dcmqrscp, which knows the portal's AE title as a peer. For a study it does not
    hold it answers success with no sub-operations, whatever the destination."""
    workdir: Path = tmp_path_factory.mktemp("dcmqrscp-way-back")
    with dcmtk.QueryRetrieveSCP(
        workdir, peers={"portal": (portal_ae_title, free_port())}
    ) as server:
        yield server


@pytest.fixture(scope="module")
def strict_pacs(portal_ae_title: str) -> Iterator[pacs.Peer]:
    """A PACS (pynetdicom's C-MOVE SCP) that looks the move destination up before the study,
    as many do: it answers 0xA801 for any AE title but the portal's."""
    destinations = {portal_ae_title: ("127.0.0.1", free_port())}

    def on_move(event: Any) -> Iterator[Any]:
        yield destinations.get(event.move_destination, (None, None))
        yield 0  # nothing matches a made-up study

    ae = AE(ae_title="STRICT")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_MOVE, on_move)]
    )
    assert server is not None
    yield pacs.Peer("STRICT", "127.0.0.1", port)
    server.shutdown()


class TestTheWayBackElsewhere:
    def test_dcmqrscp_knows_the_portal(self, qr_pacs: dcmtk.QueryRetrieveSCP) -> None:
        check = pacs.check_way_back(pacs.Peer(qr_pacs.aet, "127.0.0.1", qr_pacs.port))
        assert (check.outcome, check.status) == (pacs.WayBack.KNOWN, 0)

    def test_a_pacs_that_checks_the_destination_knows_the_portal(
        self, strict_pacs: pacs.Peer
    ) -> None:
        check = pacs.check_way_back(strict_pacs)
        assert (check.outcome, check.status) == (pacs.WayBack.KNOWN, 0)

    def test_it_answers_move_destination_unknown_for_another(
        self, carol: User, strict_pacs: pacs.Peer, settings: Any
    ) -> None:
        settings.DICOM_AE_TITLE = "ELSEWHERE"
        settings.BASE_URL = "https://portal.example.org"
        settings.DICOM_PORT = 11112
        check = pacs.check_way_back(strict_pacs)
        assert (check.outcome, check.status) == (pacs.WayBack.DESTINATION_UNKNOWN, 0xA801)

        node = services.pacs_node_create(
            name="strict",
            ae_title=strict_pacs.ae_title,
            host=strict_pacs.host,
            port=strict_pacs.port,
        )
        response = staff_client(carol).post(f"/staff/nodes/{node.pk}/way-back/", follow=True)
        assert _messages(response) == (
            "strict does not know the portal's AE title ELSEWHERE as a destination: it cannot "
            "send images back. Declare ELSEWHERE at portal.example.org:11112 on the PACS."
        )
        event = AuditEvent.objects.get(action=AuditEvent.Action.PACS_NODE_WAY_BACK)
        assert event.detail["outcome"] == "destination_unknown"
        assert event.detail["status"] == 0xA801


def test_a_silent_peer_is_an_error_within_the_timeouts(settings: Any) -> None:
    """A node that accepts the connection and then says nothing: the check gives up after the
    connection timeout, with an error, not an answer about the way back."""
    settings.DICOM_CONNECT_TIMEOUT = 0.5
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    try:
        with pytest.raises(pacs.WayBackError):
            pacs.check_way_back(pacs.Peer("SILENT", "127.0.0.1", listener.getsockname()[1]))
    finally:
        for connection in accepted:
            connection.close()
        listener.close()
