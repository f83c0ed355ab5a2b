"""DICOM TLS: the storage SCP takes only TLS associations whose client certificate the
configured CA signed, and outgoing associations speak TLS. dcmtk plays the peers; a
throwaway CA and its certificates are made with openssl for each test."""

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from studies.checks import check_dicom_tls
from studies.dimse import move_scu, pacs
from studies.dimse.storescp import StorageServer
from studies.models import Instance, PacsNode
from tests.conftest import MODALITY_AE, scp_port, wait_until
from tests.support import dcmtk, free_port
from tests.test_storescp import make_files

pytestmark = [pytest.mark.dicom, pytest.mark.django_db(transaction=True)]


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _issue(folder: Path, name: str, ca: Path, ca_key: Path) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    extensions = folder / f"{name}.ext"
    extensions.write_text("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
             "-subj", f"/CN={name}")  # fmt: skip
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", extensions)  # fmt: skip
    return cert, key


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
             "-days", "2", "-subj", f"/CN={name}")  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_key = _ca(folder, "hospital-dicom-ca")
    other_ca, other_key = _ca(folder, "someone-elses-ca")
    server_cert, server_key = _issue(folder, "portal", ca, ca_key)
    client_cert, client_key = _issue(folder, "modality", ca, ca_key)
    stranger_cert, stranger_key = _issue(folder, "stranger", other_ca, other_key)
    return Pki(ca, server_cert, server_key, client_cert, client_key, stranger_cert, stranger_key)


@pytest.fixture
def tls_settings(settings: Any, pki: Pki) -> Any:
    settings.DICOM_TLS_CERT = str(pki.server_cert)
    settings.DICOM_TLS_KEY = str(pki.server_key)
    settings.DICOM_TLS_CA = str(pki.ca)
    return settings


@pytest.fixture
def tls_scp(tls_settings: Any, modality_node: PacsNode) -> Iterator[StorageServer]:
    server = StorageServer(ae_title="PORTAL", host="127.0.0.1", port=free_port())
    server.nodes.refresh_seconds = 0
    server.start(block=False)
    yield server
    server.stop()


def _send(server: StorageServer, files: list[Path], tls: list[str]) -> str:
    result = dcmtk.storescu(
        "127.0.0.1", scp_port(server), files, aet=MODALITY_AE, aec=server.ae_title,
        extra=[*tls, "-v"], timeout=30,
    )  # fmt: skip
    return result.stdout + result.stderr


def test_a_node_with_a_certificate_from_the_ca_stores_over_tls(
    tls_scp: StorageServer, pki: Pki, tmp_path: Path
) -> None:
    files = list(make_files(tmp_path / "push", modalities=(("CT", 2),)).values())
    tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    output = _send(tls_scp, files, tls)
    assert output.count("Received Store Response (Success)") == 2, output
    wait_until(lambda: Instance.objects.count() == 2)


@pytest.mark.parametrize(
    "how",
    ["plain", "tls without a client certificate", "a certificate from another CA"],
)
def test_a_peer_without_a_valid_client_certificate_is_refused(
    how: str, tls_scp: StorageServer, pki: Pki, tmp_path: Path
) -> None:
    files = list(make_files(tmp_path / "push", modalities=(("CT", 1),)).values())
    tls = {
        "plain": [],
        "tls without a client certificate": ["+tla", "+cf", str(pki.ca)],
        "a certificate from another CA": [
            "+tls", str(pki.stranger_key), str(pki.stranger_cert), "+cf", str(pki.ca),
        ],
    }[how]  # fmt: skip
    output = _send(tls_scp, files, tls)
    assert "Association Accepted" not in output, output
    assert "Store Response" not in output, output
    assert not Instance.objects.exists()
    # The SCP is still there for those who hold a certificate.
    good = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    assert "Received Store Response (Success)" in _send(tls_scp, files, good)


def test_an_outgoing_echo_speaks_tls(tls_settings: Any, pki: Pki, tmp_path: Path) -> None:
    """dcmtk's storescp as a PACS that requires TLS and a client certificate from the CA."""
    tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    with dcmtk.StoreSCP(tmp_path / "received", aet="TLSPACS", extra=["+xa", *tls]) as peer:
        pacs.echo(pacs.Peer(ae_title="TLSPACS", host="127.0.0.1", port=peer.port))
        # The lean C-MOVE client negotiates over TLS too (here a Verification context, the
        # one this peer accepts).
        with move_scu.associate(
            "127.0.0.1", peer.port, calling_ae="PORTAL", called_ae="TLSPACS",
            abstract_syntax=str(Verification), timeout=10,
        ):  # fmt: skip
            pass
        # Without TLS the same PACS is unreachable: the echo above did use it.
        tls_settings.DICOM_TLS_CERT = tls_settings.DICOM_TLS_KEY = tls_settings.DICOM_TLS_CA = ""
        with pytest.raises(pacs.PacsError):
            pacs.echo(pacs.Peer(ae_title="TLSPACS", host="127.0.0.1", port=peer.port))


def test_the_checks_name_what_is_wrong(settings: Any, pki: Pki, tmp_path: Path) -> None:
    settings.DICOM_TLS_CERT, settings.DICOM_TLS_KEY = str(pki.server_cert), ""
    assert [e.id for e in check_dicom_tls(None)] == ["studies.E001"]
    settings.DICOM_TLS_KEY = str(pki.client_key)  # another certificate's key
    assert [e.id for e in check_dicom_tls(None)] == ["studies.E002"]
    settings.DICOM_TLS_KEY = str(tmp_path / "missing.key")
    assert [e.id for e in check_dicom_tls(None)] == ["studies.E002"]
    settings.DICOM_TLS_KEY = str(pki.server_key)
    settings.DICOM_TLS_CA = str(tmp_path / "missing-ca.pem")
    assert [e.id for e in check_dicom_tls(None)] == ["studies.E003"]
    settings.DICOM_TLS_CA = str(pki.ca)
    assert check_dicom_tls(None) == []
    settings.DICOM_TLS_CERT = settings.DICOM_TLS_KEY = ""
    assert [e.id for e in check_dicom_tls(None)] == ["studies.E001"]
