"""What there is to see: PACS nodes, the local study index and retrieval jobs."""

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _


class PacsNode(models.Model):
    """A DICOM peer: a PACS we query and retrieve from, or a modality that pushes to us.

    Only configured nodes may open associations with the storage SCP.
    """

    class Retrieve(models.TextChoices):
        MOVE = "move", "C-MOVE"
        GET = "get", "C-GET"
        WADO = "wado", "WADO-RS"

    name = models.SlugField(_("name"), max_length=64, unique=True)
    ae_title = models.CharField(_("AE title"), max_length=16)
    host = models.CharField(_("host"), max_length=255)
    port = models.PositiveIntegerField(_("port"))
    dicomweb_url = models.URLField(_("DICOMweb URL"), blank=True)
    retrieve_method = models.CharField(
        _("retrieve method"), max_length=8, choices=Retrieve.choices, default=Retrieve.MOVE
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"


class StudyQuerySet(models.QuerySet["Study"]):
    def with_instances(self) -> "StudyQuerySet":
        """Studies with at least one indexed instance (a study row alone may be left by an
        interrupted transfer or a purge), complete or not."""
        return self.filter(
            models.Exists(Instance.objects.filter(series__study=models.OuterRef("pk")))
        )

    def in_store(self) -> "StudyQuerySet":
        """The one definition of a study being in the store: it has indexed instances and no
        retrieval of it is under way or ended without it (its latest retrieval job, if any, is
        done). A study whose retrieval is still running, waiting for a retry or failed for good
        holds only part of its instances: its shares stay pending and recipients see none of
        it, rather than a partial study as if it were complete."""
        latest_retrieval = (
            RetrievalJob.objects.filter(study_instance_uid=models.OuterRef("study_instance_uid"))
            .order_by("-created_at", "-pk")
            .values("status")[:1]
        )
        return (
            self.with_instances()
            .annotate(latest_retrieval=models.Subquery(latest_retrieval))
            .filter(
                models.Q(latest_retrieval__isnull=True)
                | models.Q(latest_retrieval=RetrievalJob.Status.DONE)
            )
        )

    def disposable(self) -> "StudyQuerySet":
        """Copies `purge` may delete once no live share needs them: brought by a retrieval
        for a share, and neither pushed nor imported (the local archive's) since."""
        return self.filter(retrieved_copy=True, archived=False)


class Study(models.Model):
    study_instance_uid = models.CharField(max_length=64, unique=True)
    patient_name = models.CharField(max_length=255, blank=True)
    patient_id = models.CharField(max_length=64, blank=True)
    patient_birth_date = models.CharField(max_length=8, blank=True)
    patient_sex = models.CharField(max_length=16, blank=True)
    study_date = models.CharField(max_length=8, blank=True)
    study_time = models.CharField(max_length=16, blank=True)
    accession_number = models.CharField(max_length=64, blank=True)
    study_description = models.CharField(max_length=255, blank=True)
    referring_physician_name = models.CharField(max_length=255, blank=True)
    source = models.ForeignKey(
        PacsNode,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="studies",
        help_text="The node it came from; empty for the local archive.",
    )
    # A copy that a retrieval brought for a share: `purge` deletes it once no live share
    # needs it. Anything else (pushed by a modality or a PACS, imported from a CD, or a study
    # that was there before it was retrieved) is the local archive, which `purge` keeps.
    retrieved_copy = models.BooleanField(default=False)
    # Pushed to the storage SCP or imported at least once: the local archive's for good, even
    # when a retrieval of ours brought it too (whichever ended last).
    archived = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = StudyQuerySet.as_manager()

    class Meta:
        ordering = ["-study_date", "-created_at"]
        verbose_name_plural = "studies"
        indexes = [
            models.Index(fields=["patient_id"]),
            models.Index(fields=["accession_number"]),
            models.Index(fields=["study_date"]),
        ]

    def __str__(self) -> str:
        return f"{self.study_date} {self.patient_name} {self.study_description}".strip()


class Series(models.Model):
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="series")
    series_instance_uid = models.CharField(max_length=64, unique=True)
    modality = models.CharField(max_length=16, blank=True)
    series_number = models.IntegerField(null=True, blank=True)
    series_description = models.CharField(max_length=255, blank=True)
    body_part_examined = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["series_number", "created_at"]
        verbose_name_plural = "series"

    def __str__(self) -> str:
        return f"{self.modality} {self.series_number} {self.series_description}".strip()


class Instance(models.Model):
    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="instances")
    sop_instance_uid = models.CharField(max_length=64, unique=True)
    sop_class_uid = models.CharField(max_length=64)
    instance_number = models.IntegerField(null=True, blank=True)
    transfer_syntax_uid = models.CharField(max_length=64)
    rows = models.PositiveIntegerField(null=True, blank=True)
    columns = models.PositiveIntegerField(null=True, blank=True)
    number_of_frames = models.PositiveIntegerField(default=1)
    # Relative to settings.STORE_DIR.
    file_path = models.CharField(max_length=255)
    size = models.BigIntegerField(help_text="Bytes of the Part 10 file in the store.")
    # SHA-256 of the data set as the sender encoded it (the file minus the file meta
    # header the portal writes): equal to the PACS copy's whatever the transport.
    sha256 = models.CharField(max_length=64)
    # Its DICOM JSON model for WADO-RS metadata (studies.metadata), computed once; "" until then.
    metadata = models.TextField(blank=True, db_default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["instance_number", "sop_instance_uid"]

    def __str__(self) -> str:
        return self.sop_instance_uid


class RetrievalJob(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", _("Queued")
        RUNNING = "running", _("Running")
        DONE = "done", _("Done")
        FAILED = "failed", _("Failed")

    class Failure(models.TextChoices):
        """Why the last attempt failed, for words a person can act on (the staff workspace);
        `error` keeps the technical account."""

        UNREACHABLE = "unreachable", _("PACS unreachable")
        SILENT = "silent", _("PACS silent")
        PORTAL_UNKNOWN = "portal_unknown", _("Portal unknown to the PACS")
        DESTINATION_UNKNOWN = "destination_unknown", _("Move destination unknown to the PACS")
        STUDY_MISSING = "study_missing", _("Study not on the PACS")
        PARTIAL = "partial", _("Some instances not sent")
        NOTHING_SENT = "nothing_sent", _("No instance sent")
        NOT_INDEXED = "not_indexed", _("Instances not indexed")
        DICOMWEB = "dicomweb", _("DICOMweb error")
        STORE = "store", _("Store error")
        WORKER_LOST = "worker_lost", _("Worker stopped")
        OTHER = "other", _("Other error")

    pacs = models.ForeignKey(PacsNode, null=True, on_delete=models.SET_NULL, related_name="jobs")
    study_instance_uid = models.CharField(max_length=64)
    method = models.CharField(max_length=8, choices=PacsNode.Retrieve.choices)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.QUEUED)
    expected = models.PositiveIntegerField(null=True, blank=True)
    received = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    attempts = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    error_kind = models.CharField(max_length=24, choices=Failure.choices, blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    # Until when the worker running the job holds it: renewed while the worker lives, so
    # that only a worker gone silent (killed, its machine down) has its job taken over.
    lease_until = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["study_instance_uid", "status"])]

    def __str__(self) -> str:
        return f"job {self.pk} {self.study_instance_uid} {self.status}"
