"""Settings for the image portal: one module, driven by environment variables.

Defaults serve the demo (SQLite under var/, an embedded Celery broker, console SMS). Production
sets PORTAL_SECRET_KEY, PORTAL_ALLOWED_HOSTS, PORTAL_BASE_URL, DATABASE_URL and CELERY_BROKER_URL.
DEBUG is off unless PORTAL_DEBUG says otherwise.
"""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()

# A key that only exists so that a fresh checkout starts; the system check
# `portal.E001` refuses it whenever DEBUG is off and the process serves requests.
INSECURE_DEMO_KEY = "insecure-demo-key-change-me-0123456789-abcdefghijklmnopqrstuvwxyz"
SECRET_KEY = env.str("PORTAL_SECRET_KEY", default=INSECURE_DEMO_KEY)
DEBUG = env.bool("PORTAL_DEBUG", default=False)
ALLOWED_HOSTS = env.list("PORTAL_ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
BASE_URL = env.str("PORTAL_BASE_URL", default="http://127.0.0.1:8000").rstrip("/")
TRUSTED_PROXIES = env.list("PORTAL_TRUSTED_PROXIES", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "accounts",
    "studies",
    "dicomweb",
    "portal.apps.PortalConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
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
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The storage SCP, the worker and the web server write concurrently: WAL and a
    # generous busy timeout keep SQLite usable for the demo and small sites.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "accounts.User"

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
STATIC_ROOT = VAR_DIR / "static"
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
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = VAR_DIR / "broker"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "store_processed": False,
    }
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# --- DICOM -------------------------------------------------------------------------------
STORE_DIR = Path(env.str("PORTAL_STORE_DIR", default=str(VAR_DIR / "store")))
DICOM_AE_TITLE = env.str("PORTAL_AE_TITLE", default="PORTAL")
DICOM_PORT = env.int("PORTAL_DICOM_PORT", default=11112)
DICOM_BIND_ADDRESS = env.str("PORTAL_DICOM_BIND", default="0.0.0.0")  # noqa: S104
# Seconds: waiting for a PACS to accept an association, to answer a request, and for a
# silent network (an association with no traffic for this long is aborted).
DICOM_CONNECT_TIMEOUT = env.float("PORTAL_DICOM_CONNECT_TIMEOUT", default=10.0)
DICOM_DIMSE_TIMEOUT = env.float("PORTAL_DICOM_DIMSE_TIMEOUT", default=120.0)
DICOM_NETWORK_TIMEOUT = env.float("PORTAL_DICOM_NETWORK_TIMEOUT", default=120.0)
DICOMWEB_TIMEOUT = env.float("PORTAL_DICOMWEB_TIMEOUT", default=60.0)
# How often a failed retrieval is tried again by the worker (with exponential backoff).
RETRIEVAL_MAX_RETRIES = env.int("PORTAL_RETRIEVAL_MAX_RETRIES", default=3)
RETRIEVAL_RETRY_BACKOFF = env.int("PORTAL_RETRIEVAL_RETRY_BACKOFF", default=30)

# --- Messages ----------------------------------------------------------------------------
EMAIL_BACKEND = env.str("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
EMAIL_FILE_PATH = env.str("EMAIL_FILE_PATH", default=str(VAR_DIR / "mail"))
DEFAULT_FROM_EMAIL = env.str("PORTAL_FROM_EMAIL", default="portal@localhost")
SMS_BACKEND = env.str("PORTAL_SMS_BACKEND", default="console")
SMS_FILE_PATH = env.str("PORTAL_SMS_FILE_PATH", default=str(VAR_DIR / "sms"))

# --- Logging -----------------------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "root": {"handlers": ["console"], "level": env.str("PORTAL_LOG_LEVEL", default="INFO")},
    "loggers": {
        # pynetdicom logs every PDU at INFO; only its warnings matter to an operator.
        "pynetdicom": {"level": "WARNING"},
        # The request logger prints paths, and recipient paths may carry a link token.
        "django.server": {"level": "WARNING"},
    },
}
