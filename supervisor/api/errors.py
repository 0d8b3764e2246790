"""Errors as JSON everywhere, in the shapes the old tool's (FastAPI) clients already parse.

Every error body has `detail`: a string, or for 422 a list of `{type, loc, msg}` whose `loc`
starts with where the bad value was ("body", "path", "query").
"""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar, overload

from pydantic import BaseModel, ValidationError
from sanic import DefaultSanic, Request
from sanic.exceptions import SanicException
from sanic.response import JSONResponse
from sanic.response import json as json_response

from supervisor.api import guard
from supervisor.runtime.control import (
    Conflict,
    ControlError,
    Forbidden,
    Invalid,
    NotFound,
    StorageFailed,
    UpstreamFailed,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


def error_response(
    status: int, detail: Any, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {"detail": detail, "status": status, **extra}
    return json_response(body, status=status, headers=headers)


def validation_items(exc: ValidationError, prefix: list[str | int]) -> list[dict[str, Any]]:
    return [
        {"type": e["type"], "loc": prefix + list(e["loc"]), "msg": e["msg"]}
        for e in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


#: Deeper JSON is refused (422) before validation: nothing the API takes nests beyond a few
#: levels, and deep documents would recurse through pydantic and the TOML writer (issue 11).
MAX_JSON_DEPTH = 32

#: Methods probed for a 405's Allow header.
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def json_problem(value: Any, limit: int = MAX_JSON_DEPTH) -> dict[str, Any] | None:
    """A 422 item for a parsed JSON value nested deeper than `limit`, or holding a string that is
    not valid Unicode (a lone surrogate such as "\\udc00": JSON allows it, UTF-8 files cannot hold
    it); None if fine. Iterative, so no depth can make it recurse."""
    stack: list[tuple[Any, int, list[str | int]]] = [(value, 1, ["body"])]
    while stack:
        item, depth, loc = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return {
                    "type": "string_unicode",
                    "loc": loc,
                    "msg": "not valid Unicode (a lone surrogate escape)",
                }
            continue
        if isinstance(item, dict):
            children: Any = item.items()
        elif isinstance(item, list):
            children = enumerate(item)
        else:
            continue
        if depth > limit:
            return _too_deep_item()
        for key, child in children:
            if isinstance(key, str):
                stack.append((key, depth, loc))
            stack.append((child, depth + 1, [*loc, key]))
    return None


def _too_deep_item() -> dict[str, Any]:
    return {
        "type": "json_too_deep",
        "loc": ["body"],
        "msg": f"JSON nested more than {MAX_JSON_DEPTH} levels deep",
    }


def parse_body(request: Request, model: type[M]) -> M:
    """Validate the JSON body against `model`; 422 with `loc` ["body", ...] otherwise."""
    try:
        data = json.loads(request.body) if request.body else None
    except RecursionError:  # thousands of levels: the C decoder gives up before we can count
        raise Invalid([_too_deep_item()]) from None
    except ValueError as exc:
        raise Invalid(
            [{"type": "json_invalid", "loc": ["body"], "msg": f"JSON decode error: {exc}"}]
        ) from None
    problem = json_problem(data)
    if problem is not None:
        raise Invalid([problem])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Invalid(validation_items(exc, ["body"])) from None


@overload
def query(request: Request, name: str, default: str) -> str: ...


@overload
def query(request: Request, name: str, default: None = None) -> str | None: ...


def query(request: Request, name: str, default: str | None = None) -> str | None:
    """A query parameter's raw value; a blank one (`?seconds=`) is kept, so parsing refuses it
    (Sanic's `request.args` drops blanks, and the default then answered for a bad request)."""
    values = request.get_args(keep_blank_values=True).getlist(name)
    return values[0] if values else default


def parse_int(value: str, loc: list[str | int]) -> int:
    try:
        return int(value)
    except ValueError:
        raise Invalid(
            [
                {
                    "type": "int_parsing",
                    "loc": loc,
                    "msg": "Input should be a valid integer, unable to parse string as an integer",
                }
            ]
        ) from None


def parse_bool(value: str | None, loc: list[str | int]) -> bool:
    if value is None:
        return False
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise Invalid([{"type": "bool_parsing", "loc": loc, "msg": "Input should be a valid boolean"}])


def allowed_methods(request: Request) -> list[str]:
    router = request.app.router
    allowed = []
    for method in METHODS:
        try:
            router.get(request.path, method, request.headers.getone("host", None))
        except SanicException:
            continue
        allowed.append(method)
    return allowed


#: The HTTP status of each kind of refusal by the controller (anything else: 400).
CONTROL_STATUS: dict[type[ControlError], int] = {
    NotFound: 404,
    Conflict: 409,
    Forbidden: 403,
    Invalid: 422,
    UpstreamFailed: 502,
}


def control_status(exc: ControlError) -> int:
    if isinstance(exc, StorageFailed):
        return 507 if exc.full else 503  # 507 Insufficient Storage: room would fix it
    return next((code for kind, code in CONTROL_STATUS.items() if isinstance(exc, kind)), 400)


def install(app: DefaultSanic) -> None:
    @app.exception(ControlError)
    async def control_error(request: Request, exc: ControlError) -> JSONResponse:
        return error_response(control_status(exc), exc.detail, **exc.extra)

    @app.exception(SanicException)
    async def sanic_error(request: Request, exc: SanicException) -> JSONResponse:
        status = getattr(exc, "status_code", 500) or 500
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.path, exc)
        headers = dict(getattr(exc, "headers", None) or {})
        if status == 405 and "Allow" not in headers:
            # Sanic names the allowed methods only for paths with one route (RFC 9110 wants them always).
            headers["Allow"] = ", ".join(allowed_methods(request))
        if status == 413 and request.stream is not None:
            # Let Sanic read and discard the rest of the body, so the client, still sending, reads this
            # answer instead of a connection reset (see `guard`).
            request.stream.request_max_size = guard.DRAIN_LIMIT
        return error_response(status, str(exc) or exc.__class__.__name__, headers=headers or None)

    @app.exception(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.path, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}")
