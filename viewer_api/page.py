"""The viewer page (``GET /share/view``) and its own files (``/share/static/...``).

The page is static: it holds no patient data and learns everything from the
JSON API (:mod:`viewer_api.view_http`) with the caller's credential (a share
link's session cookie), never from its URL.  So it is public, and a browser
without a valid session gets the page, which then says the link cannot be
used.  The files are the project's own (HTML, one script, one style sheet),
served from this origin: nothing is fetched from anywhere else, and the
Content-Security-Policy says so (``default-src 'self'``, no inline script).

``?layout=mammography`` serves the mammography page instead (its own HTML
and script, :mod:`viewer_api.mammography`): the four standard views of the
study and of a prior round.  A signed-in reader opens it with ``&study=UID``
and the API token in the fragment (``#token=...``): the script takes the
token out of the address at once, keeps it in memory and sends it as
``Authorization: Bearer``; a fragment never reaches the server nor a
Referer.  Any other ``layout`` is the single-study page.

Files are looked up in a table built at start-up from the package's
``static/`` folder, never by joining a request path onto a folder.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from archive.security.http import public

PAGE = "/share/view"
#: ?layout= -> the page's HTML file (absent or unknown: the single-study viewer)
LAYOUTS = {"mammography": "mammography.html"}
STATIC = "/share/static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
#: what the browser may do with the page: its own origin only
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def static_files() -> dict[str, tuple[bytes, str]]:
    """name -> (content, media type) of every file of ``static/``."""
    folder = resources.files("viewer_api").joinpath("static")
    files: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in MEDIA_TYPES:
            files[entry.name] = (entry.read_bytes(), MEDIA_TYPES[suffix])
    return files


def add_routes(app: web.Application) -> None:
    files = static_files()

    @public
    async def page(request: web.Request) -> web.Response:
        body, media = files[LAYOUTS.get(request.query.get("layout", ""), "viewer.html")]
        return web.Response(body=body, headers={"Content-Type": media, **SECURITY_HEADERS})

    @public
    async def static(request: web.Request) -> web.Response:
        found = files.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        body, media = found
        return web.Response(body=body, headers={"Content-Type": media, **SECURITY_HEADERS})

    app.router.add_get(PAGE, page)
    app.router.add_get(STATIC + "/{name}", static)
