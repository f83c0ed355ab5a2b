"""Settings for the image portal: one module, driven by environment variables.

Defaults serve the demo (SQLite under var/, an embedded Celery broker, console SMS). Production
sets PORTAL_SECRET_KEY, PORTAL_ALLOWED_HOSTS, PORTAL_BASE_URL, DATABASE_URL and CELERY_BROKER_URL.
DEBUG is off unless PORTAL_DEBUG says otherwise. Any variable may instead be read from a file
named by the same name with `_FILE` appended (PORTAL_SECRET_KEY_FILE=/run/secrets/portal_key),
as container and systemd deployments hand out secrets.

Importing this module has no side effects: the folders these settings name are created when the
apps are ready (portal.apps), not here.
"""

from datetime import timedelta
from pathlib import Path
from typing import Any

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"


class _SecretFiles(environ.FileAwareMapping):
    """django-environ's `X_FILE` lookup, less the line end that `echo … > file` leaves: a
    secret read from a file is the same as one set in the environment."""

    def __getitem__(self, key: str) -> str:
        value: str = super().__getitem__(key)
        return value.rstrip("\r\n") if self.env.get(key + "_FILE") else value


class _Env(environ.Env):
    ENVIRON = _SecretFiles()


env = _Env()

# A key that only exists so that the demo starts (PORTAL_DEBUG=true). With DEBUG off no process
# starts with it: gunicorn, the worker and the storage SCP run no system checks, so the refusal
# is here, at settings load (`portal.E001` says the same to `check --deploy`).
INSECURE_DEMO_KEY = "insecure-demo-key-change-me-0123456789-abcdefghijklmnopqrstuvwxyz"
SECRET_KEY = env.str("PORTAL_SECRET_KEY", default=INSECURE_DEMO_KEY)
DEBUG = env.bool("PORTAL_DEBUG", default=False)
if SECRET_KEY == INSECURE_DEMO_KEY and not DEBUG:
    raise ImproperlyConfigured(
        "PORTAL_SECRET_KEY is not set (nor PORTAL_SECRET_KEY_FILE): the portal does not start "
        "with the demo key, which would sign sessions and share links with a key everyone "
        "knows. Set PORTAL_SECRET_KEY to 50 or more random characters (or name a file holding "
        "them with PORTAL_SECRET_KEY_FILE), or set PORTAL_DEBUG=true for the demo only."
    )
ALLOWED_HOSTS = env.list("PORTAL_ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
BASE_URL = env.str("PORTAL_BASE_URL", default="http://127.0.0.1:8000").rstrip("/")
TRUSTED_PROXIES = env.list("PORTAL_TRUSTED_PROXIES", default=[])
# Served on a unix socket behind a reverse proxy: a request without a peer address comes from
# that proxy (accounts.net). Off, such a request is refused where it would count failures.
TRUSTED_UNIX_SOCKET = env.bool("PORTAL_TRUSTED_UNIX_SOCKET", default=False)

INSTALLED_APPS = [
    # Django's admin, its default site behind the second factor (accounts.admin_site).
    "accounts.apps.PortalAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "axes",
    "captcha",
    "csp",
    "accounts",
    "studies",
    "dicomweb",
    "portal.apps.PortalConfig",
]

MIDDLEWARE = [
    # First: every line logged while a request runs carries its id (portal.logs).
    "portal.logs.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    # Per-address request budget on the unauthenticated recipient URLs (429 past it).
    "accounts.middleware.RecipientRequestBudgetMiddleware",
    # Django's, made to work with `Referrer-Policy: no-referrer` (see accounts.csrf).
    "accounts.csrf.NoReferrerCsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Tells whether a second factor verified this session's user (the admin requires it).
    "django_otp.middleware.OTPMiddleware",
    # Staff sessions: idle and absolute limits, locked accounts signed out (accounts.staff).
    "accounts.middleware.StaffSessionMiddleware",
    # Emergency close of recipient access: before the recipient fence and the views.
    "accounts.middleware.RecipientClosureMiddleware",
    "accounts.middleware.RecipientSessionMiddleware",
    # A bad viewer token on a DICOMweb request → 401 with its challenge (dicomweb.bearer).
    "dicomweb.bearer.BearerTokenMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: turns a locked-out attempt into the 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'portal.sqlite3'}"),
}
DATABASES["default"]["CONN_MAX_AGE"] = env.int("PORTAL_DB_CONN_MAX_AGE", default=0)
# A connection kept across requests (or across a worker's tasks) is checked before reuse, so
# that a database restarted meanwhile costs a reconnection, not a failed request.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The storage SCP, the worker and the web server write concurrently: WAL and a
    # generous busy timeout keep SQLite usable for the demo and small sites.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
    }
    # (SQLite does not create folders: portal.apps creates the database's.)
    # Tests run a real worker in another process: an in-memory test database would be
    # invisible to it, so the test database is a file too.
    # (Beside the database file, so a run with another DATABASE_URL has its own.)
    DATABASES["default"]["TEST"] = {
        "NAME": str(Path(DATABASES["default"]["NAME"]).with_name("test.sqlite3"))
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "accounts.User"
AUTHENTICATION_BACKENDS = [
    # First: refuses locked-out attempts before anything is checked.
    "axes.backends.AxesStandaloneBackend",
    # Share links and access codes (accounts.backends documents the credentials).
    "accounts.backends.ShareBackend",
    "django.contrib.auth.backends.ModelBackend",
]

PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.Argon2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": 12},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("fr", "Français")]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = env.str("PORTAL_TIME_ZONE", default="Europe/Paris")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# Where `collectstatic` writes, and where a reverse proxy may serve /static/ from itself.
STATIC_ROOT = Path(env.str("PORTAL_STATIC_ROOT", default=str(VAR_DIR / "static")))
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if not DEBUG
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}

# --- Security headers and cookies ---------------------------------------------------------
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "no-referrer"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_HTTPONLY = True
CSRF_COOKIE_SAMESITE = "Lax"
_HTTPS = BASE_URL.startswith("https://")
SECURE_SSL_REDIRECT = env.bool("PORTAL_SSL_REDIRECT", default=_HTTPS)
SESSION_COOKIE_SECURE = _HTTPS
CSRF_COOKIE_SECURE = _HTTPS
if _HTTPS:
    # `__Host-` cookies are only accepted by browsers over HTTPS with Secure and Path=/.
    SESSION_COOKIE_NAME = "__Host-portal_session"
    CSRF_COOKIE_NAME = "__Host-portal_csrf"
    SECURE_HSTS_SECONDS = env.int("PORTAL_HSTS_SECONDS", default=63072000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
CSRF_TRUSTED_ORIGINS = [BASE_URL]
if TRUSTED_PROXIES:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# --- Celery ------------------------------------------------------------------------------
# Without Redis the broker is a folder on disk, so `make demo` needs no extra service.
# (A host name, although the folder broker has none, keeps kombu from warning on each use.)
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://localhost/")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = Path(env.str("PORTAL_BROKER_DIR", default=str(VAR_DIR / "broker")))
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "store_processed": False,
        # Without it kombu keeps its exchange table in ./control, wherever the process runs.
        "control_folder": str(_broker_dir / "control"),
    }
    # (kombu fails on a missing folder: portal.apps creates them.)
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# The worker logs through LOGGING like every other process (portal.celery configures it), not
# through handlers of its own that would know nothing of the redaction filter.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- DICOM -------------------------------------------------------------------------------
STORE_DIR = Path(env.str("PORTAL_STORE_DIR", default=str(VAR_DIR / "store")))
# Below this much free space the store takes no more instances (a failure status to senders).
STORE_MIN_FREE_BYTES = env.int("PORTAL_STORE_MIN_FREE_MB", default=512) * 1024 * 1024
# /healthz (portal.health): the store is reported failing below this much free space; each
# PACS's C-ECHO is remembered this many seconds (a load balancer polls often, the PACS is not
# its to load); the broker and each PACS have this many seconds to answer.
HEALTH_MIN_FREE_BYTES = (
    env.int("PORTAL_HEALTH_MIN_FREE_MB", default=STORE_MIN_FREE_BYTES >> 20) * 1024 * 1024
)
HEALTH_PACS_CACHE_SECONDS = env.int("PORTAL_HEALTH_PACS_CACHE_SECONDS", default=60)
HEALTH_TIMEOUT = env.float("PORTAL_HEALTH_TIMEOUT", default=2.0)
DICOM_AE_TITLE = env.str("PORTAL_AE_TITLE", default="PORTAL")
DICOM_PORT = env.int("PORTAL_DICOM_PORT", default=11112)
DICOM_BIND_ADDRESS = env.str("PORTAL_DICOM_BIND", default="0.0.0.0")  # noqa: S104
# Seconds: waiting for a PACS to accept an association, to answer a request, and for a
# silent network (an association with no traffic for this long is aborted).
DICOM_CONNECT_TIMEOUT = env.float("PORTAL_DICOM_CONNECT_TIMEOUT", default=10.0)
DICOM_DIMSE_TIMEOUT = env.float("PORTAL_DICOM_DIMSE_TIMEOUT", default=120.0)
DICOM_NETWORK_TIMEOUT = env.float("PORTAL_DICOM_NETWORK_TIMEOUT", default=120.0)
# A C-MOVE or C-GET may stay silent for as long as its sub-operations take (pending responses
# are optional): this longer wait bounds that exchange instead of the two above.
DICOM_RETRIEVE_TIMEOUT = env.float("PORTAL_DICOM_RETRIEVE_TIMEOUT", default=3600.0)
DICOMWEB_TIMEOUT = env.float("PORTAL_DICOMWEB_TIMEOUT", default=60.0)
# How often a failed retrieval is tried again by the worker (with exponential backoff).
RETRIEVAL_MAX_RETRIES = env.int("PORTAL_RETRIEVAL_MAX_RETRIES", default=3)
RETRIEVAL_RETRY_BACKOFF = env.int("PORTAL_RETRIEVAL_RETRY_BACKOFF", default=30)
# Seconds a worker holds a running job: it renews the lease every quarter of it while it lives;
# once a lease runs out its worker is presumed dead (killed, its machine down) and the job is
# taken back (see CELERY_BEAT_SCHEDULE) and finished by another worker.
RETRIEVAL_LEASE = env.int("PORTAL_RETRIEVAL_LEASE", default=60)
# Seconds a C-MOVE job waits, after the PACS's final answer, for the storage SCP to index what
# it received (the PACS may report before the SCP has written its last index rows).
RETRIEVAL_INDEX_WAIT = env.float("PORTAL_RETRIEVAL_INDEX_WAIT", default=30.0)
# `purge` keeps a retrieved study this long after its last retrieval even when no share needs
# it: staff who retrieve a study before sharing it must find it there.
PURGE_GRACE_HOURS = env.float("PORTAL_PURGE_GRACE_HOURS", default=24.0)
if CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # Redis gives a message nobody acknowledged to another worker after this many seconds: the
    # last resort for a job whose worker died, the lease and the sweep below being the quick
    # way back. It must outlast the longest job and the longest retry countdown (the worker
    # holds a retried message unacknowledged until its time comes), or Redis would hand out
    # copies of messages that are merely waiting; the lease makes such copies harmless anyway.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": env.int("PORTAL_BROKER_VISIBILITY_TIMEOUT", default=4 * 3600)
    }
# A cap on the store's size, in GB (0: none). `purge` then also deletes unneeded copies that
# are still within the grace hours, oldest first, until the store is under it; a copy a live
# share needs is never deleted (the store stays over the cap, and says so in the log and the
# audit trail).
STORE_MAX_BYTES = int(env.float("PORTAL_STORE_MAX_GB", default=0.0) * 1e9)

# --- Retention, scheduled by Celery beat (`celery -A portal beat`) ----------------------------
# Audit events older than this many days are exported and pruned (`audit prune`).
AUDIT_RETENTION_DAYS = env.int("PORTAL_AUDIT_RETENTION_DAYS", default=365)
# Where beat's daily `audit prune` writes what it prunes (one JSON lines file per run).
AUDIT_ARCHIVE_DIR = Path(env.str("PORTAL_AUDIT_ARCHIVE_DIR", default=str(VAR_DIR / "audit")))
PURGE_INTERVAL_MINUTES = env.int("PORTAL_PURGE_INTERVAL_MINUTES", default=60)
CELERY_BEAT_SCHEDULE = {
    # Ends expired shares, deletes the copies no live share needs, clears expired sessions.
    "purge": {
        "task": "studies.tasks.purge",
        "schedule": timedelta(minutes=PURGE_INTERVAL_MINUTES),
    },
    "audit-prune": {"task": "accounts.tasks.audit_prune", "schedule": timedelta(days=1)},
    # Indexes what the storage SCP confirmed to a sender but could not index (its journal).
    "index-confirmed-instances": {
        "task": "studies.tasks.index_confirmed_instances",
        "schedule": timedelta(minutes=5),
    },
    # Jobs whose worker died come back about one lease later, whatever the broker does.
    "take-back-retrieval-jobs": {
        "task": "studies.tasks.take_back_retrieval_jobs",
        "schedule": max(5.0, RETRIEVAL_LEASE / 4),
        # A sweep that no worker took in time is replaced by the next one, not run late.
        "options": {"expires": max(5.0, RETRIEVAL_LEASE / 4)},
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
# Where `manage.py install_ohif` (`make ohif`) puts the OHIF viewer, served under /ohif/.
OHIF_DIR = Path(env.str("PORTAL_OHIF_DIR", default=str(VAR_DIR / "ohif")))

# --- Messages ----------------------------------------------------------------------------
EMAIL_BACKEND = env.str("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
EMAIL_FILE_PATH = env.str("EMAIL_FILE_PATH", default=str(VAR_DIR / "mail"))
DEFAULT_FROM_EMAIL = env.str("PORTAL_FROM_EMAIL", default="portal@localhost")
# Django's SMTP backend (EMAIL_BACKEND=django.core.mail.backends.smtp.EmailBackend).
EMAIL_HOST = env.str("EMAIL_HOST", default="localhost")
EMAIL_PORT = env.int("EMAIL_PORT", default=587)
EMAIL_HOST_USER = env.str("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD = env.str("EMAIL_HOST_PASSWORD", default="")
EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", default=True)
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=20)
SMS_BACKEND = env.str("PORTAL_SMS_BACKEND", default="console")
SMS_FILE_PATH = env.str("PORTAL_SMS_FILE_PATH", default=str(VAR_DIR / "sms"))
# The `http` SMS backend (accounts.sms.HttpGatewayBackend documents the request).
SMS_GATEWAY_URL = env.str("PORTAL_SMS_GATEWAY_URL", default="")
SMS_GATEWAY_TOKEN = env.str("PORTAL_SMS_GATEWAY_TOKEN", default="")
SMS_SENDER = env.str("PORTAL_SMS_SENDER", default="Portal")
SMS_TIMEOUT = env.float("PORTAL_SMS_TIMEOUT", default=10.0)

# --- Recipient access (accounts) -----------------------------------------------------------
# Days a share lives unless staff choose otherwise, and the most they may choose (also how
# long a signed link is read at all: accounts.credentials.unsign_link_token).
SHARE_DAYS_PATIENT = env.int("PORTAL_SHARE_DAYS_PATIENT", default=30)
SHARE_DAYS_PHYSICIAN = env.int("PORTAL_SHARE_DAYS_PHYSICIAN", default=14)
SHARE_MAX_DAYS = 90
# One-time codes: seconds valid, seconds before another may be sent, wrong codes before the
# share locks, and django-otp's throttle (seconds to wait after n failures: factor × 2^(n-1)).
OTP_VALIDITY = env.int("PORTAL_OTP_VALIDITY", default=300)
OTP_RESEND_COOLDOWN = env.int("PORTAL_OTP_RESEND_COOLDOWN", default=60)
OTP_MAX_FAILURES = 5
# Over a share's whole life (a cool-off does not reset it): then only staff unlock it.
OTP_LIFETIME_MAX_FAILURES = 10
# Codes sent per share in any 24 hours.
OTP_MAX_SENDS_PER_DAY = 10
OTP_THROTTLE_FACTOR = env.int("PORTAL_OTP_THROTTLE_FACTOR", default=1)
# Recipient sessions: idle and absolute limits, in seconds.
RECIPIENT_SESSION_IDLE = 15 * 60
RECIPIENT_SESSION_MAX = 2 * 60 * 60
# Staff sessions (accounts.staff): idle and absolute limits, and how long a second factor
# counts as recent for sensitive actions.
STAFF_SESSION_IDLE = 30 * 60
STAFF_SESSION_MAX = 12 * 60 * 60
STAFF_REAUTH_SECONDS = 10 * 60
# Messages ("the shares of patient … are revoked") live in the session, never in a cookie of
# their own (Django's default stores them in a signed, readable cookie).
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"
# django-otp's device admin never shows a TOTP key (accounts.admin also unregisters it).
OTP_ADMIN_HIDE_SENSITIVE_DATA = True
# Wrong second factors in a row (codes, recovery codes, passkeys) after which a staff account
# is locked until an administrator unlocks it (accounts.staff_auth).
STAFF_SECOND_FACTOR_MAX_FAILURES = 10
# The name authenticator apps show beside a staff member's TOTP entry.
OTP_TOTP_ISSUER = env.str("PORTAL_TOTP_ISSUER", default="Image portal")
# Minutes a viewer token (the bearer token a recipient session mints for Weasis or another
# DICOMweb client) is accepted after it was minted (accounts.credentials).
VIEWER_TOKEN_MINUTES = env.int("PORTAL_VIEWER_TOKEN_MINUTES", default=10)
# Who a locked-out or lost recipient should call; shown on the lockout and help pages.
SUPPORT_CONTACT = env.str("PORTAL_SUPPORT_CONTACT", default="")

# --- Staff workspace (studies.staff) -----------------------------------------------------------
# The region of phone numbers typed without a country code (ISO 3166 code, e.g. FR, BE).
PHONE_REGION = env.str("PORTAL_PHONE_REGION", default="FR")
# The handout: the hospital's name, its logo (a path under the static files or an https URL),
# and the help desk a locked-out recipient calls.
HOSPITAL_NAME = env.str("PORTAL_HOSPITAL_NAME", default="")
HOSPITAL_LOGO = env.str("PORTAL_HOSPITAL_LOGO", default="")
HELPDESK_PHONE = env.str("PORTAL_HELPDESK_PHONE", default="")
# Seconds the staff search waits for the PACS nodes: one that has not answered by then is
# shown as such, and the others' results come all the same.
SEARCH_TIMEOUT = env.float("PORTAL_SEARCH_TIMEOUT", default=15.0)

# Brute force (django-axes): failed links and codes are counted by client address and by share
# (accounts.backends.axes_username); 5 failures lock for the cool-off, in the database so that
# every process and machine sees the same state.
# Django's security.W003 recognises only its own CSRF middleware by name; accounts.E001 checks
# that ours (accounts.csrf) is there instead.
SILENCED_SYSTEM_CHECKS = ["security.W003"]
AXES_HANDLER = "axes.handlers.database.AxesDatabaseHandler"
AXES_FAILURE_LIMIT = 5
AXES_COOLOFF_TIME = timedelta(minutes=env.int("PORTAL_LOCKOUT_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = ["ip_address", "username"]
# Attempts refused during a lockout do not restart the cool-off: otherwise a page that keeps
# making its visitors' browsers fail would keep their address locked for ever.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_USERNAME_CALLABLE = "accounts.backends.axes_username"
AXES_CLIENT_IP_CALLABLE = "accounts.net.axes_client_ip"
AXES_LOCKOUT_CALLABLE = "accounts.views.lockout"
AXES_SENSITIVE_PARAMETERS = [
    "username",
    "ip_address",
    "code",
    "otp",
    "csrfmiddlewaretoken",
    # A link posted from its fragment (accounts.views.link_page).
    "token",
]
AXES_ENABLE_ADMIN = True
AXES_VERBOSE = False
# Captchas (django-simple-captcha) are drawn by the portal itself, shown after 3 failures.
CAPTCHA_IMAGE_SIZE = (110, 40)
CAPTCHA_LENGTH = 5
CAPTCHA_TIMEOUT = 10

# --- Shared cache: request budgets and attempts in progress (accounts.throttle) -------------
# Redis in production (PORTAL_CACHE_URL=redis://…), so that every process and machine counts
# together; the demo's single process keeps them in memory.
CACHE_URL = env.str("PORTAL_CACHE_URL", default="")
CACHES = {
    "default": (
        {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": CACHE_URL,
            # Several portals may share one Redis: each keeps its keys apart.
            "KEY_PREFIX": env.str("PORTAL_CACHE_KEY_PREFIX", default="portal"),
        }
        if CACHE_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}
# Requests per minute from one client address to the unauthenticated recipient URLs (/s/,
# /access/, /captcha/); past it, 429 until the minute ends. 0 turns the budget off.
RECIPIENT_REQUESTS_PER_MINUTE = env.int("PORTAL_RECIPIENT_REQUESTS_PER_MINUTE", default=60)
# Failed links and codes per minute across all shares and addresses that make a guessing
# campaign (which lockout by address cannot see): an audit event, a mail to the security
# contact once per episode, and, with PORTAL_AUTO_CLOSE, recipient access closed.
ALERT_FAILURES_PER_MINUTE = env.int("PORTAL_ALERT_FAILURES_PER_MINUTE", default=30)
SECURITY_EMAIL = env.str("PORTAL_SECURITY_EMAIL", default="")
AUTO_CLOSE = env.bool("PORTAL_AUTO_CLOSE", default=False)

# --- Content Security Policy (django-csp): nothing inline, nothing from elsewhere. -----------
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:", "blob:"],
        "connect-src": ["'self'"],
        "font-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    },
}

# --- Logging -----------------------------------------------------------------------------
# `json`: one JSON object a line (portal.logs.JsonFormatter), for a log collector; `text`: one
# readable line, for a person at a terminal. JSON in production, text in debug mode.
LOG_FORMAT = env.str("PORTAL_LOG_FORMAT", default="text" if DEBUG else "json")
if LOG_FORMAT not in {"json", "text"}:
    raise ImproperlyConfigured(f"PORTAL_LOG_FORMAT must be json or text, not {LOG_FORMAT!r}.")
LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {
            "format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s",
            "defaults": {"request_id": "-"},
        },
        "json": {"()": "portal.logs.JsonFormatter"},
        "server": {
            "()": "django.utils.log.ServerFormatter",
            "format": "[{server_time}] {message}",
            "style": "{",
        },
    },
    "filters": {
        # Share link tokens never reach a log line (accounts.logging).
        "redact_links": {"()": "accounts.logging.RedactShareLinks"},
        # The id of the request or task the line was logged in (portal.logs).
        "request_id": {"()": "portal.logs.RequestIdFilter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
            "filters": ["redact_links"],
        },
        # The development server's request lines ("GET /s/… HTTP/1.1" 302), for a person at a
        # terminal: text whatever PORTAL_LOG_FORMAT says (runserver serves no production).
        "server": {
            "class": "logging.StreamHandler",
            "formatter": "server",
            "filters": ["redact_links"],
        },
    },
    "root": {"handlers": ["console"], "level": env.str("PORTAL_LOG_LEVEL", default="INFO")},
    "loggers": {
        # pynetdicom logs every PDU at INFO; only its warnings matter to an operator.
        "pynetdicom": {"level": "WARNING"},
        # The request logger prints paths, and recipient paths may carry a link token.
        "django.server": {
            "handlers": ["server"],
            "level": "INFO",
            "filters": ["redact_links"],
            "propagate": False,
        },
        "django.request": {"filters": ["redact_links"]},
    },
}

# --- Emergency close, passkeys (accounts) --------------------------------------------------
# A physician's passkey not used for this many days no longer signs in (the physician enrols
# again after an emailed code); at most this many passkeys per physician address.
PASSKEY_IDLE_DAYS = env.int("PORTAL_PASSKEY_IDLE_DAYS", default=180)
PASSKEYS_PER_ADDRESS = env.int("PORTAL_PASSKEYS_PER_ADDRESS", default=3)
# Seconds a recipient is told to wait (Retry-After) while recipient access is closed.
RECIPIENTS_CLOSED_RETRY_AFTER = env.int("PORTAL_RECIPIENTS_CLOSED_RETRY_AFTER", default=300)

# --- DICOM TLS (studies) ------------------------------------------------------------------
# PEM files. With a certificate and its key, the storage SCP takes TLS associations only and
# outgoing associations (C-ECHO, C-FIND, C-GET, C-MOVE) use TLS, presenting that certificate.
# With a CA too, a peer must present a certificate that CA signed (clients of the SCP
# included); without, the PACS's certificate is checked against the system's trusted CAs.
DICOM_TLS_CERT = env.str("PORTAL_DICOM_TLS_CERT", default="")
DICOM_TLS_KEY = env.str("PORTAL_DICOM_TLS_KEY", default="")
DICOM_TLS_CA = env.str("PORTAL_DICOM_TLS_CA", default="")


# --- Link tokens in no log line, whichever logger writes it ---------------------------------------
# The redaction filter (accounts.logging) on every handler and every logger, root included: a
# logger's filter sees only what is logged on that logger, not what its children pass up (the
# CSRF failure of `POST /s/<token>` is logged on django.security.csrf), while a handler's sees
# everything it writes. Django's own `django` logger is named so that the handlers Django gives
# it (a console handler with DEBUG on, which knows nothing of the filter) are replaced: its
# records go up to the root's handlers.
LOGGING["loggers"].setdefault("django", {"level": "INFO"})
for _config in [*LOGGING["handlers"].values(), *LOGGING["loggers"].values(), LOGGING["root"]]:
    if "redact_links" not in _config.setdefault("filters", []):
        _config["filters"].append("redact_links")
# And the request id on whatever every handler writes.
for _config in LOGGING["handlers"].values():
    _config["filters"].append("request_id")
