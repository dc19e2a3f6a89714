"""One settings module driven by environment variables; the defaults run on one machine.

Every optional integration switches on by one value: DATABASE_URL-style PostgreSQL via
DB_ENGINE=postgresql, Redis via REDIS_URL, an HPC platform via HPC_PLATFORMS, OIDC via
OIDC_RP_CLIENT_ID and the provider's endpoints. See .env.example for every variable.
"""

from __future__ import annotations

import hmac
import json
import secrets
from pathlib import Path

from chatai import netaddr
from common.env import env, envbool, envint, envlist
from gateway.project_sync import parse_projects

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env("CHATAI_DATA_DIR", str(BASE_DIR / "var")))

DEBUG = envbool("DEBUG", False)
SECRET_KEY = env("SECRET_KEY")
if not SECRET_KEY:
    # The embedded default keeps a generated key in the data directory (owner-only).
    key_file = DATA_DIR / "secret_key"
    if not key_file.exists():
        DATA_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    SECRET_KEY = key_file.read_text().strip()
ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "chatai",
    "gateway",
    "hpcbridge",
    "django_prometheus",
    "rest_framework",
    "api",
    "channels",
]

# /api (DRF): the same API keys as /v1, or the session with CSRF; errors in /v1's shape.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["api.auth.ApiKeyAuthentication", "api.auth.ChatSessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer",
                                 "rest_framework.renderers.BrowsableAPIRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "api.errors.exception_handler",
}

MIDDLEWARE = [
    # django-prometheus counts pages and admin (django_http_*); /v1 has its own counters (gateway/metrics.py).
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "chatai.security.ContentSecurityPolicyMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "chatai.urls"
ASGI_APPLICATION = "chatai.asgi.application"

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
                "chatai.context.site",
            ],
        },
    },
]

if env("DB_ENGINE", "sqlite") == "postgresql":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": env("DB_NAME", "chatai"),
            "USER": env("DB_USER", "postgres"),
            "PASSWORD": env("DB_PASSWORD"),
            "HOST": env("DB_HOST", "127.0.0.1"),
            "PORT": env("DB_PORT", "5432"),
            "CONN_MAX_AGE": envint("DB_CONN_MAX_AGE", 600),
            "CONN_HEALTH_CHECKS": True,  # a connection PostgreSQL dropped is replaced, not reused
        }
    }
else:
    DATA_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env("DB_NAME", str(DATA_DIR / "chatai.sqlite3")),
            "CONN_MAX_AGE": None,  # one connection per worker thread, kept (opening one costs milliseconds)
            # WAL: readers never wait for the writer, and a commit is not an fsync.
            "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                        "transaction_mode": "IMMEDIATE", "timeout": 20},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"

# Single sign-on with the institution's OpenID Connect provider (mozilla-django-oidc), on when
# OIDC_RP_CLIENT_ID is set; otherwise local Django accounts with the standard login page.
OIDC_ENABLED = bool(env("OIDC_RP_CLIENT_ID"))
OIDC_PASSWORD_LOGIN = True  # local accounts log in with a password (below: off with OIDC unless kept)
if OIDC_ENABLED:
    INSTALLED_APPS.append("mozilla_django_oidc")
    # Password login is off (no local password works) unless kept for staff accounts.
    OIDC_PASSWORD_LOGIN = envbool("OIDC_PASSWORD_LOGIN", False)
    AUTHENTICATION_BACKENDS = ["chatai.oidc.Backend"]
    if OIDC_PASSWORD_LOGIN:
        AUTHENTICATION_BACKENDS.append("chatai.oidc.LocalAdminBackend")
    # The provider's session lifetime applies: pages ask it again (silently) when the check is due.
    MIDDLEWARE.insert(MIDDLEWARE.index("django.contrib.auth.middleware.AuthenticationMiddleware") + 1,
                      "mozilla_django_oidc.middleware.SessionRefresh")
    OIDC_RP_CLIENT_ID = env("OIDC_RP_CLIENT_ID")
    OIDC_RP_CLIENT_SECRET = env("OIDC_RP_CLIENT_SECRET")
    OIDC_RP_SIGN_ALGO = env("OIDC_RP_SIGN_ALGO", "RS256")
    OIDC_RP_SCOPES = env("OIDC_RP_SCOPES", "openid email profile groups")
    OIDC_OP_AUTHORIZATION_ENDPOINT = env("OIDC_OP_AUTHORIZATION_ENDPOINT")
    OIDC_OP_TOKEN_ENDPOINT = env("OIDC_OP_TOKEN_ENDPOINT")
    OIDC_OP_USER_ENDPOINT = env("OIDC_OP_USER_ENDPOINT")
    OIDC_OP_JWKS_ENDPOINT = env("OIDC_OP_JWKS_ENDPOINT")
    OIDC_OP_LOGOUT_ENDPOINT = env("OIDC_OP_LOGOUT_ENDPOINT")  # end_session_endpoint: logout there too
    OIDC_OP_LOGOUT_URL_METHOD = "chatai.oidc.provider_logout_url"
    OIDC_USE_PKCE = envbool("OIDC_USE_PKCE", True)
    OIDC_STORE_ID_TOKEN = True  # the id_token_hint for the provider's logout
    OIDC_USERNAME_CLAIM = env("OIDC_USERNAME_CLAIM", "sub")  # sub, or email (then only if email_verified)
    OIDC_GROUPS_CLAIM = env("OIDC_GROUPS_CLAIM", "groups")
    OIDC_GROUPS_MAP = json.loads(env("OIDC_GROUPS_MAP", "{}") or "{}")  # claim value -> Django group
    OIDC_GROUPS_PREFIX = env("OIDC_GROUPS_PREFIX")  # only claim values with this prefix become groups
    OIDC_KEEP_GROUPS_WITHOUT_CLAIM = envbool("OIDC_KEEP_GROUPS_WITHOUT_CLAIM", False)  # absent claim: no groups
    OIDC_VERIFY_SSL = envbool("OIDC_VERIFY_SSL", True)
    OIDC_RENEW_ID_TOKEN_EXPIRY_SECONDS = envint("OIDC_RENEW_SECONDS", 900)  # ask the provider again after
    LOGIN_URL = "oidc_authentication_init"
    LOGIN_REDIRECT_URL_FAILURE = "/signin-failed/"  # not "/": a disabled user would loop through the provider
    OIDC_EXEMPT_URLS = ["/healthz", "/metrics", "/signin-failed/"]
    ALLOW_LOGOUT_GET_METHOD = False

# The chat page's defaults for a new conversation (each conversation can change them).
CHAT_DEFAULTS = {
    "system_prompt": env("CHAT_SYSTEM_PROMPT", "You are a helpful assistant."),
    "temperature": float(env("CHAT_TEMPERATURE", "0.7")),
    "top_p": float(env("CHAT_TOP_P", "1.0")),
    "max_tokens": envint("CHAT_MAX_TOKENS", 0) or None,
    "model": env("CHAT_DEFAULT_MODEL"),
}
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = envbool("SECURE_COOKIES", not DEBUG and bool(CSRF_TRUSTED_ORIGINS))
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

# hpcside on this machine (the embedded default): its services file.
HPCSIDE_CONFIG = env("HPCSIDE_CONFIG", str(DATA_DIR / "hpcside" / "services.ini"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", "INFO")},
    # Request bodies never reach a log: Django's request logger only logs paths and status.
}

# HPC platforms reached through hpcbridge: a JSON list, inline or in a file. Each entry:
# {"name", "transport": "ssh", "host", "port", "user", "key_file", "known_hosts"} or
# {"name", "transport": "local", "hpcside_config"}. Default: hpcside on this machine.
HPC_PLATFORMS_JSON = env("HPC_PLATFORMS") or (
    Path(env("HPC_PLATFORMS_FILE")).read_text() if env("HPC_PLATFORMS_FILE") else ""
)
HPC_PLATFORMS = (
    json.loads(HPC_PLATFORMS_JSON)
    if HPC_PLATFORMS_JSON
    else [{"name": "local", "transport": "local", "hpcside_config": HPCSIDE_CONFIG}]
)

# -- gateway -----------------------------------------------------------------------------
# Projects and the groups whose members belong to them (JSON, or PROJECTS_FILE), applied at every
# `manage.py migrate`: {"chemistry": {"groups": ["chem"], "slurm_account": "chem01", "shares": 10},
# "physics": ["physics"]}. A malformed value stops the start with an error naming PROJECTS.
PROJECTS = parse_projects(env("PROJECTS"))
# Keyed hash of API key secrets; rotating it invalidates every key.
API_KEY_PEPPER = env("API_KEY_PEPPER") or hmac.new(SECRET_KEY.encode(), b"api-key-pepper", "sha256").hexdigest()
# Largest request body. Django spools bodies above FILE_UPLOAD_MAX_MEMORY_SIZE to a temp file:
# keep them in memory so no prompt ever touches a disk.
GATEWAY_MAX_BODY = envint("GATEWAY_MAX_BODY", 16 * 1024 * 1024)
FILE_UPLOAD_MAX_MEMORY_SIZE = GATEWAY_MAX_BODY + 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = GATEWAY_MAX_BODY + 1024
# How long /v1/models answers from the platforms are reused.
GATEWAY_MODELS_TTL = envint("GATEWAY_MODELS_TTL", 5)
# Seconds a request waits for a lost link to an HPC platform to come back (or another platform
# offering the model) before it fails; a cut stream is then continued (hpcbridge/failover.py).
GATEWAY_LINK_WAIT = envint("GATEWAY_LINK_WAIT", 30)
# Seconds a stopped (SIGTERM) daphne worker waits for its requests in flight before it exits.
GRACEFUL_STOP_TIMEOUT = envint("GRACEFUL_STOP_TIMEOUT", 120)
# Seconds an edited rate-limit policy or group membership takes to apply (they are cached in each worker).
GATEWAY_POLICY_TTL = envint("GATEWAY_POLICY_TTL", 5)
# Failed /v1 authentications (missing, malformed or unknown key) per client address and minute
# before the address gets 429 until the minute is over (0: no limit); seconds an unknown key
# prefix is remembered, so repeating it costs no database query.
GATEWAY_AUTH_FAILURES_PER_MINUTE = envint("GATEWAY_AUTH_FAILURES_PER_MINUTE", 60)
GATEWAY_UNKNOWN_KEY_TTL = envint("GATEWAY_UNKNOWN_KEY_TTL", 60)
# Fair-share priority (gateway/fairshare.py, docs/accounting.md): on by default; off, every request
# has priority 0 (first come, first served). Usage decays with a half-life of an hour: priorities
# follow who has loaded the GPUs over the last hours, the span over which requests compete (a
# queue lasts seconds, a working session hours), while a pause of a few minutes does not wipe a
# heavy user's record; long-term allocation is the budgets' job. Slurm's default of 7 days suits
# jobs that run for days. API requests are placed FAIRSHARE_CHAT_BOOST behind chat requests of the
# same standing (on a scale of 1000); a user without a project counts as a project of
# FAIRSHARE_DEFAULT_SHARES shares.
FAIRSHARE = envbool("FAIRSHARE", True)
FAIRSHARE_HALF_LIFE = envint("FAIRSHARE_HALF_LIFE", 3600)
FAIRSHARE_CHAT_BOOST = envint("FAIRSHARE_CHAT_BOOST", 100)
FAIRSHARE_DEFAULT_SHARES = envint("FAIRSHARE_DEFAULT_SHARES", 1)
for _name in ("FAIRSHARE_HALF_LIFE", "FAIRSHARE_DEFAULT_SHARES"):
    if globals()[_name] <= 0:
        raise ValueError(f"{_name}={globals()[_name]} must be a positive whole number")
if FAIRSHARE_CHAT_BOOST < 0:
    raise ValueError(f"FAIRSHARE_CHAT_BOOST={FAIRSHARE_CHAT_BOOST} must not be negative")
# Limits for users with no policy (None: unlimited).
GATEWAY_DEFAULT_LIMITS = {
    "requests_per_minute": envint("LIMIT_REQUESTS_PER_MINUTE", 120),
    "requests_per_hour": None,
    "requests_per_day": None,
    "tokens_per_minute": None,
    "tokens_per_day": None,
    "parallel_streams": envint("LIMIT_PARALLEL_STREAMS", 16),
}

# Shared counters (rate limits) live in the cache: Redis when REDIS_URL is set (several
# workers share one limit), local memory otherwise (the single-process default).
REDIS_URL = env("REDIS_URL")
CACHES = {
    "default": (
        {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL, "KEY_PREFIX": "chatai"}
        if REDIS_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}

# WebSockets (channels): live model status for the chat page. With Redis, every worker's sockets
# get the same updates (channels-redis); alone, an in-memory layer.
ASGI_APPLICATION = "chatai.asgi.application"
CHANNEL_LAYERS = {
    "default": (
        {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL],
                                                                         "prefix": "chatai-ws"}}
        if REDIS_URL
        else {"BACKEND": "channels.layers.InMemoryChannelLayer"}
    )
}
# Seconds between two looks at the models' status while a page is open (pushed only on change).
LIVE_STATUS_INTERVAL = float(env("LIVE_STATUS_INTERVAL", "1"))

# /metrics: with a token, the token is required; without, scrapers from these addresses or
# networks (none set: direct requests from this machine only, never through a proxy).
METRICS_TOKEN = env("METRICS_TOKEN")
METRICS_ALLOWED_IPS = envlist("METRICS_ALLOWED_IPS")
# Reverse proxies whose X-Forwarded-For names the client (chatai.netaddr), e.g. 127.0.0.1 for
# nginx on this machine. Empty: no forwarded address is believed.
TRUSTED_PROXIES = envlist("TRUSTED_PROXIES")
netaddr.parse_networks(tuple(TRUSTED_PROXIES + METRICS_ALLOWED_IPS))  # a typo fails at start, naming the value
# Behind a TLS proxy that sets X-Forwarded-Proto (docs/deploy.md), e.g. SECURE_PROXY_SSL_HEADER=X-Forwarded-Proto:
# requests it marks https are https (redirect URIs, secure cookies). Only where every request passes that proxy.
if env("SECURE_PROXY_SSL_HEADER"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_" + env("SECURE_PROXY_SSL_HEADER").upper().replace("-", "_"), "https")
