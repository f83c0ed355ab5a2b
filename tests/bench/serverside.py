"""The server-side cost of a request, measured inside a Django process set up like a worker.

`python -m tests.bench.serverside --host H --cookie C --path P --sop UID [--runs N]` (with the
portal's environment) calls Django's WSGI handler, the object gunicorn calls, with the request
a browser would send (the session cookie, the Host), after one warm-up call, and times each call
until the body is read and the response closed (when Django closes its database connection).
It also times `rendering.render` of the instance's first frame with its cache warm. Prints one
JSON object: the medians in seconds, `request` and `render`. With `--profile` the profile of
the requests goes to standard error.

The HTTP round trip on loopback (requests' and gunicorn's own work) costs more than a cache hit;
this says what the portal's code costs.
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.serverside")
    parser.add_argument("--host", required=True)
    parser.add_argument("--cookie", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--sop", required=True)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--accept", default="image/jpeg")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    import django

    django.setup()
    import requests.utils
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import RequestFactory

    from dicomweb import rendering
    from studies.models import Instance
    from studies.store import instance_file

    handler = WSGIHandler()
    factory = RequestFactory()
    path, _, query = args.path.partition("?")

    def environ() -> dict[str, Any]:
        return dict(
            factory.get(
                path,
                data=dict(part.split("=", 1) for part in query.split("&") if part),
                HTTP_HOST=args.host,
                HTTP_COOKIE=args.cookie,
                HTTP_ACCEPT=args.accept,
                HTTP_USER_AGENT=requests.utils.default_user_agent(),
            ).environ
        )

    cpu_times: list[float] = []

    def call(prepared: dict[str, Any]) -> float:
        status: list[str] = []

        def start_response(line: str, headers: Any, exc_info: Any = None) -> Any:
            status.append(line)
            return lambda data: None

        started, cpu = time.perf_counter(), time.thread_time()
        body = handler(prepared, start_response)
        for _chunk in body:
            pass
        body.close()
        elapsed = time.perf_counter() - started
        cpu_times.append(time.thread_time() - cpu)
        if not status[0].startswith("200"):
            raise SystemExit(f"{args.path}: {status[0]}")
        return elapsed

    call(environ())
    prepared = [environ() for _ in range(args.runs)]
    profile = cProfile.Profile() if args.profile else None
    if profile:
        profile.enable()
    cpu_times.clear()
    requests_times = [call(item) for item in prepared]
    if profile:
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(40)
        print(out.getvalue(), file=sys.stderr)

    stored = instance_file(Instance.objects.get(sop_instance_uid=args.sop))
    rendering.render(stored)
    render_times = []
    for _ in range(args.runs):
        started = time.perf_counter()
        rendering.render(stored)
        render_times.append(time.perf_counter() - started)
    print(
        json.dumps(
            {
                "request": statistics.median(requests_times),
                "request_cpu": statistics.median(cpu_times),
                "render": statistics.median(render_times),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
