"""The portal's protections, in one place: the Content-Security-Policy and the other
response headers, CSRF (the session's token, and the request's Origin), HTML errors."""

from __future__ import annotations

import hmac
import urllib.parse
from collections.abc import Callable
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from billing.appkeys import BILLING_CONFIG
from billing.config import BillingConfig
from portal import format
from portal.context import CSRF_FIELD, CSRF_HEADER


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


STRIPE_JS_ORIGIN = "https://js.stripe.com"
STATIC_PREFIX = "/portal/static/"  # the web room's assets (the ops console uses them too)


def content_security_policy(billing: BillingConfig) -> str:
    """Nothing inline; scripts from us and Stripe.js; Stripe's frames and API; framing
    only by the configured ancestors. With Stripe's own Stripe.js, the origins Stripe's
    security guide lists (its frames, 3-D Secure's hooks); offline, the stand-in's one."""
    stripe_js = _origin(billing.stripe_js_url)
    stripe_api = _origin(billing.stripe_api_base)
    ancestors = " ".join(billing.portal_frame_ancestors) or "'none'"
    if stripe_js == STRIPE_JS_ORIGIN:
        scripts = f"{stripe_js} https://*.js.stripe.com"
        frames = f"{stripe_js} https://*.js.stripe.com https://hooks.stripe.com"
    else:
        scripts = frames = stripe_js
    connect = " ".join(dict.fromkeys(["'self'", stripe_api, stripe_js]))
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src 'self' {scripts}",
            "style-src 'self'",
            "img-src 'self'",
            f"connect-src {connect}",
            f"frame-src {frames}",
            "form-action 'self'",
            "base-uri 'none'",
            f"frame-ancestors {ancestors}",
        ]
    )


def _frame_options(billing: BillingConfig) -> str | None:
    """X-Frame-Options for browsers without frame-ancestors: only for the two cases it
    can say (it cannot name another origin)."""
    if not billing.portal_frame_ancestors:
        return "DENY"
    if billing.portal_frame_ancestors == ("'self'",):
        return "SAMEORIGIN"
    return None


def secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    billing = request.config_dict[BILLING_CONFIG]
    headers = response.headers
    headers["Content-Security-Policy"] = content_security_policy(billing)
    frame_options = _frame_options(billing)
    if frame_options:
        headers["X-Frame-Options"] = frame_options
    headers["X-Content-Type-Options"] = "nosniff"
    headers.setdefault("Referrer-Policy", "same-origin")
    if not request.path.startswith(STATIC_PREFIX):
        headers["Cache-Control"] = "no-store"  # private pages, and a key or secret shown once


def html_error(
    request: web.Request,
    status: int,
    title: str,
    message: str,
    *,
    context: Callable[[web.Request], dict[str, Any]] = format.context,
) -> web.Response:
    """An error page, with the furniture of the web app it is in (the portal's, or the
    ops console's `context`)."""
    ctx = {**context(request), "page": "error", "title": title, "message": message, "status": status}
    return aiohttp_jinja2.render_template("error.html", request, ctx, status=status)


def is_tls(request: web.Request) -> bool:
    public = request.config_dict[BILLING_CONFIG].billing_public_url or ""
    return request.secure or public.startswith("https://")


def same_origin(request: web.Request) -> bool:
    """A state change must come from our own pages (CSRF, with the token)."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None  # no Origin (older browsers): the token decides
    public = request.config_dict[BILLING_CONFIG].billing_public_url
    ours = {f"{request.scheme}://{request.host}"} | ({_origin(public)} if public else set())
    return origin in ours


async def csrf_ok(request: web.Request, expected: str) -> bool:
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        value = form.get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    return sent is not None and hmac.compare_digest(sent.encode(), expected.encode())
