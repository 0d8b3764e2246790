"""Models: the old tool's start/stop/status endpoints, and the declarations themselves.

Start and stop edit conf.d/ (see `supervisor.control`): what they do survives a restart of
the supervisor.
"""

from __future__ import annotations

import asyncio

from sanic import Blueprint, Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response
from sanic_ext import openapi
from sanic_ext.extensions.openapi.definitions import Parameter

from ...control import UpstreamFailed
from ...spec import NAME_PATTERN
from ...states import State
from ..errors import parse_body, parse_bool, parse_int
from ..schemas import (
    Declaration,
    DeleteResult,
    ModelInstanceInfo,
    ModelStatusItem,
    ModelSummary,
    StartRequest,
    StopRequest,
)
from ..views import instance_info
from . import json_body, responses

bp = Blueprint("models", url_prefix="/api/v1")

TAG = "Model Management"
WAIT_DEFAULT = 600.0
NAME_SCHEMA = {"type": "string", "pattern": NAME_PATTERN, "maxLength": 64}
NAME = Parameter("name", NAME_SCHEMA, "path", required=True)
WAIT = [Parameter("wait", {"type": "boolean"}, "query", description="answer once RUNNING, failed, or timed out"),
        Parameter("timeout", {"type": "integer", "minimum": 1, "maximum": 3600}, "query",
                  description=f"seconds to wait (default {WAIT_DEFAULT:g})")]


def _status_response(request: Request, instances) -> HTTPResponse:
    body = request.app.ctx.status_cache.render(instances, request.app.ctx.gpus)
    return HTTPResponse(body, content_type="application/json")


@bp.post("/models/start")
@openapi.definition(
    summary="Start a model on a specific GPU",
    description="Edits the declared state: for a declared model, adds `gpu_id` to its file (idempotent); for a "
                "new one, writes conf.d/<model_name>.toml from `config` with `model_type` as its backend. With "
                "wait=true, answers once the instance is RUNNING (202), failed (502, with the reason) or the "
                "timeout passed (202, still STARTING).",
    tag=TAG,
    body=json_body(StartRequest),
    parameter=WAIT,
    response=responses({202: (ModelInstanceInfo, "accepted")}, 409, 422, 502),
)
async def start_model(request: Request) -> HTTPResponse:
    req = parse_body(request, StartRequest)
    wait = parse_bool(request.args.get("wait"), ["query", "wait"])
    timeout = parse_int(request.args.get("timeout", str(int(WAIT_DEFAULT))), ["query", "timeout"])
    controller = request.app.ctx.controller
    inst = await controller.start_on_gpu(req.model_name, req.model_type, req.gpu_id, req.config)
    if wait:
        try:
            await inst.wait_for(lambda i: i.state in (State.RUNNING, State.BACKOFF, State.FATAL, State.EXITED)
                                or (i.state == State.STOPPED and i.desired != "running"),
                                timeout=max(1, min(timeout, 3600)))
        except asyncio.TimeoutError:
            pass
        if inst.state in (State.BACKOFF, State.FATAL, State.EXITED):
            info = instance_info(inst, controller.instances_of(req.model_name))
            raise UpstreamFailed(f"instance {inst.id} failed to start: {info['reason']}", instance=info)
    return json_response(instance_info(inst, controller.instances_of(req.model_name)), status=202)


@bp.post("/models/stop")
@openapi.definition(
    summary="Stop a model on a specific GPU",
    description="Edits the declared state: removes that GPU's instance from the model's file (the file stays, "
                "so the model remains known) and answers once its process tree is gone.",
    tag=TAG,
    body=json_body(StopRequest),
    response=responses({200: (ModelInstanceInfo, "stopped")}, 404, 409, 422),
)
async def stop_model(request: Request) -> HTTPResponse:
    req = parse_body(request, StopRequest)
    controller = request.app.ctx.controller
    inst = await controller.stop_on_gpu(req.model_name, req.model_type, req.gpu_id, req.instance_id)
    remaining = controller.instances_of(req.model_name)
    info = instance_info(inst, remaining)
    info["total_instances"] = len(remaining)
    return json_response(info)


@bp.get("/models/status")
@openapi.definition(summary="Get status of all model instances", tag=TAG,
                    response=responses({200: ([ModelStatusItem], "one item per instance")}))
async def all_status(request: Request) -> HTTPResponse:
    engine = request.app.ctx.engine
    return _status_response(request, [engine.instances[i] for i in sorted(engine.instances)])


@bp.get("/models/status/<model_name:str>")
@openapi.definition(summary="Get status of a specific model", tag=TAG,
                    parameter=[Parameter("model_name", NAME_SCHEMA, "path", required=True)],
                    response=responses({200: ([ModelStatusItem], "one item per instance")}, 404, 422))
async def model_status(request: Request, model_name: str) -> HTTPResponse:
    controller = request.app.ctx.controller
    controller.model(model_name)
    return _status_response(request, controller.instances_of(model_name))


@bp.get("/models/supported")
@openapi.definition(summary="Get list of supported models and their backends", tag=TAG,
                    response=responses({200: ({"type": "object", "additionalProperties": {"type": "string"}},
                                               "model name -> backend, for every declared model")}))
async def supported(request: Request) -> HTTPResponse:
    models = request.app.ctx.engine.catalog.models
    return json_response({name: models[name].decl.backend for name in sorted(models)})


@bp.get("/models")
@openapi.definition(summary="Every declared model: its file, declaration, instances and errors", tag="Declarations",
                    response=responses({200: ([ModelSummary], "declared models")}))
async def list_models(request: Request) -> HTTPResponse:
    engine = request.app.ctx.engine
    out = []
    for name in sorted(engine.catalog.models):
        spec = engine.catalog.models[name]
        file = engine.catalog.owners[name]
        out.append({
            "name": name, "backend": spec.decl.backend, "file": file, "enabled": spec.decl.enabled,
            "description": spec.decl.description,
            "instances": sorted(i.id for i in engine.model_instances(name)),
            "declaration": spec.raw,
            "effective": spec.effective_document(),
            "errors": [e.as_dict() for e in engine.catalog.errors.get(file, [])],
        })
    return json_response(out)


@bp.get("/models/<name:str>")
@openapi.definition(summary="A model's declaration, as written in its file", tag="Declarations",
                    parameter=[NAME], response=responses({200: (Declaration, "the declaration")}, 404, 422))
async def get_model(request: Request, name: str) -> HTTPResponse:
    return json_response(request.app.ctx.controller.model(name).raw)


@bp.put("/models/<name:str>")
@openapi.definition(
    summary="Create or replace a model's declaration",
    description="Validated exactly like a file in conf.d/ (422 names the bad key), checked against the other "
                "declarations (409 names the occupant of a port), written atomically and applied at once. "
                "Only the values that differ change in the file: its comments, layout and key order stay.",
    tag="Declarations", parameter=[NAME], body=json_body(Declaration),
    response=responses({200: (Declaration, "replaced"), 201: (Declaration, "created")}, 409, 422),
)
async def put_model(request: Request, name: str) -> HTTPResponse:
    controller = request.app.ctx.controller
    controller.check_name(name, ["path", "name"])
    document = parse_body(request, Declaration).model_dump(exclude_none=True)
    spec, created = await controller.put(name, document)
    return json_response(spec.raw, status=201 if created else 200)


@bp.delete("/models/<name:str>")
@openapi.definition(summary="Delete a model's declaration file; answers once its instances are stopped",
                    tag="Declarations", parameter=[NAME], response=responses({200: (DeleteResult, "deleted")}, 404, 409, 422))
async def delete_model(request: Request, name: str) -> HTTPResponse:
    controller = request.app.ctx.controller
    file = str(controller.path_for(controller.model(name).name))
    stopped = await controller.delete(name)
    return json_response({"name": name, "file": file, "stopped": stopped})


@bp.post("/models/<name:str>/restart")
@openapi.definition(summary="Restart every instance of a model (also leaves FATAL)", tag=TAG, parameter=[NAME],
                    response=responses({202: ([ModelInstanceInfo], "restarting")}, 404, 422))
async def restart_model(request: Request, name: str) -> HTTPResponse:
    controller = request.app.ctx.controller
    instances = controller.restart(name)
    return json_response([instance_info(i, instances) for i in instances], status=202)


@bp.post("/models/<name:str>/enable")
@openapi.definition(summary="Set enabled = true in the declaration and start every instance (also leaves FATAL)",
                    tag=TAG, parameter=[NAME], response=responses({202: ([ModelInstanceInfo], "starting")}, 404, 409, 422))
async def enable_model(request: Request, name: str) -> HTTPResponse:
    controller = request.app.ctx.controller
    instances = await controller.set_enabled(name, True)
    return json_response([instance_info(i, instances) for i in instances], status=202)


@bp.post("/models/<name:str>/disable")
@openapi.definition(summary="Set enabled = false in the declaration; answers once every instance is stopped",
                    tag=TAG, parameter=[NAME], response=responses({200: ([ModelInstanceInfo], "stopped")}, 404, 409, 422))
async def disable_model(request: Request, name: str) -> HTTPResponse:
    controller = request.app.ctx.controller
    instances = await controller.set_enabled(name, False)
    return json_response([instance_info(i, instances) for i in instances])
