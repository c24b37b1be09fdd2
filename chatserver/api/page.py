"""GET / and GET /static/{name}: the browser chat page (``chatserver.web``).

Only the files found in that package when the app is built are served, looked
up by exact name, so a request path never reaches the filesystem. Files are
revalidated on every load (``no-cache``; unchanged ones answer 304), so a new
version of the page is seen without a hard refresh.

The page's Content-Security-Policy admits scripts, styles and connections
from this origin only: a second line of defence behind the page's own rule
that message text never goes through ``innerHTML``, and a guarantee that no
browser is sent to a third party.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from chatserver.errors import ApiError
from chatserver.web import INDEX, PAGE_DIR

CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
COMMON_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE_HEADERS = {
    **COMMON_HEADERS,
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
}


def static_files(directory: Path = PAGE_DIR) -> dict[str, Path]:
    """The files /static/ may serve: those of a known type directly in ``directory``."""
    return {
        path.name: path
        for path in sorted(directory.iterdir())
        if path.is_file() and path.suffix in CONTENT_TYPES
    }


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(INDEX, headers=PAGE_HEADERS)


def _static_handler(files: dict[str, Path]) -> Handler:
    async def static(request: web.Request) -> web.FileResponse:
        name = request.match_info["name"]
        path = files.get(name)
        if path is None:
            raise ApiError(404, "not_found", f"no static file {name!r}")
        headers = {**COMMON_HEADERS, "Content-Type": CONTENT_TYPES[path.suffix]}
        return web.FileResponse(path, headers=headers)

    return static


def setup_routes(app: web.Application) -> None:
    """Serve the page at / and its files under /static/."""
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", _static_handler(static_files()))
