"""The playground: one static page at `/` (HTML, JS and CSS under static/, no build step, nothing
fetched from elsewhere) that drives the HTTP API from a browser.

The page and its three assets hold no data and need no token; everything the page shows comes
from the API, whose calls carry the bearer token the user types, under the API's own rules. The
token check (guard.Guard) answers every path but a few public ones with a 401, so the page is
answered here, by an ASGI middleware added outside the Guard, for GET and HEAD of its own fixed
paths only; every other request goes on to the app unchanged.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

STATIC_DIR = Path(__file__).with_name("static")
PAGE_PATH = "/"
ASSET_PREFIX = "/static/"
# The only files served, with their media types: a fixed allow-list, so no path reaches the disk.
ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
# The page may talk to this server only; images are data: URLs (base64 from the API).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")


def page_paths() -> dict[str, str]:
    """URL path -> file name of everything the playground serves."""
    paths = {PAGE_PATH: "index.html"}
    paths.update({ASSET_PREFIX + name: name for name in ASSETS})
    return paths


class PlaygroundPages:
    """ASGI middleware: GET/HEAD of the page's paths are answered from files read once at start;
    anything else goes to `app`."""

    def __init__(self, app, files: dict[str, tuple[bytes, str]]):
        self.app, self.files = app, files

    async def __call__(self, scope, receive, send):
        hit = (self.files.get(scope["path"]) if scope["type"] == "http"
               and scope["method"] in ("GET", "HEAD") else None)
        if hit is None:
            return await self.app(scope, receive, send)
        body, media_type = hit
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", media_type.encode()), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-cache"), (b"x-content-type-options", b"nosniff"),
            (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
            (b"referrer-policy", b"no-referrer")]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


def load_files(static_dir: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """URL path -> (bytes, media type); a missing file is an error at start, not a 404 later."""
    return {path: ((static_dir / name).read_bytes(), ASSETS[name]) for path, name in page_paths().items()}


def add_playground(app: FastAPI) -> None:
    """Serve the playground page at `/` and its assets under /static/ (no token needed for them).
    Call before the app starts; a second call does nothing."""
    if getattr(app.state, "playground", False):
        return
    app.add_middleware(PlaygroundPages, files=load_files())  # outermost: before the token check
    app.state.playground = True
