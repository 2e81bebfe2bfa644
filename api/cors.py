"""Cross-origin requests from the browser origins the operator lists (CORS_ORIGINS).

None are allowed by default: without CORS_ORIGINS no middleware is installed (the
sidecar's hot path pays nothing) and a browser on another origin cannot read an answer.
With it, a preflight (OPTIONS with Access-Control-Request-Method) from a listed origin
is answered here, and every answer to a listed origin says so; other origins get no
CORS headers (and a 403 for their preflight). Credentials travel in the Authorization
header, never in cookies, so Access-Control-Allow-Credentials is not sent.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Middleware

from api.errors import Handler, error_response
from core.http import IDEMPOTENCY_HEADER, REPLAYED_HEADER

ALLOW_METHODS = "GET, POST, PUT, DELETE"
ALLOW_HEADERS = f"Authorization, Content-Type, {IDEMPOTENCY_HEADER}"
EXPOSE_HEADERS = f"{REPLAYED_HEADER}, Retry-After"
PREFLIGHT_MAX_AGE_S = 600


def cors_middleware(origins: Iterable[str]) -> Middleware:
    allowed = frozenset(origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin is not None and "Access-Control-Request-Method" in request.headers:
            if origin not in allowed:
                return error_response(403, "forbidden", f"origin {origin} is not allowed (CORS_ORIGINS)")
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": ALLOW_METHODS,
                    "Access-Control-Allow-Headers": ALLOW_HEADERS,
                    "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
                    "Vary": "Origin",
                },
            )
        response = await handler(request)
        if origin is not None and origin in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            response.headers.add("Vary", "Origin")
        return response

    return cors


def middlewares(origins: Iterable[str]) -> list[Middleware]:
    """[the CORS middleware] when origins are listed, else nothing at all."""
    listed = tuple(origins)
    return [cors_middleware(listed)] if listed else []
