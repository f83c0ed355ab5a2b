"""What recipients get, side by side with Orthanc serving the same study.

The same 300-slice 512×512 16-bit CT is uploaded to a throwaway Orthanc (with its DICOMweb
plugin, in its default DICOMweb configuration) and imported into the portal (`import_dicom`),
which is served as in production: gunicorn with two sync workers, `PORTAL_DEBUG` false, static
files collected. The client signs in as a patient would (access code, then the one-time code
from the SMS folder) and keeps its session cookie; Orthanc is asked without authentication.

Each figure is the median of its runs, the two sides alternating so that a passing disturbance
hits both, every body read to its end:
- WADO-RS of the whole study, the files as stored (`transfer-syntax=*` on both sides);
- WADO-RS study metadata (the portal's is computed at import; Orthanc's plugin reads the files
  unless configured otherwise, and is left in its default configuration here);
- a rendered frame, cold: a slice neither side has rendered before (the portal keeps rendered
  images in a per-process cache; Orthanc keeps recently read files in its storage cache, so
  both read the file from memory: what is measured is decoding and encoding);
- a rendered frame, warm: the same frame again, on the portal only, as an absolute time: the
  HTTP round trip, and the server-side cost measured in a Django process like a worker
  (tests.bench.serverside), whose target it is;
- the study ZIP: the portal's download against Orthanc's `/studies/{id}/archive`;
- frames served to 8 viewers at once (8 threads fetching rendered frames of different slices
  for a few seconds), reported as seconds per frame so that lower is better like the rest;
- the peak resident memory of the serving worker while it streams a 1 GB study (ZIP, then
  WADO-RS), against the same worker idle, warmed by a request of each kind on the small study.
"""

import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import requests
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.bench.common import Result, database, drop_database, settle
from tests.support import free_port, terminate
from tests.support.orthanc import OrthancServer

ROOT = Path(__file__).resolve().parents[2]
PHONE = "+33612345642"
CHROMIUM = "/usr/bin/chromium"
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHUNK = 1 << 20
VIEWERS = 8


@dataclass(frozen=True)
class _Study:
    uid: str
    series: str
    sops: list[str]  # in slice order


# --- the portal, served as in production --------------------------------------------------


def _manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {args[0]} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (gunicorn's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class _Gunicorn:
    def __init__(self, env: dict[str, str], port: int, workers: int, log: Path) -> None:
        self.env, self.port, self.workers, self.log = env, port, workers, log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "_Gunicorn":
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "gunicorn"),
                    "portal.wsgi",
                    "--workers",
                    str(self.workers),
                    "--bind",
                    f"127.0.0.1:{self.port}",
                    # A 1 GB study takes a sync worker longer than the default 30 s on a slow disk.
                    "--timeout",
                    "120",
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.log.read_text()[-2000:]}")
            try:
                ready = requests.get(f"{self.url}/healthz", timeout=2).ok
            except requests.RequestException:
                ready = False
            if ready and len(_children(self.process.pid)) == self.workers:
                return self
            time.sleep(0.1)
        raise RuntimeError("gunicorn did not answer within 30 s")

    def worker_pids(self) -> list[int]:
        assert self.process is not None
        return _children(self.process.pid)

    def stop(self) -> None:
        terminate(self.process, signal.SIGTERM, 15)
        self.process = None


def _csrf(response: requests.Response) -> str:
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', response.text)
    if match is None:
        raise RuntimeError(f"no CSRF token on {response.url} (HTTP {response.status_code})")
    return match.group(1)


def _sign_in(base: str, access_code: str, sms_dir: Path) -> requests.Session:
    """A patient's path: the access code, a one-time code sent by SMS, typed back."""
    session = requests.Session()
    session.trust_env = False
    page = session.get(f"{base}/access/", timeout=10)
    answer = session.post(
        f"{base}/access/",
        {"code": access_code, "csrfmiddlewaretoken": _csrf(page)},
        allow_redirects=False,
        timeout=10,
    )
    if answer.status_code != 302:
        raise RuntimeError(f"the access code was refused (HTTP {answer.status_code})")
    page = session.get(f"{base}/access/verify", timeout=10)
    session.post(
        f"{base}/access/verify",
        {"action": "send", "csrfmiddlewaretoken": _csrf(page)},
        allow_redirects=False,
        timeout=10,
    )
    messages = sorted(sms_dir.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    if not messages:
        raise RuntimeError("no one-time code was sent")
    otp = re.search(r"\b(\d{6})\b", json.loads(messages[-1].read_text())["body"])
    assert otp is not None
    page = session.get(f"{base}/access/verify", timeout=10)
    answer = session.post(
        f"{base}/access/verify",
        {"otp": otp.group(1), "csrfmiddlewaretoken": _csrf(page)},
        allow_redirects=False,
        timeout=10,
    )
    if answer.status_code != 302 or not answer.headers["Location"].endswith("/viewer/"):
        raise RuntimeError(f"the one-time code was refused (HTTP {answer.status_code})")
    return session


def _copy_session(session: requests.Session) -> requests.Session:
    copy = requests.Session()
    copy.trust_env = False
    copy.cookies.update(session.cookies)
    return copy


# --- requests and timing ------------------------------------------------------------------


def _fetch(session: requests.Session, url: str, accept: str) -> int:
    """GET `url`, read the whole body and throw it away; its size."""
    with session.get(url, headers={"Accept": accept}, stream=True, timeout=300) as response:
        if response.status_code != 200:
            raise RuntimeError(f"GET {url}: HTTP {response.status_code} {response.text[:200]}")
        return sum(len(chunk) for chunk in response.iter_content(CHUNK))


def _timed(fetch: Callable[[], int]) -> float:
    started = time.perf_counter()
    fetch()
    return time.perf_counter() - started


def _side_by_side(
    runs: int, portal: Callable[[int], int], orthanc: Callable[[int], int]
) -> tuple[float, float]:
    """Medians of `runs` timed calls of each side (given the run's number), alternating
    which side goes first."""
    portal_times, orthanc_times = [], []
    for index in range(runs):
        if index % 2 == 0:
            portal_times.append(_timed(partial(portal, index)))
            orthanc_times.append(_timed(partial(orthanc, index)))
        else:
            orthanc_times.append(_timed(partial(orthanc, index)))
            portal_times.append(_timed(partial(portal, index)))
    return statistics.median(portal_times), statistics.median(orthanc_times)


def _frames_per_second(
    sessions: list[requests.Session], url: Callable[[int], str], seconds: float
) -> float:
    """Rendered frames served per second to `len(sessions)` viewers at once, each asking for
    the frame `url(k)` of its own k (k = viewer, viewer + viewers, …) as soon as the previous
    one arrived."""
    stop = time.monotonic() + seconds
    counts = [0] * len(sessions)
    errors: list[str] = []

    def viewer(number: int) -> None:
        k = number
        while time.monotonic() < stop and not errors:
            try:
                _fetch(sessions[number], url(k), "image/jpeg")
            except (RuntimeError, requests.RequestException) as exc:
                errors.append(str(exc))
                return
            counts[number] += 1
            k += len(sessions)

    threads = [threading.Thread(target=viewer, args=(n,)) for n in range(len(sessions))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(errors[0])
    return sum(counts) / elapsed


# --- memory of the serving worker ---------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def _peak_rss_kib(pid: int, stream: Callable[[], object]) -> int:
    """The worker's peak resident set while `stream` runs: its high-water mark (VmHWM), reset
    just before (Linux's clear_refs), and VmRSS sampled every 5 ms as a check."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    peak = [_status_kib(pid, "VmRSS")]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak.append(_status_kib(pid, "VmRSS"))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        stream()
    finally:
        done.set()
        sampler.join()
    return max(max(peak), _status_kib(pid, "VmHWM"))


# --- the studies ----------------------------------------------------------------------------


def _restamped(files: list[Path], count: int, folder: Path) -> list[Path]:
    """A study of `count` slices made of the given ones again and again under new UIDs: a
    large study in a fraction of the time the synthetic generator takes."""
    study_uid, series_uid = generate_uid(), generate_uid()
    sources = [dcmread(path) for path in files]
    written = []
    for number in range(count):
        ds = sources[number % len(sources)]
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number + 1
        path = folder / f"{number + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def _study(files: list[Path]) -> _Study:
    headers = [dcmread(path, stop_before_pixels=True) for path in files]
    headers.sort(key=lambda ds: int(ds.InstanceNumber))
    return _Study(
        uid=str(headers[0].StudyInstanceUID),
        series=str(headers[0].SeriesInstanceUID),
        sops=[str(ds.SOPInstanceUID) for ds in headers],
    )


def _server_side(
    env: dict[str, str], session: requests.Session, host: str, path: str, sop: str, runs: int
) -> dict[str, float]:
    cookies = "; ".join(f"{name}={value}" for name, value in session.cookies.items())
    answer = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bench.serverside",
            "--host",
            host,
            "--cookie",
            cookies,
            "--path",
            path,
            "--sop",
            sop,
            "--runs",
            str(runs),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if answer.returncode != 0:
        raise RuntimeError(f"the server-side measure failed:\n{answer.stderr[-2000:]}")
    return dict(json.loads(answer.stdout.splitlines()[-1]))


# --- the benchmark --------------------------------------------------------------------------


def run(*, runs: int = 5, slices: int = 300, large_slices: int = 2000) -> list[Result]:
    from studies.demo import synthetic

    workdir = Path(tempfile.mkdtemp(prefix="portal-bench-viewing-"))
    server_url = os.environ.get("DATABASE_URL", "")
    database_url, pg_name = database(workdir, "viewing")
    port = free_port()
    sms_dir = workdir / "sms"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "PORTAL_STORE_DIR": str(workdir / "store"),
        "PORTAL_BROKER_DIR": str(workdir / "broker"),
        "PORTAL_SECRET_KEY": secrets.token_urlsafe(50),
        "PORTAL_DEBUG": "false",
        "PORTAL_ALLOWED_HOSTS": "127.0.0.1",
        "PORTAL_BASE_URL": f"http://127.0.0.1:{port}",
        "PORTAL_SMS_BACKEND": "file",
        "PORTAL_SMS_FILE_PATH": str(sms_dir),
        "PORTAL_LOG_LEVEL": "WARNING",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    gunicorn: _Gunicorn | None = None
    notes: list[str] = []
    try:
        print(
            f"viewing: database {'PostgreSQL' if pg_name else 'SQLite'}; "
            f"generating {slices} CT slices and a {large_slices}-slice study…"
        )
        datasets = synthetic.make_study(
            patient_name="Bench^Viewer",
            patient_id="BENCH2",
            modalities=(("CT", slices),),
            rows=512,
            columns=512,
        )
        files = synthetic.write_study(datasets, workdir / "source")
        del datasets
        study = _study(files)
        (workdir / "large").mkdir()
        large = _study(_restamped(files, large_slices, workdir / "large"))
        _manage(env, "migrate", "--noinput")
        _manage(env, "collectstatic", "--noinput")
        started = time.perf_counter()
        _manage(env, "import_dicom", str(workdir / "source"), str(workdir / "large"))
        elapsed = time.perf_counter() - started
        print(f"  import_dicom of {slices + large_slices} slices: {elapsed:.1f} s")
        shutil.rmtree(workdir / "large")
        created = json.loads(
            _manage(
                env, "share", "create", study.uid, large.uid, "--patient-phone", PHONE, "--json"
            )
        )
        with OrthancServer(workdir=workdir / "orthanc") as orthanc:
            for path in files:
                orthanc.upload(path)
            orthanc_study = orthanc.study_id(study.uid)
            system = orthanc.http.get(f"{orthanc.url}/system", timeout=10).json()
            plugin = orthanc.http.get(f"{orthanc.url}/plugins/dicom-web", timeout=10).json()
            notes.append(
                f"Orthanc {system.get('Version')}, DICOMweb plugin {plugin.get('Version')}, "
                'defaults: StudiesMetadata and SeriesMetadata "Full" (metadata read from the '
                "files), storage cache MaximumStorageCacheSize 128 MB, no rendered-image cache"
            )
            gunicorn = _Gunicorn(env, port, 2, workdir / "gunicorn.log").start()
            portal = _sign_in(gunicorn.url, created["access_code"], sms_dir)
            results = _figures(gunicorn, portal, orthanc, orthanc_study, study, env, runs, notes)
            browser_share = json.loads(
                _manage(env, "share", "create", study.uid, "--patient-phone", PHONE, "--json")
            )
            results += _phone(gunicorn.url, browser_share["access_code"], sms_dir, notes)
            gunicorn.stop()
            gunicorn = _Gunicorn(env, port, 1, workdir / "gunicorn.log").start()
            portal = _copy_session(portal)
            results += _memory(gunicorn, portal, study, large, notes)
    finally:
        if gunicorn is not None:
            gunicorn.stop()
        drop_database(server_url, pg_name)
        shutil.rmtree(workdir, ignore_errors=True)
    for note in notes:
        print("  " + note)
    return results


def _phone(base: str, access_code: str, sms_dir: Path, notes: list[str]) -> list[Result]:
    """A patient on a 375 px phone in Chromium: the time from pressing "Confirm" with the
    one-time code to the first image painted, then how fast the viewer pages through the
    series, each slice shown only once decoded (as a finger holding a key or swiping would)."""
    from playwright.sync_api import sync_playwright

    steps = 100
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(
                viewport={"width": 375, "height": 667}, has_touch=True, is_mobile=True
            )
            page = context.new_page()
            page.goto(f"{base}/access/")
            page.fill("input[name=code]", access_code)
            page.click("button[type=submit].primary")
            page.wait_for_url("**/access/verify")
            page.click("button[name=send]")
            page.wait_for_selector("input[name=otp]")
            deadline = time.monotonic() + 10
            messages: list[Path] = []
            while not messages and time.monotonic() < deadline:
                messages = sorted(sms_dir.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
                time.sleep(0.05)
            newest = json.loads(messages[-1].read_text())["body"]
            otp = re.search(r"\b(\d{6})\b", newest)
            assert otp is not None
            page.fill("input[name=otp]", otp.group(1))
            started = time.perf_counter()
            page.click("form button[type=submit].primary")
            page.wait_for_function(
                "() => { const i = document.querySelector('#viewer-pane img');"
                " return i && i.complete && i.naturalWidth > 0; }",
                polling="raf",
            )
            first_image = time.perf_counter() - started
            seconds = page.evaluate(
                """async (steps) => {
                  const counter = document.querySelector('#viewer-counter');
                  const shown = () => {
                    const i = document.querySelector('#viewer-pane img');
                    return i && i.complete && i.naturalWidth > 0;
                  };
                  const start = performance.now();
                  for (let k = 2; k <= steps + 1; k++) {
                    document.dispatchEvent(new KeyboardEvent('keydown', {key: 'ArrowDown'}));
                    while (!(counter.textContent.startsWith(k + ' ') && shown())) {
                      await new Promise((r) => requestAnimationFrame(r));
                    }
                  }
                  return (performance.now() - start) / 1000;
                }""",
                steps,
            )
        finally:
            browser.close()
    notes.append(
        f"phone (Chromium, 375×667): first image {first_image * 1e3:.0f} ms after the one-time "
        f"code; {steps} slices paged through at {steps / seconds:.1f} images/s right after it"
    )
    return [
        Result("first image after the one-time code, phone (absolute)", first_image, None, 1.0),
        Result(
            "paging through slices, time per image (absolute; 20/s)",
            seconds / steps * 1e3,
            None,
            50.0,
            "ms",
        ),
    ]


def _figures(
    gunicorn: _Gunicorn,
    portal: requests.Session,
    orthanc: OrthancServer,
    orthanc_study: str,
    study: _Study,
    env: dict[str, str],
    runs: int,
    notes: list[str],
) -> list[Result]:
    base = f"{gunicorn.url}/dicomweb/studies/{study.uid}"
    theirs = f"{orthanc.dicomweb_url}/studies/{study.uid}"
    orthanc_http = orthanc.http

    def rendered(root: str, k: int, query: str = "") -> str:
        sop = study.sops[k % len(study.sops)]
        return f"{root}/series/{study.series}/instances/{sop}/rendered{query}"

    # Both sides once before timing: files into the page cache, the workers' imports done.
    for session, root in ((portal, base), (orthanc_http, theirs)):
        _fetch(session, root, ACCEPT_DICOM)
        _fetch(session, root + "/metadata", "application/dicom+json")
    settle()
    results = []

    sizes = (_fetch(portal, base, ACCEPT_DICOM), _fetch(orthanc_http, theirs, ACCEPT_DICOM))
    mine, other = _side_by_side(
        runs,
        lambda _: _fetch(portal, base, ACCEPT_DICOM),
        lambda _: _fetch(orthanc_http, theirs, ACCEPT_DICOM),
    )
    notes.append(
        f"WADO-RS study: {sizes[0] / 1e6:.0f} MB (portal), {sizes[1] / 1e6:.0f} MB (Orthanc), "
        f"N={runs}"
    )
    results.append(Result("WADO-RS whole study, transfer-syntax=* (Orthanc)", mine, other, 1.0))

    metadata_runs = 2 * runs + 1
    mine, other = _side_by_side(
        metadata_runs,
        lambda _: _fetch(portal, base + "/metadata", "application/dicom+json"),
        lambda _: _fetch(orthanc_http, theirs + "/metadata", "application/dicom+json"),
    )
    notes.append(f"study metadata: N={metadata_runs}")
    results.append(Result("WADO-RS study metadata (Orthanc)", mine * 1e3, other * 1e3, 0.2, "ms"))

    # Cold: slice k of each run, which neither side has rendered (the warm slice is the last).
    cold_runs = 3 * runs
    first = len(study.sops) // 4
    mine, other = _side_by_side(
        cold_runs,
        lambda k: _fetch(portal, rendered(base, first + k), "image/jpeg"),
        lambda k: _fetch(orthanc_http, rendered(theirs, first + k), "image/jpeg"),
    )
    notes.append(f"rendered frame cold: N={cold_runs}, a different slice each run")
    results.append(Result("rendered frame, cold (Orthanc)", mine * 1e3, other * 1e3, 1.0, "ms"))

    warm = len(study.sops) - 1
    warm_runs = 50
    _fetch(portal, rendered(base, warm), "image/jpeg")
    _fetch(portal, rendered(base, warm), "image/jpeg")  # now in both workers' caches
    round_trip = statistics.median(
        _timed(lambda: _fetch(portal, rendered(base, warm), "image/jpeg")) for _ in range(warm_runs)
    )
    inside = _server_side(
        env,
        portal,
        f"127.0.0.1:{gunicorn.port}",
        rendered(base, warm).removeprefix(gunicorn.url),
        study.sops[warm],
        warm_runs,
    )
    notes.append(
        f"rendered frame warm: N={warm_runs}; server side, the whole Django request in-process "
        f"(middleware, session, share check, cache hit) {inside['request'] * 1e3:.2f} ms "
        f"({inside['request_cpu'] * 1e3:.2f} ms of CPU), of which rendering.render (cache hit) "
        f"{inside['render'] * 1e3:.3f} ms"
    )
    results.append(
        Result(
            "rendered frame, warm, server side (absolute)", inside["request"] * 1e3, None, 2, "ms"
        )
    )
    results.append(
        Result("  the same, HTTP round trip (absolute)", round_trip * 1e3, None, None, "ms")
    )

    zip_runs = max(3, runs - 2)
    archive = f"{orthanc.url}/studies/{orthanc_study}/archive"
    download = f"{gunicorn.url}/download/{study.uid}.zip"
    sizes = (_fetch(portal, download, "*/*"), _fetch(orthanc_http, archive, "*/*"))
    mine, other = _side_by_side(
        zip_runs,
        lambda _: _fetch(portal, download, "*/*"),
        lambda _: _fetch(orthanc_http, archive, "*/*"),
    )
    notes.append(
        f"study ZIP: {sizes[0] / 1e6:.0f} MB (portal), {sizes[1] / 1e6:.0f} MB (Orthanc), "
        f"N={zip_runs}"
    )
    results.append(Result("study ZIP download (Orthanc /archive)", mine, other, 0.5))

    # Every request of both sides renders: a new window for each pass over the slices, so that
    # neither the portal's cache nor any other serves a frame twice.
    seconds = 8.0

    def frame(root: str) -> Callable[[int], str]:
        return lambda k: rendered(root, k, f"?window={40 + k // len(study.sops)},400,linear")

    portal_fps = _frames_per_second(
        [_copy_session(portal) for _ in range(VIEWERS)], frame(base), seconds
    )
    orthanc_fps = _frames_per_second(
        [requests.Session() for _ in range(VIEWERS)], frame(theirs), seconds
    )
    notes.append(
        f"{VIEWERS} viewers, {seconds:.0f} s each side, every frame rendered (none cached): "
        f"portal {portal_fps:.1f} frames/s, Orthanc {orthanc_fps:.1f} frames/s"
    )
    results.append(
        Result(
            f"{VIEWERS} viewers: time per rendered frame (Orthanc)",
            1e3 / portal_fps,
            1e3 / orthanc_fps,
            None,
            "ms",
        )
    )
    return results


def _memory(
    gunicorn: _Gunicorn, portal: requests.Session, study: _Study, large: _Study, notes: list[str]
) -> list[Result]:
    """Peak RSS of the one worker while it streams the large study, against its idle RSS once
    it has served each kind of request on the small study."""
    (worker,) = gunicorn.worker_pids()
    base = gunicorn.url
    portal.get(f"{base}/viewer/", timeout=30).raise_for_status()
    _fetch(portal, f"{base}/dicomweb/studies/{study.uid}", ACCEPT_DICOM)
    _fetch(portal, f"{base}/dicomweb/studies/{study.uid}/metadata", "application/dicom+json")
    _fetch(portal, f"{base}/download/{study.uid}.zip", "*/*")
    time.sleep(0.5)
    idle = _status_kib(worker, "VmRSS")
    sizes: list[int] = []
    zip_peak = _peak_rss_kib(
        worker, lambda: sizes.append(_fetch(portal, f"{base}/download/{large.uid}.zip", "*/*"))
    )
    wado_peak = _peak_rss_kib(
        worker,
        lambda: sizes.append(_fetch(portal, f"{base}/dicomweb/studies/{large.uid}", ACCEPT_DICOM)),
    )
    notes.append(
        f"memory: one gunicorn worker, {len(large.sops)} slices, ZIP {sizes[0] / 1e9:.2f} GB "
        f"and WADO-RS {sizes[1] / 1e9:.2f} GB streamed; idle {idle / 1024:.0f} MB"
    )
    return [
        Result(
            "peak RSS, 1 GB study ZIP (anchor: idle worker)",
            zip_peak / 1024,
            idle / 1024,
            1.2,
            "MB",
        ),
        Result(
            "peak RSS, 1 GB study WADO-RS (anchor: idle)", wado_peak / 1024, idle / 1024, 1.2, "MB"
        ),
    ]
