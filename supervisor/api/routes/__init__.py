"""Route helpers shared by the blueprints: OpenAPI response declarations."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from sanic_ext.extensions.openapi.definitions import Response

from ..schemas import ErrorBody, ValidationErrorBody, array_of, ref

ERRORS: dict[int, tuple[type[BaseModel], str]] = {
    401: (ErrorBody, "missing or wrong bearer token"),
    403: (ErrorBody, "refused"),
    404: (ErrorBody, "not found"),
    409: (ErrorBody, "conflicts with the declared state"),
    422: (ValidationErrorBody, "invalid request (detail lists each bad field with its location)"),
    502: (ErrorBody, "the backend failed to start"),
}


def responses(ok: dict[int, tuple[Any, str]], *error_codes: int) -> list[Response]:
    """`ok` maps status -> (body, description); body: a model, [model], a JSON schema dict,
    (media type, schema) or None for text/plain."""
    out = []
    for status, (body, description) in ok.items():
        if body is None:
            out.append(Response({"text/plain": {"type": "string"}}, status=status, description=description))
            continue
        if isinstance(body, tuple):  # (media type, schema)
            out.append(Response({body[0]: body[1]}, status=status, description=description))
            continue
        if isinstance(body, list):
            schema = array_of(body[0])
        elif isinstance(body, dict):
            schema = body
        else:
            schema = ref(body)
        out.append(Response({"application/json": schema}, status=status, description=description))
    for code in (401, *error_codes):
        model, description = ERRORS[code]
        out.append(Response({"application/json": ref(model)}, status=code, description=description))
    return out


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": ref(model)}
