"""Billing settings, decoded once at start from environment variables (the same rules
as core/config.py: a wrong value stops the process with a message naming the variable).

With no STRIPE_* variable set, development and tests run against a localstripe server
the project starts itself (billing/localstripe.py); production sets STRIPE_SECRET_KEY,
STRIPE_WEBHOOK_SECRET and, if it is not Stripe's, STRIPE_API_BASE.
"""

from __future__ import annotations

import enum
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, replace

from core.config import ConfigError
from core.config import env_bool as _bool
from core.config import env_float as _float
from core.config import env_int as _int

STRIPE_API_BASE_DEFAULT = "https://api.stripe.com"
STRIPE_JS_URL_DEFAULT = "https://js.stripe.com/v3/"
LOCALSTRIPE_JS_PATH = "/js.stripe.com/v3/"  # localstripe's stand-in for Stripe.js
PORTAL_LINK_TTL_S_MAX = 3600  # a portal link is valid for at most an hour


class StripeFlavor(enum.Enum):
    """Which server answers the Stripe API: the real one, or localstripe (which speaks
    the 2017-08-15 shapes and lacks a few features; see README, "localstripe gaps")."""

    STRIPE = "stripe"
    LOCALSTRIPE = "localstripe"


@dataclass(frozen=True)
class BillingConfig:
    stripe_secret_key: str | None = None  # None: start localstripe (development, tests)
    stripe_webhook_secret: str | None = None
    stripe_api_base: str = STRIPE_API_BASE_DEFAULT
    stripe_flavor: StripeFlavor = StripeFlavor.STRIPE
    stripe_publishable_key: str | None = None  # handed to the frontend (Stripe.js)
    stripe_timeout_s: float = 10.0
    stripe_max_retries: int = 2
    billing_port: int = 8081
    billing_public_url: str | None = None  # where Stripe reaches the webhook (localstripe registration)
    plan_credits_rollover: bool = False  # False: a period's plan credits expire at its end
    webhook_workers: int = 4
    webhook_sweep_interval_s: float = 5.0
    webhook_attempts_max: int = 12
    catalog_sync_on_start: bool = True
    stripe_js_url_override: str | None = None  # STRIPE_JS_URL; default: see stripe_js_url
    portal_secret: str | None = None  # signs portal links; None: derived from JWT_SECRET
    portal_link_ttl_s: int = PORTAL_LINK_TTL_S_MAX
    portal_session_ttl_s: int = 8 * 3600
    # Who may frame the portal (CSP frame-ancestors): () = nobody; origins, or 'self'.
    portal_frame_ancestors: tuple[str, ...] = ()
    portal_cookie_samesite: str = "Lax"  # "None" (TLS only) lets another site embed the portal
    auto_topup_interval_s: float = 1.0  # how often enabled organizations are looked at (0: not in this process)
    auto_topup_cooldown_s: float = 300.0  # at least this long between two top-ups of one organization

    @property
    def stripe_configured(self) -> bool:
        return self.stripe_secret_key is not None and self.stripe_webhook_secret is not None

    @property
    def stripe_js_url(self) -> str:
        """Where pages load Stripe.js from: Stripe's, or localstripe's stand-in."""
        if self.stripe_js_url_override is not None:
            return self.stripe_js_url_override
        if self.stripe_flavor is StripeFlavor.LOCALSTRIPE and self.stripe_api_base != STRIPE_API_BASE_DEFAULT:
            return self.stripe_api_base.rstrip("/") + LOCALSTRIPE_JS_PATH
        return STRIPE_JS_URL_DEFAULT

    def with_stripe(
        self, *, api_base: str, secret_key: str, webhook_secret: str, publishable_key: str | None, flavor: StripeFlavor
    ) -> BillingConfig:
        return replace(
            self,
            stripe_api_base=api_base,
            stripe_secret_key=secret_key,
            stripe_webhook_secret=webhook_secret,
            stripe_publishable_key=publishable_key,
            stripe_flavor=flavor,
        )


def _http_url(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    parts = urllib.parse.urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: expected a URL starting with http:// or https://, got {raw!r}")
    return raw.rstrip("/")


def _secret(env: Mapping[str, str], name: str, prefixes: tuple[str, ...]) -> str | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    if not raw.startswith(prefixes) or len(raw) < 8:
        raise ConfigError(f"{name}: expected a key starting with {' or '.join(prefixes)}")
    return raw


def _frame_ancestors(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("PORTAL_FRAME_ANCESTORS", "").split()
    for source in raw:
        if source in ("'self'", "'none'"):
            continue
        parts = urllib.parse.urlsplit(source)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise ConfigError(
                f"PORTAL_FRAME_ANCESTORS: expected origins (https://platform.example) or 'self', got {source!r}"
            )
    return tuple(s.rstrip("/") for s in raw if s != "'none'")


def _samesite(env: Mapping[str, str]) -> str:
    raw = env.get("PORTAL_COOKIE_SAMESITE", "Lax")
    if raw not in ("Lax", "Strict", "None"):
        raise ConfigError(f"PORTAL_COOKIE_SAMESITE: expected Lax, Strict or None, got {raw!r}")
    return raw


def load(env: Mapping[str, str] | None = None) -> BillingConfig:
    """Decode the billing configuration from `env` (default: os.environ)."""
    env = os.environ if env is None else env
    secret_key = _secret(env, "STRIPE_SECRET_KEY", ("sk_", "rk_"))
    webhook_secret = _secret(env, "STRIPE_WEBHOOK_SECRET", ("whsec_",))
    if secret_key is not None and webhook_secret is None:
        raise ConfigError("STRIPE_WEBHOOK_SECRET: required when STRIPE_SECRET_KEY is set")
    if webhook_secret is not None and secret_key is None:
        raise ConfigError("STRIPE_SECRET_KEY: required when STRIPE_WEBHOOK_SECRET is set")
    api_base = _http_url(env, "STRIPE_API_BASE")
    if api_base is not None and secret_key is None:
        raise ConfigError("STRIPE_API_BASE: set STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET with it")
    flavor_raw = env.get("STRIPE_FLAVOR", "")
    if flavor_raw:
        try:
            flavor = StripeFlavor(flavor_raw)
        except ValueError:
            choices = ", ".join(f.value for f in StripeFlavor)
            raise ConfigError(f"STRIPE_FLAVOR: expected one of {choices}, got {flavor_raw!r}") from None
    else:
        # Nothing configured: the project starts localstripe itself.
        flavor = StripeFlavor.STRIPE if secret_key is not None else StripeFlavor.LOCALSTRIPE
    return BillingConfig(
        stripe_secret_key=secret_key,
        stripe_webhook_secret=webhook_secret,
        stripe_api_base=api_base or STRIPE_API_BASE_DEFAULT,
        stripe_flavor=flavor,
        stripe_publishable_key=_secret(env, "STRIPE_PUBLISHABLE_KEY", ("pk_",)),
        stripe_timeout_s=_float(env, "STRIPE_TIMEOUT_S", 10.0, 0.5, 120.0),
        stripe_max_retries=_int(env, "STRIPE_MAX_RETRIES", 2, 0, 5),
        billing_port=_int(env, "BILLING_PORT", 8081, 0, 65535),
        billing_public_url=_http_url(env, "BILLING_PUBLIC_URL"),
        plan_credits_rollover=_bool(env, "PLAN_CREDITS_ROLLOVER", False),
        webhook_workers=_int(env, "WEBHOOK_WORKERS", 4, 1, 64),
        webhook_sweep_interval_s=_float(env, "WEBHOOK_SWEEP_INTERVAL_S", 5.0, 0.1, 300.0),
        webhook_attempts_max=_int(env, "WEBHOOK_ATTEMPTS_MAX", 12, 1, 100),
        catalog_sync_on_start=_bool(env, "BILLING_CATALOG_SYNC_ON_START", True),
        stripe_js_url_override=_js_url(env),
        portal_secret=_portal_secret(env),
        portal_link_ttl_s=_int(env, "PORTAL_LINK_TTL_S", PORTAL_LINK_TTL_S_MAX, 30, PORTAL_LINK_TTL_S_MAX),
        portal_session_ttl_s=_int(env, "PORTAL_SESSION_TTL_S", 8 * 3600, 300, 7 * 86400),
        portal_frame_ancestors=_frame_ancestors(env),
        portal_cookie_samesite=_samesite(env),
        auto_topup_interval_s=_float(env, "AUTO_TOPUP_INTERVAL_S", 1.0, 0.0, 3600.0),
        auto_topup_cooldown_s=_float(env, "AUTO_TOPUP_COOLDOWN_S", 300.0, 0.0, 30 * 86400.0),
    )


def _js_url(env: Mapping[str, str]) -> str | None:
    url = _http_url(env, "STRIPE_JS_URL")
    return None if url is None else url + "/"


def _portal_secret(env: Mapping[str, str]) -> str | None:
    raw = env.get("PORTAL_SECRET") or None
    if raw is not None and len(raw) < 32:
        raise ConfigError("PORTAL_SECRET: must be at least 32 characters")
    return raw
