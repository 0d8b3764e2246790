"""Models: the old tool's start/stop/status endpoints, and the declarations themselves.

Start and stop edit conf.d/ (see `supervisor.runtime.control`): what they do survives a restart of
the supervisor.
"""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response
from sanic_ext import openapi

from supervisor.api.errors import parse_body, parse_bool, parse_int, query
from supervisor.api.routes import Parameter, Parameters, json_body, responses
from supervisor.api.schemas import (
    Declaration,
    DeleteResult,
    ModelInstanceInfo,
    ModelStatusItem,
    ModelSummary,
    StartRequest,
    StopRequest,
)
from supervisor.api.views import instance_info
from supervisor.core.spec import NAME_PATTERN
from supervisor.runtime.control import FAILED_STATES, LAUNCH_WAIT, Invalid, UpstreamFailed, settle
from supervisor.runtime.instance import Instance

bp = Blueprint("models", url_prefix="/api/v1")

TAG = "Model Management"
WAIT_DEFAULT = 600.0
NAME_SCHEMA = {"type": "string", "pattern": NAME_PATTERN, "maxLength": 64}
NAME = Parameter("name", NAME_SCHEMA, "path", required=True)
WAIT: Parameters = [
    Parameter("wait", {"type": "boolean"}, "query", description="answer once RUNNING, failed, or timed out"),
    Parameter(
        "timeout",
        {"type": "integer", "minimum": 1, "maximum": 3600},
        "query",
        description=f"seconds to wait (default {WAIT_DEFAULT:g})",
    ),
]


def _wait_args(request: Request) -> tuple[bool, float]:
    wait = parse_bool(query(request, "wait"), ["query", "wait"])
    timeout = parse_int(query(request, "timeout", str(int(WAIT_DEFAULT))), ["query", "timeout"])
    if not 1 <= timeout <= 3600:  # the published limits (a clamp would accept what the schema refuses)
        raise Invalid(
            [{"type": "range", "loc": ["query", "timeout"], "msg": "timeout must be 1-3600 seconds"}]
        )
    return wait, float(timeout)


async def _settled(request: Request, instances: list[Instance], old_pids: dict[str, int | None]) -> None:
    """Answer with the state after the action took effect: at least STARTING with the new
    pid; with wait=true, RUNNING or failed (502 naming the reason) or the timeout passed."""
    wait, timeout = _wait_args(request)
    await settle(instances, old_pids, wait, timeout if wait else LAUNCH_WAIT)
    if wait:
        failed = [i for i in instances if i.state in FAILED_STATES]
        if failed:
            infos = [instance_info(i, instances) for i in failed]
            raise UpstreamFailed(
                "; ".join(
                    f"instance {info['instance_id']} failed to start: {info['reason']}" for info in infos
                ),
                instance=infos[0],
                instances=infos,
            )


def _status_response(request: Request, instances: list[Instance]) -> HTTPResponse:
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
    _wait_args(request)  # a bad wait/timeout is a 422 before anything is edited
    controller = request.app.ctx.controller
    inst = await controller.start_on_gpu(req.model_name, req.model_type, req.gpu_id, req.config)
    await _settled(request, [inst], {})
    return json_response(instance_info(inst, controller.instances_of(req.model_name)), status=202)


@bp.post("/models/stop")
@openapi.definition(
    summary="Stop a model on a specific GPU",
    description="Edits the declared state: removes that GPU's instance from the model's file (the file stays, "
    "so the model remains known) and answers once its process tree is gone. The instance is named "
    "by `gpu_id`, by `instance_id` (then `model_name` and `gpu_id` may be left out), or, for a "
    "CPU-only model, by `model_name` alone: its stop writes `enabled = false`.",
    tag=TAG,
    body=json_body(StopRequest),
    response=responses({200: (ModelInstanceInfo, "stopped")}, 404, 409, 422),
)
async def stop_model(request: Request) -> HTTPResponse:
    req = parse_body(request, StopRequest)
    controller = request.app.ctx.controller
    inst = await controller.stop_on_gpu(req.model_name, req.model_type, req.gpu_id, req.instance_id)
    # A stopped CPU-only instance stays known (its model is disabled): not one of the remaining.
    remaining = [i for i in controller.instances_of(inst.spec.model) if i is not inst]
    info = instance_info(inst, remaining)
    info["total_instances"] = len(remaining)
    return json_response(info)


@bp.get("/models/status")
@openapi.definition(
    summary="Get status of all model instances",
    tag=TAG,
    response=responses({200: ([ModelStatusItem], "one item per instance")}),
)
async def all_status(request: Request) -> HTTPResponse:
    engine = request.app.ctx.engine
    return _status_response(request, [engine.instances[i] for i in sorted(engine.instances)])


@bp.get("/models/status/<model_name:str>")
@openapi.definition(
    summary="Get status of a specific model",
    tag=TAG,
    parameter=[Parameter("model_name", NAME_SCHEMA, "path", required=True)],
    response=responses({200: ([ModelStatusItem], "one item per instance")}, 404, 422),
)
async def model_status(request: Request, model_name: str) -> HTTPResponse:
    controller = request.app.ctx.controller
    controller.model(model_name)
    return _status_response(request, controller.instances_of(model_name))


@bp.get("/models/supported")
@openapi.definition(
    summary="Get list of supported models and their backends",
    tag=TAG,
    response=responses(
        {
            200: (
                {"type": "object", "additionalProperties": {"type": "string"}},
                "model name -> backend, for every declared model",
            )
        }
    ),
)
async def supported(request: Request) -> HTTPResponse:
    models = request.app.ctx.engine.catalog.models
    return json_response({name: models[name].decl.backend for name in sorted(models)})


@bp.get("/models")
@openapi.definition(
    summary="Every declared model: its file, declaration, instances and errors",
    tag="Declarations",
    response=responses({200: ([ModelSummary], "declared models")}),
)
async def list_models(request: Request) -> HTTPResponse:
    engine = request.app.ctx.engine
    out = []
    for name in sorted(engine.catalog.models):
        spec = engine.catalog.models[name]
        file = engine.catalog.owners[name]
        out.append(
            {
                "name": name,
                "backend": spec.decl.backend,
                "file": file,
                "enabled": spec.decl.enabled,
                "description": spec.decl.description,
                "instances": sorted(i.id for i in engine.model_instances(name)),
                "declaration": spec.raw,
                "effective": spec.effective_document(),
                "errors": [e.as_dict() for e in engine.catalog.errors.get(file, [])],
            }
        )
    return json_response(out)


@bp.get("/models/<name:str>")
@openapi.definition(
    summary="A model's declaration, as written in its file",
    tag="Declarations",
    parameter=[NAME],
    response=responses({200: (Declaration, "the declaration")}, 404, 422),
)
async def get_model(request: Request, name: str) -> HTTPResponse:
    return json_response(request.app.ctx.controller.model(name).raw)


@bp.put("/models/<name:str>")
@openapi.definition(
    summary="Create or replace a model's declaration",
    description="Validated exactly like a file in conf.d/ (422 names the bad key), checked against the other "
    "declarations (409 names the occupant of a port), written atomically and applied at once. "
    "Only the values that differ change in the file: its comments, layout and key order stay.",
    tag="Declarations",
    parameter=[NAME],
    body=json_body(Declaration),
    response=responses({200: (Declaration, "replaced"), 201: (Declaration, "created")}, 409, 422),
)
async def put_model(request: Request, name: str) -> HTTPResponse:
    controller = request.app.ctx.controller
    controller.check_name(name, ["path", "name"])
    document = parse_body(request, Declaration).model_dump(exclude_none=True)
    spec, created = await controller.put(name, document)
    return json_response(spec.raw, status=201 if created else 200)


@bp.delete("/models/<name:str>")
@openapi.definition(
    summary="Delete a model's declaration file; answers once its instances are stopped",
    tag="Declarations",
    parameter=[NAME],
    response=responses({200: (DeleteResult, "deleted")}, 404, 409, 422),
)
async def delete_model(request: Request, name: str) -> HTTPResponse:
    controller = request.app.ctx.controller
    file = str(controller.path_for(controller.model(name).name))
    stopped = await controller.delete(name)
    return json_response({"name": name, "file": file, "stopped": stopped})


@bp.post("/models/<name:str>/restart")
@openapi.definition(
    summary="Restart every instance of a model (also leaves FATAL)",
    description="Answers once each instance runs a new process (STARTING with its new pid); with "
    "wait=true, once RUNNING (202), failed (502) or the timeout passed.",
    tag=TAG,
    parameter=[NAME, *WAIT],
    response=responses({202: ([ModelInstanceInfo], "restarting")}, 404, 422, 502),
)
async def restart_model(request: Request, name: str) -> HTTPResponse:
    _wait_args(request)
    controller = request.app.ctx.controller
    old_pids = {i.id: i.pid for i in controller.instances_of(controller.model(name).name)}
    instances = await controller.restart(name)
    await _settled(request, instances, old_pids)
    return json_response([instance_info(i, instances) for i in instances], status=202)


@bp.post("/models/<name:str>/enable")
@openapi.definition(
    summary="Set enabled = true in the declaration and start every instance (also leaves FATAL)",
    description="Answers once each instance is at least STARTING with a pid; with wait=true, once "
    "RUNNING (202), failed (502) or the timeout passed.",
    tag=TAG,
    parameter=[NAME, *WAIT],
    response=responses({202: ([ModelInstanceInfo], "starting")}, 404, 409, 422, 502),
)
async def enable_model(request: Request, name: str) -> HTTPResponse:
    _wait_args(request)
    controller = request.app.ctx.controller
    instances = await controller.set_enabled(name, True)
    await _settled(request, instances, {})
    return json_response([instance_info(i, instances) for i in instances], status=202)


ALL_RESULT = {
    "type": "object",
    "required": ["instances", "failed"],
    "properties": {
        "instances": {"type": "array", "items": {"$ref": "#/components/schemas/ModelInstanceInfo"}},
        "failed": {
            "type": "array",
            "description": "models whose file could not be edited, and why",
            "items": {
                "type": "object",
                "properties": {"model": {"type": "string"}, "error": {"type": "string"}},
            },
        },
    },
}


@bp.post("/models/enable")
@openapi.definition(
    summary="Start every declared model (supervisorctl's `start all`)",
    description="Sets enabled = true in every declaration that has enabled = false (the files are edited, as for "
    "one model) and starts every instance; answers once each is at least STARTING with a pid, with "
    "wait=true once each is RUNNING or failed (502) or the timeout passed.",
    tag=TAG,
    parameter=WAIT,
    response=responses({202: (ALL_RESULT, "starting")}, 422, 502),
)
async def enable_all(request: Request) -> HTTPResponse:
    _wait_args(request)
    instances, failed = await request.app.ctx.controller.set_enabled_all(True)
    await _settled(request, instances, {})
    return json_response(
        {"instances": [instance_info(i, instances) for i in instances], "failed": failed}, status=202
    )


@bp.post("/models/disable")
@openapi.definition(
    summary="Stop every declared model (supervisorctl's `stop all`)",
    description="Sets enabled = false in every declaration (the files are edited, as for one model); answers "
    "once every instance is stopped.",
    tag=TAG,
    response=responses({200: (ALL_RESULT, "stopped")}),
)
async def disable_all(request: Request) -> HTTPResponse:
    instances, failed = await request.app.ctx.controller.set_enabled_all(False)
    return json_response({"instances": [instance_info(i, instances) for i in instances], "failed": failed})


@bp.post("/models/<name:str>/disable")
@openapi.definition(
    summary="Set enabled = false in the declaration; answers once every instance is stopped",
    tag=TAG,
    parameter=[NAME],
    response=responses({200: ([ModelInstanceInfo], "stopped")}, 404, 409, 422),
)
async def disable_model(request: Request, name: str) -> HTTPResponse:
    controller = request.app.ctx.controller
    instances = await controller.set_enabled(name, False)
    return json_response([instance_info(i, instances) for i in instances])
