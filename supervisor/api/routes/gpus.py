"""GET /api/v1/gpus: the last GPU sample, never a blocking NVML call."""

from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response
from sanic_ext import openapi

from ..schemas import GPUInfo, StrayProcess
from . import responses

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
