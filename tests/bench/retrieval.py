"""C-MOVE retrieval of a 300-slice CT: the portal against dcmtk.

Both sides ask the same Orthanc for the same study and receive it on loopback:
- the portal: a retrieval job (`retrieval_job_run`, what `retrieve --wait` and the worker run)
  moving the study to the portal's storage SCP (`run_storescp`, its own process), timed until
  the job is done and every instance is in the store and the index;
- dcmtk: `movescu` moving it to dcmtk's `storescp`, both with TCP_NODELAY=1, timed until
  movescu returns.
Each run starts from an empty store (the portal's files and index rows, dcmtk's folder) and a
settled disk, and the sides alternate so that a passing disturbance hits both.

Two more figures explain the first: the CPU seconds each process spends (on two cores the
processes compete for the same CPU), and, for information, dcmtk's time plus `sha256sum` of
what it received, since the portal records every instance's SHA-256 before a job is done and
storescp computes none.

`run_on_databases` runs it on SQLite and, when DATABASE_URL names a PostgreSQL server, on
PostgreSQL too, each in a process of its own (Django is set up once per process), and adds
the ratio of the two: the production database must not slow the storage SCP down.
"""

import argparse
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.common import Result, database, drop_database, settle
from tests.support import dcmtk, free_port
from tests.support.orthanc import OrthancServer

ROOT = Path(__file__).resolve().parents[2]
PORTAL_AE = "PORTAL"
DCMTK_AE = "DCMTKSCP"


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a running process (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu_seconds() -> float:
    """CPU time of the child processes that ended (movescu, storescp, sha256sum)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_on_databases(*, runs: int = 5, slices: int = 300) -> list[Result]:
    """The C-MOVE figures on SQLite and, with DATABASE_URL set to PostgreSQL, on PostgreSQL,
    and PostgreSQL's time over SQLite's (target ≤ 1.1).

    Each database has a process of its own (Django is set up once per process), and their
    rounds alternate, one at a time: on a shared machine a passing load then weighs on both
    databases alike instead of on whichever ran second."""
    server_url = os.environ.get("DATABASE_URL", "")
    databases = {"SQLite": ""}
    if server_url.startswith(("postgres://", "postgresql://")):
        databases["PostgreSQL"] = server_url
    else:
        print("C-MOVE retrieval on SQLite only: set DATABASE_URL to a PostgreSQL server to compare")
    children: dict[str, subprocess.Popen[str]] = {}
    for label, url in databases.items():
        env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
        if url:
            env["DATABASE_URL"] = url
        children[label] = subprocess.Popen(
            [
                sys.executable, "-u", "-m", "tests.bench.retrieval",
                f"--runs={runs}", f"--slices={slices}", "--paced",
            ],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
    results: list[Result] = []
    portal: dict[str, float] = {}
    try:
        for _round in range(runs + 1):
            for label, child in children.items():
                assert child.stdin is not None and child.stdout is not None
                child.stdin.write("go\n")
                child.stdin.flush()
                while line := child.stdout.readline():
                    print(f"[{label}] {line}", end="")
                    if line.startswith("  run "):
                        break
                else:
                    raise RuntimeError(f"the {label} benchmark stopped")
        for label, child in children.items():
            out, _ = child.communicate(timeout=600)
            if child.returncode:
                raise RuntimeError(f"the {label} benchmark failed")
            *lines, last = out.rstrip("\n").split("\n")
            for line in lines:
                print(f"[{label}] {line}")
            for figure in json.loads(last):
                result = Result(**figure)
                result.name = result.name.replace("C-MOVE retrieval,", f"C-MOVE, {label},")
                results.append(result)
            portal[label] = results[-2].portal
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
    if len(portal) == 2:
        results.append(
            Result(
                name="  C-MOVE, PostgreSQL / SQLite",
                portal=portal["PostgreSQL"],
                anchor=portal["SQLite"],
                target=1.1,
            )
        )
    return results


def main() -> None:
    """One database's figures (DATABASE_URL's), the last line as JSON for run_on_databases.
    With --paced, each round waits for a line on standard input."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench.retrieval")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--paced", action="store_true")
    args = parser.parse_args()
    results = run(runs=args.runs, slices=args.slices, paced=args.paced)
    sys.stdout.flush()
    print(json.dumps([vars(result) for result in results]))


def run(*, runs: int = 5, slices: int = 300, paced: bool = False) -> list[Result]:
    workdir = Path(tempfile.mkdtemp(prefix="portal-bench-"))
    server_url = os.environ.get("DATABASE_URL", "")
    database_url, pg_name = database(workdir, "retrieval")
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "PORTAL_STORE_DIR": str(workdir / "store"),
        "PORTAL_BROKER_DIR": str(workdir / "broker"),
        "PORTAL_AE_TITLE": PORTAL_AE,
        "TCP_NODELAY": "1",
    }
    # A throwaway key: with DEBUG off the settings refuse the demo key.
    env.setdefault("PORTAL_SECRET_KEY", secrets.token_urlsafe(50))
    os.environ.update(env)
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    django.setup()
    from django.core.management import call_command

    from studies import retrieval, services
    from studies.demo import synthetic
    from studies.models import Instance, RetrievalJob, Study
    from studies.store import store_dir

    call_command("migrate", verbosity=0)
    portal_port, dcmtk_port = free_port(), free_port()
    print(f"database: {'PostgreSQL' if pg_name else 'SQLite'}; generating {slices} CT slices…")
    datasets = synthetic.make_study(
        patient_name="Bench^Scanner",
        patient_id="BENCH1",
        modalities=(("CT", slices),),
        rows=512,
        columns=512,
    )
    study_uid = str(datasets[0].StudyInstanceUID)
    files = synthetic.write_study(datasets, workdir / "source")
    del datasets
    storescp = None
    try:
        with OrthancServer(
            modalities={
                "portal": (PORTAL_AE, "127.0.0.1", portal_port),
                "dcmtk": (DCMTK_AE, "127.0.0.1", dcmtk_port),
            },
            workdir=workdir / "orthanc",
        ) as orthanc:
            dcmtk.storescu(
                "127.0.0.1",
                orthanc.dicom_port,
                files,
                aet="BENCHLOAD",
                aec=orthanc.aet,
                timeout=600,
            )
            if len(orthanc.study_instances(study_uid)) != slices:
                raise RuntimeError("Orthanc did not take the whole study")
            node = services.pacs_node_create(
                name="orthanc", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port
            )
            storescp = subprocess.Popen(
                [
                    sys.executable,
                    "manage.py",
                    "run_storescp",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(portal_port),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert storescp.stdout is not None
            storescp.stdout.readline()  # "listening on …": it is ready

            portal_times, dcmtk_times, hash_times = [], [], []
            portal_cpu: list[tuple[float, float, float]] = []
            dcmtk_cpu: list[tuple[float, float]] = []
            orthanc_pid = orthanc.process.pid  # type: ignore[union-attr]
            for index in range(runs + 1):  # the first round warms caches and is not counted
                if paced:
                    sys.stdin.readline()  # the other database's round is over
                for study in Study.objects.filter(study_instance_uid=study_uid):
                    study.delete()
                    shutil.rmtree(store_dir() / study.study_instance_uid, ignore_errors=True)
                settle()
                cpu = (_cpu_seconds(storescp.pid), _own_cpu_seconds(), _cpu_seconds(orthanc_pid))
                started = time.perf_counter()
                job = retrieval.retrieval_job_create(node=node, study_uid=study_uid)
                job = retrieval.retrieval_job_run(job.pk)
                elapsed = time.perf_counter() - started
                spent = (
                    _cpu_seconds(storescp.pid) - cpu[0],
                    _own_cpu_seconds() - cpu[1],
                    _cpu_seconds(orthanc_pid) - cpu[2],
                )
                indexed = Instance.objects.filter(
                    series__study__study_instance_uid=study_uid
                ).count()
                if job.status != RetrievalJob.Status.DONE or indexed != slices:
                    raise RuntimeError(f"portal retrieval incomplete: {job.status} {job.error}")
                target = workdir / f"dcmtk-{index}"
                target.mkdir()
                with dcmtk.StoreSCP(target, port=dcmtk_port, aet=DCMTK_AE):
                    settle()
                    before = (_children_cpu_seconds(), _cpu_seconds(orthanc_pid))
                    started = time.perf_counter()
                    moved = dcmtk.movescu(
                        "127.0.0.1",
                        orthanc.dicom_port,
                        study_uid,
                        move_destination=DCMTK_AE,
                        aet=DCMTK_AE,
                        aec=orthanc.aet,
                        timeout=600,
                    )
                    dcmtk_elapsed = time.perf_counter() - started
                    orthanc_spent = _cpu_seconds(orthanc_pid) - before[1]
                # movescu, and storescp now that it has ended
                dcmtk_spent = _children_cpu_seconds() - before[0]
                if moved.returncode != 0:
                    raise RuntimeError(f"movescu failed: {moved.stderr[-500:]}")
                received = [str(path) for path in target.rglob("*") if path.is_file()]
                if len(received) != slices:
                    raise RuntimeError(f"dcmtk received {len(received)} of {slices} instances")
                started = time.perf_counter()
                subprocess.run(["sha256sum", *received], check=True, capture_output=True)
                hash_elapsed = time.perf_counter() - started
                shutil.rmtree(target)
                if index:
                    portal_times.append(elapsed)
                    dcmtk_times.append(dcmtk_elapsed)
                    hash_times.append(dcmtk_elapsed + hash_elapsed)
                    portal_cpu.append(spent)
                    dcmtk_cpu.append((dcmtk_spent, orthanc_spent))
                print(
                    f"  run {index}: portal {elapsed:.3f} s, dcmtk {dcmtk_elapsed:.3f} s "
                    f"(+ sha256sum {hash_elapsed:.3f} s){' (warm-up)' if not index else ''}"
                )
    finally:
        if storescp is not None:
            storescp.terminate()
            storescp.wait(10)
        from django.db import connections

        connections.close_all()
        drop_database(server_url, pg_name)
        shutil.rmtree(workdir, ignore_errors=True)
    scp_cpu, job_cpu, orthanc_portal = (
        statistics.median(c[i] for c in portal_cpu) for i in range(3)
    )
    tools, orthanc_dcmtk = (statistics.median(c[i] for c in dcmtk_cpu) for i in range(2))
    print(
        f"CPU seconds per run (medians): portal storage SCP {scp_cpu:.2f}, "
        f"retrieval job {job_cpu:.2f}, Orthanc {orthanc_portal:.2f}; "
        f"dcmtk storescp and movescu {tools:.2f}, Orthanc {orthanc_dcmtk:.2f}"
    )
    return [
        # The anchor is the same work as the portal's: the bytes on disk and their digest.
        Result(
            name=f"C-MOVE retrieval, {slices}-slice CT (dcmtk + sha256sum)",
            portal=statistics.median(portal_times),
            anchor=statistics.median(hash_times),
            target=1.0,
        ),
        Result(
            name="  the same, anchor bare dcmtk storescp",
            portal=statistics.median(portal_times),
            anchor=statistics.median(dcmtk_times),
            target=None,
        ),
    ]


if __name__ == "__main__":
    main()
