"""The portal's settings and the headers they make (no servers)."""

from __future__ import annotations

import pytest

from billing.config import BillingConfig, StripeFlavor, load
from core.config import ConfigError
from portal.security import _frame_options, content_security_policy

LIVE = {"STRIPE_SECRET_KEY": "sk_live_12345678", "STRIPE_WEBHOOK_SECRET": "whsec_12345678"}


def test_stripe_js_comes_from_stripe_or_from_the_local_stand_in() -> None:
    assert load(LIVE).stripe_js_url == "https://js.stripe.com/v3/"
    local = BillingConfig().with_stripe(
        api_base="http://127.0.0.1:4242", secret_key="sk_x", webhook_secret="whsec_x", publishable_key="pk_x",
        flavor=StripeFlavor.LOCALSTRIPE,
    )  # fmt: skip
    assert local.stripe_js_url == "http://127.0.0.1:4242/js.stripe.com/v3/"
    assert load({**LIVE, "STRIPE_JS_URL": "https://js.example/v3"}).stripe_js_url == "https://js.example/v3/"


def test_the_policy_allows_stripe_and_nothing_inline() -> None:
    csp = content_security_policy(load(LIVE))
    directives = dict(d.split(" ", 1) for d in csp.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self' https://js.stripe.com https://*.js.stripe.com"
    assert "hooks.stripe.com" in directives["frame-src"] and directives["connect-src"].startswith("'self' https://api")
    assert directives["frame-ancestors"] == "'none'" and "unsafe" not in csp
    assert _frame_options(load(LIVE)) == "DENY"


@pytest.mark.parametrize(
    ("raw", "ancestors", "frame_options"),
    [
        ("'self'", ("'self'",), "SAMEORIGIN"),
        (
            "https://platform.example https://b.example:8443/",
            ("https://platform.example", "https://b.example:8443"),
            None,
        ),
        ("'none'", (), "DENY"),
    ],
)
def test_framing_is_configurable(raw: str, ancestors: tuple[str, ...], frame_options: str | None) -> None:
    billing = load({**LIVE, "PORTAL_FRAME_ANCESTORS": raw})
    assert billing.portal_frame_ancestors == ancestors
    assert _frame_options(billing) == frame_options
    assert content_security_policy(billing).endswith("frame-ancestors " + (" ".join(ancestors) or "'none'"))


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"PORTAL_FRAME_ANCESTORS": "javascript:alert(1)"}, "PORTAL_FRAME_ANCESTORS"),
        ({"PORTAL_FRAME_ANCESTORS": "https://platform.example/path"}, "PORTAL_FRAME_ANCESTORS"),
        ({"PORTAL_FRAME_ANCESTORS": "*"}, "PORTAL_FRAME_ANCESTORS"),
        ({"PORTAL_LINK_TTL_S": "7200"}, "PORTAL_LINK_TTL_S"),  # a link lives an hour at most
        ({"PORTAL_SECRET": "short"}, "PORTAL_SECRET"),
        ({"PORTAL_COOKIE_SAMESITE": "lax"}, "PORTAL_COOKIE_SAMESITE"),
        ({"STRIPE_JS_URL": "ftp://x"}, "STRIPE_JS_URL"),
    ],
)
def test_bad_settings_stop_the_process_naming_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load({**LIVE, **env})
