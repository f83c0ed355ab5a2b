"""gunicorn's configuration for the portal (deploy/systemd/portal-web.service runs it):

    gunicorn --config deploy/gunicorn.conf.py portal.wsgi

It reads the same environment as the portal (deploy/portal.env.example). Options given on the
command line override what is set here.
"""

import multiprocessing
import os

# Behind nginx on the same machine: loopback only, never reachable from outside. (On a unix
# socket instead, set PORTAL_TRUSTED_UNIX_SOCKET=true: see the README.)
bind = [os.environ.get("PORTAL_WEB_BIND", "127.0.0.1:8000")]

# Threads, not only processes: a whole-study ZIP or a WADO-RS study is streamed for as long as
# the patient's connection takes, and holds one thread for that time, not one process. The
# portal's work is mostly I/O (database, store files, Redis), which threads share well.
worker_class = "gthread"
workers = int(os.environ.get("PORTAL_WEB_WORKERS", multiprocessing.cpu_count() + 1))
threads = int(os.environ.get("PORTAL_WEB_THREADS", "8"))

# With gthread workers `timeout` is how long a worker process may stay silent towards the
# arbiter (its main loop reports while its threads serve), not how long a request may last: a
# download of many minutes is not cut. A wedged process is replaced after this.
timeout = int(os.environ.get("PORTAL_WEB_TIMEOUT", "300"))
# On a restart (an upgrade), running downloads get this long to finish.
graceful_timeout = int(os.environ.get("PORTAL_WEB_GRACEFUL_TIMEOUT", "120"))
# nginx keeps connections to gunicorn open between requests.
keepalive = 30
# A process is replaced now and then (memory returned; a leak stays bounded).
max_requests = 2000
max_requests_jitter = 200

# Request limits: nothing the portal takes is large (forms, a token, a code); large bodies are
# refused by nginx already.
limit_request_line = 4094
limit_request_fields = 100

# X-Forwarded-Proto is believed from the proxy on loopback only (gunicorn's default too);
# the client address is the portal's business (PORTAL_TRUSTED_PROXIES), not gunicorn's.
forwarded_allow_ips = "127.0.0.1,::1"

# Logs go to standard output and error (journald, under systemd). The logger class redacts
# every atom a format could name (portal.access_log): no query string, no `/s/<token>`, no
# headers. JSON lines by default, as the portal's own logs; text in debug mode.
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("PORTAL_LOG_LEVEL", "info").lower()
_debug = os.environ.get("PORTAL_DEBUG", "false").strip().lower() in {"1", "true", "yes", "on"}
_format = os.environ.get("PORTAL_LOG_FORMAT", "text" if _debug else "json")
logger_class = (
    "portal.access_log.JsonLogger" if _format == "json" else "portal.access_log.TextLogger"
)
# Used by the text logger only: client, request line (path redacted, no query), status, bytes,
# milliseconds, request id.
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}o)s'

# No control socket (gunicornc): nothing needs to change workers at run time, and its default
# place is in the service user's home, which the systemd unit makes read-only.
control_socket_disable = True
proc_name = "portal-web"
