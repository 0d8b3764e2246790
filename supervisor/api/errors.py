"""Errors as JSON everywhere, in the shapes the old tool's (FastAPI) clients already parse.

Every error body has `detail`: a string, or for 422 a list of `{type, loc, msg}` whose `loc`
starts with where the bad value was ("body", "path", "query").
"""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sanic import Request, Sanic
from sanic.exceptions import SanicException
from sanic.response import JSONResponse
from sanic.response import json as json_response

from ..control import ControlError, Invalid

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


def error_response(status: int, detail: Any, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {"detail": detail, "status": status, **extra}
    return json_response(body, status=status, headers=headers)


def validation_items(exc: ValidationError, prefix: list[str | int]) -> list[dict[str, Any]]:
    return [{"type": e["type"], "loc": prefix + list(e["loc"]), "msg": e["msg"]}
            for e in exc.errors(include_url=False, include_context=False, include_input=False)]


def parse_body(request: Request, model: type[M]) -> M:
    """Validate the JSON body against `model`; 422 with `loc` ["body", ...] otherwise."""
    try:
        data = json.loads(request.body) if request.body else None
    except ValueError as exc:
        raise Invalid([{"type": "json_invalid", "loc": ["body"], "msg": f"JSON decode error: {exc}"}]) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Invalid(validation_items(exc, ["body"])) from None


def parse_int(value: str, loc: list[str | int]) -> int:
    try:
        return int(value)
    except ValueError:
        raise Invalid([{"type": "int_parsing", "loc": loc,
                        "msg": "Input should be a valid integer, unable to parse string as an integer"}]) from None


def parse_bool(value: str | None, loc: list[str | int]) -> bool:
    if value is None:
        return False
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise Invalid([{"type": "bool_parsing", "loc": loc, "msg": "Input should be a valid boolean"}])


def install(app: Sanic) -> None:
    @app.exception(ControlError)
    async def control_error(request: Request, exc: ControlError) -> JSONResponse:
        return error_response(exc.status, exc.detail, **exc.extra)

    @app.exception(SanicException)
    async def sanic_error(request: Request, exc: SanicException) -> JSONResponse:
        status = getattr(exc, "status_code", 500) or 500
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.path, exc)
        return error_response(status, str(exc) or exc.__class__.__name__, headers=getattr(exc, "headers", None))

    @app.exception(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, f"internal error: {type(exc).__name__}")
