"""The load scenario's own process (`python -m tests.bench.loadgen`, started by
tests.bench.load): locust patches the standard library for gevent when it is imported, which
must happen before anything opens a socket or starts a thread, and must not happen in the
process that runs the other benchmarks.

It builds the deployment, runs the phases, and prints its figures as one JSON list on its last
line of output.
"""

# First: locust's import patches sockets, threads and subprocesses for gevent.
from locust import FastHttpUser, between, constant, task  # isort: skip
from locust.env import Environment  # isort: skip

import argparse
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import gevent
from requests.cookies import create_cookie

from tests.bench.common import Result, database, drop_database

if TYPE_CHECKING:
    from tests.support.gunicorn import PortalServer

ROOT = Path(__file__).resolve().parents[2]
PHONE = "+33612345642"
# The brute-force client: one address, as one attacker's machine (or NAT) behind the load
# balancer. The recipients each come from their own.
ATTACKER_ADDRESS = "203.0.113.66"
# gunicorn as deploy/gunicorn.conf.py runs it on two cores: (cores + 1) gthread processes of
# eight threads each.
GUNICORN_WORKERS = 3
GUNICORN_THREADS = 8
# What a recipient does between two requests (seconds): look at a slice, scroll to the next.
# The viewer itself prefetches a series in bursts, then shows slices from the browser's memory:
# one request every two seconds on average is a session that keeps asking for new images.
THINK_TIME = (1.0, 3.0)
# New recipient sessions per second at the start of a phase: 200 arrive within 10 s.
SPAWN_RATE = 20

# Each kind of request, as printed.
VIEWER_PAGE = "viewer page"
STUDY_METADATA = "study metadata (WADO-RS)"
INSTANCE_METADATA = "instance metadata (WADO-RS)"
FRAME = "rendered frame"
THUMBNAIL = "series thumbnail"
ATTACK = "brute force POST /access/"
KINDS = [FRAME, THUMBNAIL, STUDY_METADATA, INSTANCE_METADATA, VIEWER_PAGE]


@dataclass(frozen=True)
class Browsing:
    """What one simulated recipient holds: its session cookie, its address, its study."""

    cookie: str
    address: str
    study: str
    series: str
    sops: list[str]


# --- the simulated clients -----------------------------------------------------------------


class Recipient(FastHttpUser):
    """A signed-in recipient in the viewer: the page, the study's metadata and the series
    thumbnail first, then slice after slice of rendered frames (as the viewer asks for them,
    at its 512 px viewport), now and then an instance's metadata (the contrast tool reads the
    stored window) or the thumbnail again."""

    wait_time = between(*THINK_TIME)
    weight = 1
    sessions: ClassVar[list[Browsing]] = []
    cookie_name: ClassVar[str] = "sessionid"

    def on_start(self) -> None:
        self.browsing = self.sessions.pop()
        host = self.host.split("://", 1)[1].split(":", 1)[0] if self.host else "127.0.0.1"
        self.client.cookiejar.set_cookie(
            create_cookie(self.cookie_name, self.browsing.cookie, domain=host, path="/")
        )
        self.headers = {"X-Forwarded-For": self.browsing.address}
        self.slice = random.randrange(len(self.browsing.sops))
        self.series_url = f"/dicomweb/studies/{self.browsing.study}/series/{self.browsing.series}"
        self.client.get("/viewer/", headers=self.headers, name=VIEWER_PAGE)
        self.client.get(
            f"/dicomweb/studies/{self.browsing.study}/metadata",
            headers={**self.headers, "Accept": "application/dicom+json"},
            name=STUDY_METADATA,
        )
        self.thumbnail()

    @task(18)
    def next_slice(self) -> None:
        self.slice = (self.slice + 1) % len(self.browsing.sops)
        sop = self.browsing.sops[self.slice]
        self.client.get(
            f"{self.series_url}/instances/{sop}/frames/1/rendered?viewport=512,512",
            headers={**self.headers, "Accept": "image/jpeg"},
            name=FRAME,
        )

    @task(1)
    def instance_metadata(self) -> None:
        sop = self.browsing.sops[self.slice]
        self.client.get(
            f"{self.series_url}/instances/{sop}/metadata",
            headers={**self.headers, "Accept": "application/dicom+json"},
            name=INSTANCE_METADATA,
        )

    @task(1)
    def thumbnail(self) -> None:
        self.client.get(
            f"{self.series_url}/thumbnail",
            headers={**self.headers, "Accept": "image/jpeg"},
            name=THUMBNAIL,
        )


class BruteForce(FastHttpUser):
    """One client posting wrong access codes to /access/ as fast as it is answered, from one
    address, solving the captcha (the test servers' captcha answer: the worst case, a
    captcha-solving service). It keeps hammering once locked out."""

    fixed_count = 1
    wait_time = constant(0)
    # The status of each attempt, in order.
    statuses: ClassVar[list[int]] = []
    # Whether the first 429 was the lockout page (rather than the request budget's).
    first_429_locked: ClassVar[list[bool]] = []

    def on_start(self) -> None:
        self.headers = {"X-Forwarded-For": ATTACKER_ADDRESS}
        self.client.get("/access/", headers=self.headers, name="brute force GET /access/")
        self.csrf = next(
            cookie.value for cookie in self.client.cookiejar if cookie.name == "csrftoken"
        )

    @task
    def guess(self) -> None:
        from accounts import credentials

        code = credentials.format_code(credentials.new_prefix() + "0" * 12)
        data = {
            "code": code,
            "captcha_0": "x",
            "captcha_1": "PASSED",
            "csrfmiddlewaretoken": self.csrf,
        }
        with self.client.post(
            "/access/", data=data, headers=self.headers, name=ATTACK, catch_response=True
        ) as response:
            status = response.status_code
            self.statuses.append(status)
            if status == 429 and not self.first_429_locked:
                self.first_429_locked.append("Too many attempts" in (response.text or ""))
            # A refusal (200, the "not valid" page) or a lockout (429) is what it should get.
            if status in (200, 429):
                response.success()
            else:
                response.failure(f"HTTP {status}")


# --- one phase ---------------------------------------------------------------------------------


@dataclass
class Phase:
    seconds: float
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    kinds: dict[str, dict[str, float]] = field(default_factory=dict)
    attempts_until_429: int | None = None
    locked_out: bool = False
    # CPU seconds the gunicorn processes and this load generator spent during the phase.
    server_cpu: float = 0.0
    client_cpu: float = 0.0


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process (Linux), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_cpu(server: "PortalServer") -> float:
    """CPU seconds of gunicorn's master and worker processes so far."""
    from tests.bench.viewing import _children

    assert server.process is not None
    pids = [server.process.pid, *_children(server.process.pid)]
    return sum(_cpu_seconds(pid) for pid in pids)


def run_phase(
    server: "PortalServer", browsing: list[Browsing], seconds: float, *, attacker: bool
) -> Phase:
    host = server.url
    Recipient.sessions = list(browsing)
    BruteForce.statuses = []
    BruteForce.first_429_locked = []
    user_classes: list[type[FastHttpUser]] = [Recipient, BruteForce] if attacker else [Recipient]
    environment = Environment(user_classes=list(user_classes), host=host)
    runner = environment.create_local_runner()
    server_cpu, client_cpu = _server_cpu(server), _cpu_seconds(os.getpid())
    started = time.monotonic()
    runner.start(len(browsing) + (1 if attacker else 0), spawn_rate=SPAWN_RATE)
    gevent.sleep(seconds)
    runner.quit()
    elapsed = time.monotonic() - started
    stats = environment.stats
    phase = Phase(
        seconds=elapsed,
        server_cpu=_server_cpu(server) - server_cpu,
        client_cpu=_cpu_seconds(os.getpid()) - client_cpu,
    )
    for (name, _method), entry in stats.entries.items():
        if entry.num_requests == 0:
            continue
        phase.kinds[name] = {
            "requests": entry.num_requests,
            "rps": entry.num_requests / elapsed,
            "p50": entry.get_response_time_percentile(0.50),
            "p95": entry.get_response_time_percentile(0.95),
            "p99": entry.get_response_time_percentile(0.99),
            "failures": entry.num_failures,
        }
        if not name.startswith("brute force"):
            phase.requests += entry.num_requests
    phase.errors = stats.total.num_failures + len(runner.exceptions)
    phase.error_samples = [
        f"{error.method} {error.name}: {error.error} ×{error.occurrences}"
        for error in list(stats.errors.values())[:5]
    ] + [str(exception["msg"])[:200] for exception in list(runner.exceptions.values())[:5]]
    if attacker and 429 in BruteForce.statuses:
        phase.attempts_until_429 = BruteForce.statuses.index(429) + 1
        phase.locked_out = bool(BruteForce.first_429_locked and BruteForce.first_429_locked[0])
    return phase


# --- the deployment ----------------------------------------------------------------------------


def warm_up(server: "PortalServer", browsing: Browsing, timeout: float = 60.0) -> None:
    """Until every gunicorn process has served requests: a process loads the application and
    the imaging libraries on its first requests, which is start-up, not load. Bursts of
    concurrent requests (the health check, one session's viewer page and a rendered frame),
    twice at least, until each process's id appears in the access log."""
    import requests
    from gevent.pool import Pool

    frame = (
        f"{server.url}/dicomweb/studies/{browsing.study}/series/{browsing.series}"
        f"/instances/{browsing.sops[-1]}/frames/1/rendered?viewport=512,512"
    )
    cookies = {Recipient.cookie_name: browsing.cookie}

    def fetch(number: int) -> None:
        url = (f"{server.url}/healthz", frame, f"{server.url}/viewer/")[number % 3]
        requests.get(url, cookies=cookies, timeout=30).raise_for_status()

    deadline = time.monotonic() + timeout
    bursts = 0
    while bursts < 2 or len(server.worker_pids()) < server.workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"gunicorn's processes did not all answer:\n{server.logs()[-2000:]}")
        Pool(24).map(fetch, range(48))
        bursts += 1


def _manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {args[0]} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def _studies(workdir: Path, count: int, slices: int) -> list[tuple[str, str, list[str]]]:
    """`count` CT studies of `slices` 512×512 slices, written under workdir/source: one
    generated, the others the same slices under new UIDs. (study, series, SOP UIDs in order)."""
    from studies.demo import synthetic
    from tests.bench.viewing import _restamped, _study

    datasets = synthetic.make_study(
        patient_name="Bench^Load",
        patient_id="BENCH-LOAD",
        modalities=(("CT", slices),),
        rows=512,
        columns=512,
    )
    files = synthetic.write_study(datasets, workdir / "source" / "0")
    del datasets
    made = [_study(files)]
    for number in range(1, count):
        folder = workdir / "source" / str(number)
        folder.mkdir(parents=True)
        made.append(_study(_restamped(files, slices, folder)))
    return [(study.uid, study.series, study.sops) for study in made]


def _sessions(studies: list[tuple[str, str, list[str]]], count: int) -> list[Browsing]:
    """`count` shares spread over the studies, each with a recipient session that has passed
    both steps (link or code, then the one-time code), written where Django keeps sessions, as
    the real steps leave it."""
    from django.conf import settings
    from django.contrib.sessions.backends.db import SessionStore

    from accounts import access, services

    browsing = []
    for number in range(count):
        study, series, sops = studies[number % len(studies)]
        created = services.share_create(
            study_instance_uid=study, recipient="patient", channel="sms", contact=PHONE
        )
        session = SessionStore()
        now = int(time.time())
        session[access.SHARE] = created.share.pk
        session[access.STAGE] = access.VERIFIED
        session[access.STARTED] = now
        session[access.SEEN] = now
        session[access.VERIFIED_BY] = access.BY_OTP
        session[access.VERIFIED_AT] = now
        session.set_expiry(settings.RECIPIENT_SESSION_IDLE)
        session.create()
        # 10.x.y.z: a private address per recipient, as the load balancer forwards them.
        address = f"10.{number // 65536 % 256}.{number // 256 % 256}.{number % 256 + 1}"
        browsing.append(Browsing(str(session.session_key), address, study, series, list(sops)))
    return browsing


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.loadgen")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--slices", type=int, default=30)
    args = parser.parse_args()

    from locust.log import setup_logging

    setup_logging("WARNING")
    workdir = Path(tempfile.mkdtemp(prefix="portal-bench-load-"))
    server_url = os.environ["DATABASE_URL"]
    database_url, pg_name = database(workdir, "load")
    store = workdir / "store"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "DATABASE_URL": database_url,
        "PORTAL_STORE_DIR": str(store),
        "PORTAL_BROKER_DIR": str(workdir / "broker"),
        "PORTAL_SECRET_KEY": secrets.token_urlsafe(50),
        "PORTAL_DEBUG": "false",
        "PORTAL_LOG_LEVEL": "WARNING",
    }
    try:
        print(
            f"load: {args.studies} CT studies of {args.slices} 512×512 slices, "
            f"{args.sessions} recipient sessions…",
            flush=True,
        )
        studies = _studies(workdir, args.studies, args.slices)
        _manage(env, "migrate", "--noinput")
        _manage(env, "import_dicom", str(workdir / "source"))
        shutil.rmtree(workdir / "source")
        os.environ.update(env)
        import django

        django.setup()
        from django.conf import settings

        from tests.support.gunicorn import PortalServer

        Recipient.cookie_name = settings.SESSION_COOKIE_NAME
        started = time.perf_counter()
        browsing = _sessions(studies, args.sessions)
        print(
            f"  {args.sessions} shares and signed-in sessions in "
            f"{time.perf_counter() - started:.1f} s",
            flush=True,
        )
        server_env = {
            "PORTAL_STORE_DIR": str(store),
            # Behind the load balancer: each client is the address it forwards.
            "PORTAL_TRUSTED_PROXIES": "127.0.0.1",
            "PORTAL_LOG_LEVEL": "WARNING",
            # Persistent database connections, as a production deployment keeps them.
            "PORTAL_DB_CONN_MAX_AGE": "60",
        }
        gunicorn_args = ["--worker-class", "gthread", "--threads", str(GUNICORN_THREADS)]
        phases: dict[str, Phase] = {}
        # The attack first: it also pays for each session's first view (its audit event).
        for name, attacker in (("attack", True), ("quiet", False)):
            # A fresh server for each phase: its processes' rendered-image caches start empty.
            server = PortalServer(
                workdir=workdir / f"gunicorn-{name}",
                workers=GUNICORN_WORKERS,
                env=server_env,
                args=gunicorn_args,
            )
            with server:
                warm_up(server, browsing[0])
                print(
                    f"  phase {name!r}: {args.sessions} sessions"
                    f"{' and the brute-force client' if attacker else ''} "
                    f"for {args.seconds:.0f} s…",
                    flush=True,
                )
                phases[name] = run_phase(server, browsing, args.seconds, attacker=attacker)
    finally:
        # This process's own connection first: PostgreSQL drops no database still in use.
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()
        drop_database(server_url, pg_name)
        shutil.rmtree(workdir, ignore_errors=True)
    results, notes = figures(phases, args)
    for note in notes:
        print("  " + note, flush=True)
    print(json.dumps([asdict(result) for result in results]))
    return 0


def figures(phases: dict[str, Phase], args: argparse.Namespace) -> tuple[list[Result], list[str]]:
    attack, quiet = phases["attack"], phases["quiet"]
    notes = [
        f"gunicorn: {GUNICORN_WORKERS} gthread processes × {GUNICORN_THREADS} threads, "
        "PostgreSQL (persistent connections), Redis cache; sessions ramp up at "
        f"{SPAWN_RATE}/s, think time {THINK_TIME[0]}–{THINK_TIME[1]} s between requests; "
        f"{args.studies} studies × {args.slices} slices, {args.sessions // args.studies} "
        "sessions per study; the load generator runs on the same two cores",
        f"{'phase':<7} {'kind':<30} {'requests':>8} {'req/s':>7} {'p50':>6} {'p95':>6} "
        f"{'p99':>6} {'errors':>6}",
    ]
    for label, phase in (("attack", attack), ("quiet", quiet)):
        for kind, row in sorted(phase.kinds.items()):
            notes.append(
                f"{label:<7} {kind:<30} {row['requests']:>8.0f} {row['rps']:>7.1f} "
                f"{row['p50']:>4.0f}ms {row['p95']:>4.0f}ms {row['p99']:>4.0f}ms "
                f"{row['failures']:>6.0f}"
            )
        notes += [f"{label} error: {sample}" for sample in phase.error_samples]
    for label, phase in (("attack", attack), ("quiet", quiet)):
        total = sum(row["requests"] for row in phase.kinds.values())
        notes.append(
            f"{label}: gunicorn used {phase.server_cpu:.1f} CPU s in {phase.seconds:.0f} s "
            f"({phase.server_cpu / max(total, 1) * 1e3:.1f} ms per request, "
            f"{phase.server_cpu / phase.seconds / (os.cpu_count() or 1):.0%} of the machine's "
            f"{os.cpu_count()} cores), the load generator {phase.client_cpu:.1f} CPU s"
        )
    if attack.attempts_until_429 is not None:
        first = "the lockout page" if attack.locked_out else "the request budget, not the lockout"
        notes.append(
            f"brute force: first 429 at attempt {attack.attempts_until_429} ({first}); "
            f"{attack.kinds.get(ATTACK, {}).get('requests', 0):.0f} attempts in the phase"
        )
    frame = attack.kinds.get(FRAME, {})
    quiet_frame = quiet.kinds.get(FRAME, {})
    browsing_p95 = [attack.kinds[k]["p95"] for k in KINDS if k in attack.kinds]
    results = [
        Result(
            f"load: {args.sessions} sessions + brute force, requests/s",
            attack.requests / attack.seconds,
            None,
            None,
            "/s",
        ),
        Result("load: errors (recipients and attacker)", attack.errors, None, 0, ""),
        Result("load: rendered frame p50", frame.get("p50", float("nan")), None, None, "ms"),
        Result("load: rendered frame p95", frame.get("p95", float("nan")), None, 250, "ms"),
        Result("load: rendered frame p99", frame.get("p99", float("nan")), None, None, "ms"),
        Result(
            "load: browsing p95, worst kind",
            max(browsing_p95) if browsing_p95 else float("nan"),
            None,
            None,
            "ms",
        ),
        Result(
            "load: brute force, attempts until locked out (429)",
            float(attack.attempts_until_429)
            if attack.attempts_until_429 is not None and attack.locked_out
            else float("nan"),
            None,
            6,
            "",
        ),
        Result(
            "load: frame p95 with the attacker (anchor: without)",
            frame.get("p95", float("nan")),
            quiet_frame.get("p95", float("nan")),
            None,
            "ms",
        ),
        Result("load: errors without the attacker", quiet.errors, None, 0, ""),
        # Independent of what else the machine runs: the server's CPU per request served.
        Result(
            "load: gunicorn CPU per request (with the attacker)",
            attack.server_cpu / max(sum(r["requests"] for r in attack.kinds.values()), 1) * 1e3,
            None,
            None,
            "ms",
        ),
    ]
    notes.append(
        f"without the attacker: {quiet.requests / quiet.seconds:.1f} requests/s, rendered frame "
        f"p95 {quiet_frame.get('p95', float('nan')):.0f} ms"
    )
    return results, notes


if __name__ == "__main__":
    sys.exit(main())
