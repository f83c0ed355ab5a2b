"""`share create|revoke|unlock|rearm|list`: shares from the command line.

The share itself is accounts' (accounts.services); `create` calls studies.services.study_share,
which with `--pacs` also queues the retrieval of a study the store lacks. Such a share is
"pending" until the study is in the store (accounts.selectors.share_status), then "active": the
recipient can open it at any time, and sees "being prepared" until then.
"""

import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts import selectors as account_selectors
from accounts import services as account_services
from accounts.models import Share
from studies import services
from studies.models import PacsNode


def share_as_dict(share: Share) -> dict[str, Any]:
    return {
        "id": share.pk,
        "study_uid": share.study_instance_uid,
        "studies": share.study_uids,
        "recipient": share.recipient,
        "channel": share.channel,
        "expires_at": share.expires_at.isoformat(),
        "status": account_selectors.share_status(share),
        "locked": account_selectors.share_is_locked(share),
        "single_use": share.single_use,
        "download": share.allow_download,
    }


class Command(BaseCommand):
    help = "Create, revoke, unlock, re-arm or list shares (a recipient's access to one study)."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)

        create = sub.add_parser("create", help="Share a study with a patient or a physician.")
        create.add_argument(
            "study_uids",
            nargs="+",
            metavar="STUDY_UID",
            help="The Study Instance UID; more UIDs add priors of the same patient to compare.",
        )
        create.add_argument(
            "--pacs",
            help="Retrieve the study from this PACS node if the store does not have it.",
        )
        who = create.add_mutually_exclusive_group(required=True)
        who.add_argument("--patient-phone", help="The patient's mobile, E.164 (+33612345678).")
        who.add_argument("--patient-email", help="The patient's email address.")
        who.add_argument("--physician-email", help="The referring physician's email address.")
        create.add_argument(
            "--days",
            type=int,
            help="Days until it expires (default 30 for patients, 14 for physicians; at most 90).",
        )
        create.add_argument("--no-download", action="store_true", help="View only, no download.")
        create.add_argument("--single-use", action="store_true", help="The share opens once only.")
        create.add_argument("--json", action="store_true", help="Print one JSON object.")

        revoke = sub.add_parser("revoke", help="End a share now.")
        revoke.add_argument("id", type=int)
        revoke.add_argument("--json", action="store_true", help="Print the share as JSON.")

        unlock = sub.add_parser("unlock", help="Lift a lockout after too many wrong codes.")
        unlock.add_argument("id", type=int)
        unlock.add_argument("--json", action="store_true", help="Print the share as JSON.")

        rearm = sub.add_parser(
            "rearm",
            help="Retrieve again the studies of a live share that the store no longer holds.",
        )
        rearm.add_argument("id", type=int)
        rearm.add_argument(
            "--pacs", help="Retrieve from this PACS node (default: where each study came from)."
        )
        rearm.add_argument("--json", action="store_true", help="Print one JSON object.")

        listing = sub.add_parser("list", help="List shares, newest first.")
        listing.add_argument("--live", action="store_true", help="Only unexpired, unrevoked.")
        listing.add_argument("--json", action="store_true", help="Print one JSON list.")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "create":
            self._create(options)
        elif action == "revoke":
            share = self._get(options["id"])
            account_services.share_revoke(share=share)
            self._done(share, "revoked", options)
        elif action == "unlock":
            share = self._get(options["id"])
            account_services.share_unlock(share=share)
            self._done(share, "unlocked", options)
        elif action == "rearm":
            self._rearm(options)
        else:
            self._list(options)

    def _rearm(self, options: dict[str, Any]) -> None:
        share = self._get(options["id"])
        node = self._node(options["pacs"]) if options["pacs"] else None
        try:
            jobs = services.share_rearm(share=share, node=node)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from exc
        if options["json"]:
            result = {
                "id": share.pk,
                "jobs": [{"id": j.pk, "study_uid": j.study_instance_uid} for j in jobs],
            }
            self.stdout.write(json.dumps(result))
            return
        if not jobs:
            self.stdout.write(f"Share {share.pk}: the store holds every study; nothing to do.")
        for job in jobs:
            self.stdout.write(
                f"Retrieval job {job.pk} queued from {job.pacs}: {job.study_instance_uid}"
            )

    def _node(self, name: str) -> PacsNode:
        try:
            return PacsNode.objects.get(name=name)
        except PacsNode.DoesNotExist:
            raise CommandError(f"No PACS node named {name!r}.") from None

    def _done(self, share: Share, what: str, options: dict[str, Any]) -> None:
        if options["json"]:
            share.refresh_from_db()
            self.stdout.write(json.dumps(share_as_dict(share)))
        else:
            self.stdout.write(f"Share {share.pk} {what}.")

    def _get(self, share_id: int) -> Share:
        try:
            return Share.objects.get(pk=share_id)
        except Share.DoesNotExist:
            raise CommandError(f"No share {share_id}.") from None

    def _create(self, options: dict[str, Any]) -> None:
        study_uid, *priors = options["study_uids"]
        node = self._node(options["pacs"]) if options["pacs"] else None
        if options["patient_phone"]:
            recipient, channel, contact = "patient", "sms", options["patient_phone"]
        elif options["patient_email"]:
            recipient, channel, contact = "patient", "email", options["patient_email"]
        else:
            recipient, channel, contact = "physician", "email", options["physician_email"]
        try:
            shared = services.study_share(
                study_instance_uid=study_uid,
                prior_study_instance_uids=priors,
                node=node,
                recipient=recipient,
                channel=channel,
                contact=contact,
                days=options["days"],
                allow_download=not options["no_download"],
                single_use=options["single_use"],
            )
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from exc
        created = shared.created
        share = created.share
        result = {
            "id": share.pk,
            "url": created.url,
            "access_code": created.access_code,
            "expires_at": share.expires_at.isoformat(),
            "status": account_selectors.share_status(share),
            "studies": share.study_uids,
        }
        if options["json"]:
            self.stdout.write(json.dumps(result))
            return
        self.stdout.write(f"Share {share.pk} ({result['status']}), expires {result['expires_at']}")
        self.stdout.write(f"Link:        {created.url}")
        self.stdout.write(f"Access code: {created.access_code}")
        for job in shared.jobs:
            self.stdout.write(
                f"Retrieval job {job.pk} queued from {node}: {job.study_instance_uid}"
            )
        if not shared.jobs and not shared.in_store:
            self.stdout.write("The store lacks a study of this share: it stays pending.")

    def _list(self, options: dict[str, Any]) -> None:
        shares = [share_as_dict(s) for s in account_selectors.share_list(live_only=options["live"])]
        if options["json"]:
            self.stdout.write(json.dumps(shares))
            return
        for s in shares:
            locked = " locked" if s["locked"] else ""
            self.stdout.write(
                f"{s['id']:>6}  {s['status']:<8}{locked}  {s['recipient']:<9}  "
                f"{s['expires_at'][:16]}  {s['study_uid']}"
            )
