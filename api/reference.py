"""The browsable API reference at `/docs`: Swagger UI rendering the service's own
OpenAPI document, from vendored files (api/static/VENDORED.md: version, source,
licence), so nothing is fetched from another origin and nothing is built.

    GET /docs                          the page
    GET /docs/assets/{path}            our starter script and the pinned Swagger UI files

The page is static, so it carries a strict Content-Security-Policy: scripts and styles
from this origin only (Swagger UI sets style attributes, hence 'unsafe-inline' for
styles alone), requests ("Try it out") to this origin only, no framing.
"""

from __future__ import annotations

import html
import importlib.resources
import mimetypes
from collections.abc import Awaitable, Callable

from aiohttp import web

SWAGGER_UI_VERSION = "5.35.0"
ASSETS_PREFIX = "/docs/assets"
_VENDORED = f"swagger-ui-{SWAGGER_UI_VERSION}"
_ASSET_FILES = (
    "reference.js",
    f"{_VENDORED}/swagger-ui-bundle.js",
    f"{_VENDORED}/swagger-ui.css",
    f"{_VENDORED}/LICENSE",
    f"{_VENDORED}/NOTICE",
    f"{_VENDORED}/swagger-ui-bundle.js.LICENSE.txt",
)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
IMMUTABLE = "public, max-age=31536000, immutable"  # the version is in the path

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _page(title: str, openapi_url: str) -> bytes:
    t, url, base = html.escape(title), html.escape(openapi_url), ASSETS_PREFIX
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{t}: API reference</title>
<link rel="stylesheet" href="{base}/{_VENDORED}/swagger-ui.css">
</head>
<body class="api-reference">
<noscript>This reference needs JavaScript; the document itself is <a href="{url}">{url}</a>.</noscript>
<div id="swagger-ui" data-openapi="{url}"></div>
<script src="{base}/{_VENDORED}/swagger-ui-bundle.js"></script>
<script src="{base}/reference.js"></script>
</body>
</html>
""".encode()


def _load_assets() -> dict[str, tuple[bytes, str]]:
    root = importlib.resources.files("api").joinpath("static")
    assets: dict[str, tuple[bytes, str]] = {}
    for name in _ASSET_FILES:
        kind = mimetypes.guess_type(name)[0] or "text/plain"
        if kind == "text/javascript":
            kind = "application/javascript"
        assets[name] = (root.joinpath(name).read_bytes(), kind)
    return assets


def routes(title: str, openapi_url: str) -> list[tuple[str, Handler]]:
    """(path, handler) for GET /docs and its assets; each service adds them its own way
    (the sidecar wraps each route, billing has middlewares)."""
    page = _page(title, openapi_url)
    assets = _load_assets()

    async def docs(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers=_SECURITY_HEADERS)

    async def asset(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["path"])
        if found is None:
            raise web.HTTPNotFound()
        body, kind = found
        charset = "utf-8" if kind.startswith(("text/", "application/javascript")) else None
        headers = {"Cache-Control": IMMUTABLE, "X-Content-Type-Options": "nosniff"}
        return web.Response(body=body, content_type=kind, charset=charset, headers=headers)

    return [("/docs", docs), (ASSETS_PREFIX + "/{path:.+}", asset)]
