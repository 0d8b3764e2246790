"""Route helpers shared by the blueprints: OpenAPI parameter and response declarations."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from sanic_ext.extensions.openapi import definitions
from sanic_ext.extensions.openapi.definitions import Response
from sanic_ext.extensions.openapi.types import Schema

from supervisor.api.schemas import ErrorBody, ValidationErrorBody, array_of, ref

#: What `openapi.definition(parameter=...)` takes as a list (sanic-ext's list type, invariant).
Parameters = list[dict[str, Any] | definitions.Parameter | str]

ERRORS: dict[int, tuple[type[BaseModel], str]] = {
    401: (ErrorBody, "missing or wrong bearer token"),
    403: (ErrorBody, "refused"),
    404: (ErrorBody, "not found"),
    409: (ErrorBody, "conflicts with the declared state"),
    422: (ValidationErrorBody, "invalid request (detail lists each bad field with its location)"),
    502: (ErrorBody, "the backend failed to start"),
    503: (ErrorBody, "not available now (e.g. the log is on a cluster node that cannot be reached)"),
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


class JsonSchema(Schema):
    """A JSON schema published exactly as written."""

    def __init__(self, schema: dict[str, Any]) -> None:
        super().__init__()
        self._schema = dict(schema)

    def serialize(self) -> dict[str, Any]:
        return dict(self._schema)


class Parameter(definitions.Parameter):
    """sanic-ext's Parameter, with a dict schema taken as a JSON schema.

    sanic-ext reads a plain dict as an object to describe, so `{"type": "integer"}` came out as
    `{"type": "object", "properties": {"type": {"default": "integer"}}}` and schema-driven
    clients sent the pid `type,integer` (issue 11).
    """

    def __init__(self, name: str, schema: Any = str, location: str = "query", **kwargs: Any) -> None:
        super().__init__(name, JsonSchema(schema) if isinstance(schema, dict) else schema, location, **kwargs)
