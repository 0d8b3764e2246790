"""Swagger UI at /docs, rendered from assets served by us, so it works with no internet.

sanic-ext builds the specification (/docs/openapi.json) from the routes' definitions and our
pydantic components, and serves the UI page; its stock page loads JavaScript from CDNs and
renders blank offline, so it is given our page (`swagger.html`), which loads the Swagger UI
copy shipped in the swagger-ui-bundle package from /docs/assets/. sanic-ext's OAuth2 redirect
page would be fetched from a CDN at request time: we answer it from the bundle instead.
"""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from sanic import DefaultSanic, Request
from sanic.response import HTTPResponse, file
from sanic_ext import openapi

from supervisor.api.errors import error_response

ASSETS = Path(swagger_ui_bundle.swagger_ui_path)
ALLOWED = {
    "swagger-ui.css",
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "favicon-32x32.png",
    "favicon-16x16.png",
    "index.css",
}


PAGE = Path(__file__).with_name("swagger.html")


def configure(app: DefaultSanic) -> None:
    app.config.OAS_UI_DEFAULT = "swagger"
    app.config.OAS_UI_REDOC = False
    app.config.OAS_PATH_TO_SWAGGER_HTML = str(PAGE)
    app.config.OAS_UI_SWAGGER_HTML_TITLE = "model-supervisor API"


def install(app: DefaultSanic) -> None:
    # app.middleware("request", ...) is app.on_request(priority=...) with a decorator's type.
    @app.middleware("request", priority=100)
    async def local_oauth2_redirect(request: Request) -> HTTPResponse | None:
        if request.path == "/docs" + app.config.OAS_UI_SWAGGER_OAUTH2_REDIRECT:
            return await file(ASSETS / "oauth2-redirect.html")
        return None

    @app.get("/docs/assets/<name:str>", name="docs_asset")
    @openapi.exclude()
    async def docs_asset(request: Request, name: str) -> HTTPResponse:
        if name not in ALLOWED:
            return error_response(404, f"no asset {name!r}")
        return await file(ASSETS / name, headers={"Cache-Control": "public, max-age=86400"})
