"""GET /api/v1/gpus: the last GPU sample, never a blocking NVML call; and the recent history
the dashboard plots (GPU samples, instance state changes), from memory."""

from __future__ import annotations

import time

from sanic import Blueprint, Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response
from sanic_ext import openapi

from supervisor.adapters.gpu.history import WINDOW_SECONDS
from supervisor.api.errors import parse_int, query
from supervisor.api.routes import Parameter, responses
from supervisor.api.schemas import GPUInfo, StrayProcess

bp = Blueprint("gpus", url_prefix="/api/v1")


@bp.get("/gpus")
@openapi.definition(
    summary="Get status of all GPUs",
    description="The latest sample (taken in the background every `gpu_sample_interval`). Each process names "
    "the instance that owns it, or null for a stray. Without a driver: an empty list; the reason is "
    "in GET /healthz.",
    tag="GPU and processes",
    response=responses({200: ([GPUInfo], "one entry per GPU")}),
)
async def list_gpus(request: Request) -> HTTPResponse:
    return json_response(request.app.ctx.gpus.gpu_infos())


@bp.get("/gpus/strays")
@openapi.definition(
    summary="GPU processes that belong to no supervised instance",
    description="With the policy (report or kill) that applies on their GPU and what was done about them.",
    tag="GPU and processes",
    response=responses({200: ([StrayProcess], "strays, by GPU")}),
)
async def list_strays(request: Request) -> HTTPResponse:
    return json_response(request.app.ctx.gpus.strays())


# No minimum/maximum: values outside 1-WINDOW_SECONDS are clamped, not refused (so any integer is valid).
SECONDS = Parameter(
    "seconds",
    {"type": "integer"},
    "query",
    description=f"how far back, clamped to 1-{WINDOW_SECONDS:g} (default {WINDOW_SECONDS:g})",
)
GPU_HISTORY = {
    "type": "object",
    "properties": {
        "window_seconds": {"type": "number"},
        "now": {"type": "number", "description": "the server's clock, UNIX seconds"},
        "gpus": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "memory_total": {"type": ["integer", "null"]},
                    "t": {
                        "type": "array",
                        "items": {"type": "number"},
                        "description": "sample times, UNIX seconds",
                    },
                    "memory_used": {
                        "type": "array",
                        "items": {"type": ["integer", "null"]},
                        "description": "MiB",
                    },
                    "utilization": {
                        "type": "array",
                        "items": {"type": ["number", "null"]},
                        "description": "percent",
                    },
                    "power_draw": {
                        "type": "array",
                        "items": {"type": ["number", "null"]},
                        "description": "watts",
                    },
                },
            },
        },
    },
}
INSTANCE_HISTORY = {
    "type": "object",
    "properties": {
        "window_seconds": {"type": "number"},
        "now": {"type": "number"},
        "instances": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "instance_id": {"type": "string"},
                    "state": {"type": "string", "description": "the state at the start of the window"},
                    "transitions": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "t": {"type": "number"},
                                "from": {"type": "string"},
                                "to": {"type": "string"},
                                "reason": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
}


def _seconds(request: Request) -> float:
    seconds = parse_int(query(request, "seconds", str(int(WINDOW_SECONDS))), ["query", "seconds"])
    return float(max(1, min(seconds, int(WINDOW_SECONDS))))


@bp.get("/gpus/history")
@openapi.definition(
    summary="Each GPU's memory used, utilisation and power over the last minutes",
    description="From the sampler's bounded in-memory history (15 minutes); empty without a GPU source. Live "
    "updates arrive as `gpu` events on GET /api/v1/events. In cluster mode every GPU has `node` "
    "(null: this machine), and each node's samples arrive as `gpu` events with its `node`.",
    tag="GPU and processes",
    parameter=[SECONDS],
    response=responses({200: (GPU_HISTORY, "columns per GPU")}, 422),
)
async def gpu_history(request: Request) -> HTTPResponse:
    return json_response(request.app.ctx.gpus.history_dict(time.time(), _seconds(request)))


@bp.get("/instances/history")
@openapi.definition(
    summary="Each instance's state changes over the last minutes (restarts and FATALs at a glance)",
    description="The state each instance was in when the window began, then every transition in it (from the "
    "instance's own bounded history). Live updates arrive as `transition` events.",
    tag="Instances",
    parameter=[SECONDS],
    response=responses({200: (INSTANCE_HISTORY, "per instance")}, 422),
)
async def instance_history(request: Request) -> HTTPResponse:
    now = time.time()
    since = now - _seconds(request)
    out = []
    engine = request.app.ctx.engine
    for iid in sorted(engine.instances):
        inst = engine.instances[iid]
        history = list(inst.history)
        before = [t for t in history if t.at.timestamp() < since]
        state = (
            before[-1].to_state.value
            if before
            else (history[0].from_state.value if history else inst.state.value)
        )
        out.append(
            {
                "instance_id": iid,
                "state": state,
                "transitions": [
                    {
                        "t": round(t.at.timestamp(), 3),
                        "from": t.from_state.value,
                        "to": t.to_state.value,
                        "reason": t.reason,
                    }
                    for t in history
                    if t.at.timestamp() >= since
                ],
            }
        )
    return json_response({"window_seconds": now - since, "now": round(now, 3), "instances": out})
