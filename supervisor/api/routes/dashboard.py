"""The web dashboard: one static page (`supervisor/api/dashboard/`), its stylesheet and script.

The page holds no data: it fetches everything from the API with the bearer token it asks for,
so the page (`/` for browsers) and its assets (`/ui/...`) need no token. `/` answers HTML only
to a client whose Accept header prefers `text/html` over JSON (a browser); API clients, curl
and `*/*` keep the old tool's welcome JSON (see `system.install_root`).

The three files are small and read into memory (in a thread, re-read when a file changes on
disk). The page names its assets with a content hash (`/ui/app.js?v=<hash>`), so an asset
answered for its current hash is cached for a year and the page itself is revalidated
(`no-cache` + ETag): a new version is picked up by the next page load, never half of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from sanic import Blueprint, Request
from sanic.exceptions import InvalidHeader
from sanic.response import HTTPResponse
from sanic_ext import openapi

from supervisor.api.errors import error_response

DIRECTORY = Path(__file__).resolve().parent.parent / "dashboard"
PAGE = "index.html"
TYPES = {
    PAGE: "text/html; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
}
# Defence in depth for a page that shows strings coming from users and processes: no inline
# script or style, nothing from another origin (the page makes no external request at all).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
    "Vary": "Accept",
}
IMMUTABLE = "public, max-age=31536000, immutable"

bp = Blueprint("dashboard")


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    etag: str
    version: str  # short content hash, the `v` of the asset's URL


class Assets:
    """The dashboard's files in memory, keyed by name; `refresh()` re-reads changed files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, Asset] = {}
        self._stamps: tuple[tuple[int, int], ...] | None = None

    def refresh(self) -> dict[str, Asset]:
        """Blocking (stats and reads files): call it through `asyncio.to_thread`."""
        stamps = tuple(_stamp(self.directory / name) for name in TYPES)
        if stamps == self._stamps:
            return self._files
        files = {name: _asset((self.directory / name).read_bytes()) for name in TYPES if name != PAGE}
        page = (self.directory / PAGE).read_text("utf-8")
        for name, asset in files.items():
            page = page.replace(f"{{{{{name}}}}}", f"/ui/{name}?v={asset.version}")
        files[PAGE] = _asset(page.encode())
        self._files, self._stamps = files, stamps
        return files


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


def _asset(body: bytes) -> Asset:
    digest = hashlib.sha256(body).hexdigest()
    return Asset(body, f'"{digest[:32]}"', digest[:12])


ASSETS = Assets(DIRECTORY)


def wants_html(request: Request) -> bool:
    """True for a browser: `text/html` is preferred to JSON (a tie, e.g. `*/*`, means JSON)."""
    try:
        return request.accept.match("application/json", "text/html") == "text/html"
    except InvalidHeader:
        return False


def _answer(request: Request, asset: Asset, content_type: str, headers: dict[str, str]) -> HTTPResponse:
    headers = {**headers, "ETag": asset.etag}
    if asset.etag in (request.headers.get("if-none-match") or ""):
        return HTTPResponse(status=304, headers=headers)
    return HTTPResponse(asset.body, content_type=content_type, headers=headers)


async def page(request: Request) -> HTTPResponse:
    """The dashboard page (called by `GET /` when the client is a browser)."""
    files = await asyncio.to_thread(ASSETS.refresh)
    return _answer(request, files[PAGE], TYPES[PAGE], PAGE_HEADERS)


@bp.get("/ui/<name:str>", name="dashboard_asset")
@openapi.exclude()
async def asset(request: Request, name: str) -> HTTPResponse:
    if name == PAGE or name not in TYPES:
        return error_response(404, f"no dashboard file {name!r}")
    files = await asyncio.to_thread(ASSETS.refresh)
    current = files[name]
    # Only the current version may be cached for good: an old page asking for `?v=<old hash>`
    # gets today's file, which must not be stored under the old URL forever.
    cache = IMMUTABLE if request.args.get("v") == current.version else "no-cache"
    return _answer(
        request, current, TYPES[name], {"Cache-Control": cache, "X-Content-Type-Options": "nosniff"}
    )
