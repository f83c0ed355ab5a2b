"""DICOM TLS (PS3.15 B.9, the BCP 195 secure transport profile): the contexts of the storage
SCP and of outgoing associations, from PORTAL_DICOM_TLS_CERT, _KEY and _CA.

With a certificate and its key, the storage SCP speaks TLS only (a plain association fails
its handshake) and every outgoing association (C-ECHO, C-FIND, C-GET with pynetdicom; C-MOVE
with move_scu) uses TLS and presents the same certificate. With a CA too, every peer must
present a certificate that CA signed: the SCP requires client certificates, and a PACS's
certificate is checked against that CA only. Without a CA a PACS's certificate is checked
against the system's trusted CAs and its host name.
"""

import ssl

from django.conf import settings


class TlsConfigurationError(Exception):
    """The TLS files cannot be read or do not go together."""


def enabled() -> bool:
    return bool(settings.DICOM_TLS_CERT and settings.DICOM_TLS_KEY)


def _hardened(context: ssl.SSLContext) -> ssl.SSLContext:
    # BCP 195: TLS 1.2 or later; Python's default ciphers are the profile's.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _load_chain(context: ssl.SSLContext) -> None:
    try:
        context.load_cert_chain(settings.DICOM_TLS_CERT, settings.DICOM_TLS_KEY)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigurationError(
            f"cannot use PORTAL_DICOM_TLS_CERT with PORTAL_DICOM_TLS_KEY: {exc}"
        ) from exc


def _load_ca(context: ssl.SSLContext) -> None:
    try:
        context.load_verify_locations(cafile=settings.DICOM_TLS_CA)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigurationError(f"cannot read PORTAL_DICOM_TLS_CA: {exc}") from exc


def server_context() -> ssl.SSLContext | None:
    """The storage SCP's context, or None when TLS is not configured."""
    if not enabled():
        return None
    context = _hardened(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(context)
    if settings.DICOM_TLS_CA:
        _load_ca(context)
        # Only nodes holding a certificate from the hospital's DICOM CA may send.
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context() -> ssl.SSLContext | None:
    """The context of outgoing associations, or None when TLS is not configured."""
    if not enabled():
        return None
    context = _hardened(ssl.create_default_context(ssl.Purpose.SERVER_AUTH))
    _load_chain(context)
    if settings.DICOM_TLS_CA:
        # A private CA that signs the hospital's DICOM nodes: trust it alone. Nodes are often
        # configured by address, and such certificates seldom name it, so the chain to this
        # CA is what is checked, not the host name (PS3.15 B.9 leaves peer naming to policy).
        context = _hardened(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        _load_chain(context)
        _load_ca(context)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def configuration_errors() -> list[tuple[str, str]]:
    """What is wrong with the TLS settings, as (check id, problem) pairs for the system
    checks: studies.E001 the settings do not go together, E002 the certificate or key cannot
    be used (unreadable, not PEM, a key that is not the certificate's), E003 the CA cannot."""
    cert, key, ca = settings.DICOM_TLS_CERT, settings.DICOM_TLS_KEY, settings.DICOM_TLS_CA
    if bool(cert) != bool(key):
        return [("studies.E001", "PORTAL_DICOM_TLS_CERT and PORTAL_DICOM_TLS_KEY go together.")]
    if ca and not cert:
        return [("studies.E001", "PORTAL_DICOM_TLS_CA is set without PORTAL_DICOM_TLS_CERT.")]
    if not cert:
        return []
    errors = []
    try:
        _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    except TlsConfigurationError as exc:
        errors.append(("studies.E002", str(exc)))
    if ca:
        try:
            _load_ca(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        except TlsConfigurationError as exc:
            errors.append(("studies.E003", str(exc)))
    return errors
