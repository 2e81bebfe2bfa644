"""The portal's sub-application: sessions, CSRF, security headers and HTML errors in
one middleware, templates, static assets and routes.

Getting in: a portal link (billing.portal_sessions) opens `GET /portal/enter/{token}`,
which starts a session (an HttpOnly, SameSite cookie; Secure over TLS) and redirects
to the Overview without the token. Every other page needs that session; a browser
without one is sent to /portal/sign-in, which says how to get in. Every state change
is a POST carrying the session's CSRF token (a form field, or the X-CSRF-Token header
for the few requests the page's JavaScript makes).
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Awaitable, Callable

import aiohttp_jinja2
import jinja2
from aiohttp import web

from api.errors import ApiError, error_response
from billing.appkeys import PORTAL_SESSIONS
from billing.gateway import StripeUnavailable
from billing.portal_sessions import ENTRY_PATH, RefusedLink
from core.errors import Unavailable
from ledger.store import POSTGRES_DOWN
from portal import actions, format, pages
from portal.context import COOKIE, SESSION
from portal.security import csrf_ok, html_error, same_origin, secure_headers

log = logging.getLogger(__name__)

PREFIX = "/portal"
HERE = pathlib.Path(__file__).parent
PUBLIC = ("/portal/sign-in", "/portal/static/")  # reachable without a session
SAFE_METHODS = ("GET", "HEAD")
FORM_BYTES_MAX = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REFUSALS = {
    "malformed": "This is not a portal link.",
    "tampered": "This link has been changed since it was made.",
    "expired": "This link has expired.",
    "used": "This link has been used already: each link opens the portal once.",
    "revoked": "This link has been revoked.",
    "unknown": "This link is not valid for any organization.",
}
# Gone for a link that was good once; forbidden for an altered one; bad for the rest.
REFUSAL_STATUS = {"malformed": 400, "tampered": 403, "expired": 410, "used": 410, "revoked": 410, "unknown": 404}


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path.startswith(PUBLIC):
        return await handler(request)
    cookie = request.cookies.get(COOKIE)
    session = await request.config_dict[PORTAL_SESSIONS].session(cookie) if cookie else None
    if path.startswith(ENTRY_PATH):  # a link starts its own session; one held already only helps its error page
        if session is not None:
            request[SESSION] = session
        return await handler(request)
    if session is None:
        if request.method in SAFE_METHODS:
            raise web.HTTPSeeOther("/portal/sign-in")
        return html_error(request, 401, "Signed out", "Your portal session has ended. Open a new portal link.")
    request[SESSION] = session
    if request.method not in SAFE_METHODS and not (same_origin(request) and await csrf_ok(request, session.csrf_token)):
        log.warning("portal_csrf_refused", extra={"organization_id": session.organization_id, "path": path})
        return html_error(
            request,
            403,
            "Request refused",
            "This form did not come from your portal session (or the page is too old). Reload the page and try again.",
        )
    return await handler(request)


@web.middleware
async def portal_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await _guarded(request, handler)
    except web.HTTPException as exc:
        if exc.status < 400:  # a redirect: keep it, with our headers
            secure_headers(request, exc)
            raise
        response = html_error(request, exc.status, exc.reason, _http_message(exc.status))
    except ApiError as exc:  # the doors' refusals: the API's rules, said on a page
        if "application/json" in request.headers.get("Accept", ""):  # the page's script: the API's shape
            response = error_response(exc.status, exc.code, exc.message, exc.param)
        elif exc.code == "forbidden" and SESSION in request and request[SESSION].role != "admin":
            response = html_error(
                request, 403, "Read only", "You are signed in as a viewer: ask for an admin link to make changes."
            )
        elif exc.status == 503:
            response = html_error(request, 503, "Unavailable", "A backing service is unreachable; nothing changed.")
        else:
            response = html_error(request, exc.status, _title(exc.status), exc.message)
    except RefusedLink as exc:
        response = html_error(request, REFUSAL_STATUS[exc.reason], "This link cannot be used", REFUSALS[exc.reason])
    except Exception as exc:
        if isinstance(exc, (Unavailable, StripeUnavailable, *POSTGRES_DOWN)):
            log.warning("portal_dependency_unavailable", extra={"error": str(exc), "path": request.path})
            response = html_error(request, 503, "Unavailable", "A backing service is unreachable; nothing changed.")
        else:  # a bug of ours: logged in full, said plainly
            log.error("portal_unhandled_error", exc_info=exc, extra={"path": request.path})
            response = html_error(request, 500, "Something went wrong", "The page failed; it has been logged.")
    secure_headers(request, response)
    return response


def _title(status: int) -> str:
    return {400: "Check the form", 402: "Payment declined", 403: "Not allowed", 404: "Not found", 409: "Conflict"}.get(
        status, "Something went wrong"
    )


def _http_message(status: int) -> str:
    if status == 404:
        return "There is no such page in the portal."
    if status == 405:
        return "That is not how this page is used."
    if status == 413:
        return "The form is too large."
    return "The request could not be handled."


def mount(app: web.Application) -> None:
    """Add the portal under /portal to the billing application `app`."""
    sub = web.Application(middlewares=[portal_middleware], client_max_size=FORM_BYTES_MAX)
    env = aiohttp_jinja2.setup(
        sub,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(format.FILTERS)
    sub.router.add_static("/static/", HERE / "static", name="static")
    sub.add_routes(pages.routes() + actions.routes())
    sub.router.add_get("/", to_overview)
    app.add_subapp(PREFIX, sub)
    app.router.add_get(PREFIX, to_overview)  # /portal without the slash


async def to_overview(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/portal/overview")
