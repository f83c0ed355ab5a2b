"""Demo data for `make demo`: synthetic studies in the local archive, a staff user, a share.

Idempotent: the demo studies have fixed Study Instance UIDs and are generated only when the
archive lacks them; the staff user and its TOTP device are reused. The password cannot be read
back from its hash, so every run sets a fresh one and prints it.
"""

import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.urls import NoReverseMatch, reverse
from django_otp.plugins.otp_totp.models import TOTPDevice
from pydicom.uid import generate_uid

from accounts import services as account_services
from accounts.models import Share, User
from studies import imports
from studies.demo import synthetic
from studies.models import Study

DEMO_USERNAME = "demo"
DEMO_EMAIL = "demo@example.org"
DEMO_DEVICE_NAME = "demo authenticator"
# A number set aside for fiction by the French regulator: no real phone ever has it.
DEMO_PHONE = "+33639980000"


@dataclass(frozen=True)
class DemoStudy:
    key: str
    patient_name: str
    patient_id: str
    description: str
    # (modality, slices) per series: a handful of small slices so the demo starts in seconds.
    series: tuple[tuple[str, int], ...]
    charset: str = "ISO_IR 192"

    @property
    def study_uid(self) -> str:
        # The same UID on every run, which is what makes the command idempotent.
        return str(generate_uid(entropy_srcs=["image-portal demo study", self.key]))


DEMO_STUDIES = (
    DemoStudy(
        key="thorax-abdomen",
        patient_name="Lefèvre^Hélène",
        patient_id="DEMO-0001",
        description="Scanner et IRM thoraco-abdominaux",
        series=(("CT", 12), ("MR", 8)),
    ),
    DemoStudy(
        key="chest-ct",
        patient_name="Moreau^François",
        patient_id="DEMO-0002",
        description="Scanner thoracique",
        series=(("CT", 10),),
        charset="ISO_IR 100",
    ),
)


class Command(BaseCommand):
    help = (
        "Create the demo data: synthetic CT and MR studies in the local archive, the staff "
        f"user {DEMO_USERNAME!r} (password and TOTP secret printed) and a demo share."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        studies = [self._ensure_study(demo) for demo in DEMO_STUDIES]
        password, otpauth_uri = self._ensure_staff_user()
        self.stdout.write("")
        self.stdout.write(f"Staff login:  {settings.BASE_URL}{_staff_login_path()}")
        self.stdout.write(f"              user {DEMO_USERNAME}, password {password}")
        self.stdout.write(f"TOTP secret:  {otpauth_uri}")
        self.stdout.write(
            "              (paste it, or its secret= value, into an authenticator app)"
        )
        _create_demo_share(studies[0], self.stdout.write)

    def _ensure_study(self, demo: DemoStudy) -> Study:
        existing = Study.objects.filter(study_instance_uid=demo.study_uid).first()
        if existing is not None:
            self.stdout.write(f"Study {demo.description!r} is already in the archive.")
            return existing
        datasets = synthetic.make_study(
            patient_name=demo.patient_name,
            patient_id=demo.patient_id,
            modalities=demo.series,
            rows=128,
            columns=128,
            charset=demo.charset,
            study_uid=demo.study_uid,
            study_description=demo.description,
        )
        with tempfile.TemporaryDirectory(prefix="portal-demo-") as folder:
            synthetic.write_study(datasets, Path(folder))
            report = imports.dicom_import([Path(folder)])
        if report.error:
            raise CommandError(f"The demo study could not be imported: {report.error}")
        if report.skipped:
            reasons = "; ".join(f"{path}: {reason}" for path, reason in report.skipped)
            raise CommandError(f"The demo study could not be imported: {reasons}")
        self.stdout.write(
            f"Imported {demo.description!r} ({report.imported} instances) into the local archive."
        )
        return Study.objects.get(study_instance_uid=demo.study_uid)

    @transaction.atomic
    def _ensure_staff_user(self) -> tuple[str, str]:
        password = secrets.token_urlsafe(12)
        user, _ = User.objects.get_or_create(
            username=DEMO_USERNAME,
            defaults={"email": DEMO_EMAIL, "first_name": "Demo", "last_name": "Staff"},
        )
        user.role = User.Role.ADMIN
        user.is_staff = True
        user.is_superuser = True
        user.is_active = True
        user.set_password(password)
        user.save()
        device, _ = TOTPDevice.objects.get_or_create(
            user=user, name=DEMO_DEVICE_NAME, defaults={"confirmed": True}
        )
        return password, device.config_url


def _create_demo_share(study: Study, write: Any) -> None:
    """DEMO SHARE: a patient share of `study`, with its link and access code printed.

    The link and code exist in clear only when a share is created, so every run makes a new
    share and revokes the previous demo shares: there is always exactly one that works.
    """
    previous = Share.objects.live().filter(
        study_instance_uid=study.study_instance_uid, contact=DEMO_PHONE
    )
    for share in previous:
        account_services.share_revoke(share=share)
    created = account_services.share_create(
        study_instance_uid=study.study_instance_uid,
        recipient=Share.Recipient.PATIENT,
        channel=Share.Channel.SMS,
        contact=DEMO_PHONE,
    )
    write(f"Demo share:   {created.url}")
    write(f"Access code:  {created.access_code}")
    write(f'              (the one-time code "sent" to {DEMO_PHONE} is printed by the server)')


def _staff_login_path() -> str:
    """The staff workspace's login once it exists; until then the admin's, which takes the
    same password and TOTP code."""
    try:
        return reverse("staff:login")
    except NoReverseMatch:
        return reverse("admin:login")
