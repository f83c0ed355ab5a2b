import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from studies import metadata, retrieval, tasks
from studies.models import PacsNode, RetrievalJob


def job_as_dict(job: RetrievalJob) -> dict[str, Any]:
    return {
        "id": job.pk,
        "study_uid": job.study_instance_uid,
        "pacs": job.pacs.name if job.pacs else None,
        "method": job.method,
        "status": job.status,
        "expected": job.expected,
        "received": job.received,
        "failed": job.failed,
        "error": job.error,
    }


class Command(BaseCommand):
    help = "Retrieve a study from a PACS node into the portal's store."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The PACS node (see `pacs list`).")
        parser.add_argument("study_uid", help="The Study Instance UID.")
        parser.add_argument(
            "--wait",
            action="store_true",
            help="Retrieve now, in this process, and print the outcome "
            "(without it, the job is queued for the worker).",
        )
        parser.add_argument("--json", action="store_true", help="Print the job as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            node = PacsNode.objects.get(name=options["name"])
        except PacsNode.DoesNotExist:
            raise CommandError(f"No PACS node named {options['name']!r}.") from None
        try:
            job = retrieval.retrieval_job_create(node=node, study_uid=options["study_uid"])
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from exc
        if options["wait"]:
            job = retrieval.retrieval_job_run(job.pk)
            if job.status == RetrievalJob.Status.DONE:
                metadata.study_metadata_fill(job.study_instance_uid)
        else:
            tasks.retrieval_job_enqueue(job)
        if options["json"]:
            self.stdout.write(json.dumps(job_as_dict(job)))
        elif job.status == RetrievalJob.Status.DONE:
            self.stdout.write(f"Job {job.pk}: done, {job.received} instances received.")
        elif job.status == RetrievalJob.Status.FAILED:
            pass
        else:
            self.stdout.write(f"Job {job.pk}: {job.status}.")
        if job.status == RetrievalJob.Status.FAILED:
            raise CommandError(f"Job {job.pk} failed: {job.error}")
