"""Health, configuration errors, reload, the event stream and instance logs."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from typing import Any
from urllib.parse import unquote

from sanic import Blueprint, DefaultSanic, Request
from sanic.response import HTTPResponse, text
from sanic.response import json as json_response
from sanic_ext import openapi

from supervisor import __version__
from supervisor.adapters.logfiles import LogFile, LogUnavailable
from supervisor.api.errors import error_response, parse_bool, parse_int, query
from supervisor.api.routes import Parameter, dashboard, responses
from supervisor.api.schemas import ConfigErrorItem, Health, ReloadResult, Welcome
from supervisor.core.events import Event
from supervisor.runtime.control import NotFound
from supervisor.runtime.metrics import CONTENT_TYPE

bp = Blueprint("system", url_prefix="/api/v1")

#: `demo@cpu`, `llama@gpu0-1`; in cluster mode `llama@gpu-a:gpu1` (a node label, spec.NODE_LABEL_RE).
INSTANCE_ID = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}@([a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?:)?(cpu|gpu\d+(-\d+)*)$"
)
HEARTBEAT = 15.0
FOLLOW_POLL = 0.2  # a followed log is checked for growth this often


def health_body(app: DefaultSanic) -> dict[str, Any]:
    engine = app.ctx.engine
    states = Counter(inst.state.value for inst in engine.instances.values())
    snapshot = app.ctx.gpus.snapshot()
    return {
        "status": "ok",
        "version": __version__,
        "instances": dict(states),
        "config_errors": len(engine.config_errors()),
        "gpu_source": snapshot.source,
        "gpu_count": len(snapshot.devices),
        "gpu_reason": snapshot.reason,
        "gpu_sample_ms": round(snapshot.sample_seconds * 1000, 3)
        if snapshot.sample_seconds is not None
        else None,
        "runners": {name: runner.unavailable_reason() for name, runner in engine.runners.items()},
        # e.g. "GPU 5 is not known: no GPU source": instances that run on GPUs nobody can check
        "warnings": app.ctx.gpus.unknown_gpu_warnings(),
        # How a run's processes are kept together: "cgroup", "mark+subreaper" or "mark".
        "containment": engine.containment(),
        "containment_note": engine.process_runner.containment_note,
        # Cluster mode: every node its agent reports on (label, host, GPU source, errors).
        **({"nodes": app.ctx.gpus.cluster_nodes.nodes()} if app.ctx.gpus.cluster_nodes is not None else {}),
    }


async def health(app: DefaultSanic) -> dict[str, Any]:
    """`health_body` plus what needs I/O: does the state dir take writes (issue 11: with it on
    a full disk /healthz said "ok"), and did the last reload of conf.d/ work. Degraded is
    still 200: the supervisor is alive and says what is wrong; it recovers by itself."""
    body = health_body(app)
    engine = app.ctx.engine
    reason = await app.ctx.state_dir_health.check()
    body["state_dir"] = {"path": str(engine.settings.state_dir), "writable": reason is None, "reason": reason}
    degraded = [f"state dir: {reason}"] if reason else []
    failure = getattr(engine.watcher, "failure", None)
    if failure:
        degraded.append(f"reload of conf.d failed: {failure}")
    if degraded:
        body["status"] = "degraded"
        body["degraded"] = degraded
    return body


def install_root(app: DefaultSanic) -> None:
    @app.get("/", name="root")
    @openapi.definition(
        summary="Health check (the old tool's welcome answer)",
        tag="Health Check",
        response=responses({200: (Welcome, "ok")}),
    )
    async def root(request: Request) -> HTTPResponse:
        if dashboard.wants_html(request):  # a browser gets the dashboard; API clients the old JSON
            return await dashboard.page(request)
        return json_response(
            {"status": "ok", "message": "Welcome to the Model Inference Client API"},
            headers={"Vary": "Accept"},
        )

    @app.get("/metrics", name="metrics")
    @openapi.definition(
        summary="Prometheus metrics: instances, GPUs, the supervisor",
        tag="Health Check",
        response=responses({200: (None, "Prometheus text format")}),
    )
    async def metrics(request: Request) -> HTTPResponse:
        body = request.app.ctx.metrics.render()
        return HTTPResponse(body, content_type=CONTENT_TYPE)

    @app.get("/healthz", name="healthz")
    @openapi.definition(
        summary="Liveness of the supervisor, counts by state, GPU source and its reason",
        tag="Health Check",
        response=responses({200: (Health, "ok")}),
    )
    async def healthz(request: Request) -> HTTPResponse:
        return json_response(await health(request.app))


@bp.get("/healthz")
@openapi.definition(summary="Same as /healthz", tag="Health Check", response=responses({200: (Health, "ok")}))
async def healthz_v1(request: Request) -> HTTPResponse:
    return json_response(await health(request.app))


@bp.get("/config/errors")
@openapi.definition(
    summary="Declaration files that do not load, and why",
    tag="Configuration",
    response=responses({200: ([ConfigErrorItem], "every error of every broken file")}),
)
async def config_errors(request: Request) -> HTTPResponse:
    return json_response(request.app.ctx.engine.config_errors())


@bp.post("/reload")
@openapi.definition(
    summary="Re-read conf.d/ now (the same path as SIGHUP; the watcher does this by itself)",
    description="With wait=true, answers (200) after this very reload, with what it changed "
    "(`changes`; empty lists when the files were already in force) and the number of "
    "configuration errors; otherwise 202 at once.",
    tag="Configuration",
    parameter=[
        Parameter(
            "wait",
            {"type": "boolean"},
            "query",
            description="answer once this reload is done, with its changes",
        )
    ],
    response=responses(
        {202: (ReloadResult, "re-read requested"), 200: (ReloadResult, "re-read (wait=true)")}, 422
    ),
)
async def reload(request: Request) -> HTTPResponse:
    engine = request.app.ctx.engine
    if not parse_bool(query(request, "wait"), ["query", "wait"]):
        engine.request_reload("API reload")
        return json_response({"requested": True, "last_reload": engine.last_reload}, status=202)
    steps = await engine.reload("API reload")  # serialised with the watcher's reloads
    changes = {
        "added": steps.add,
        "removed": steps.remove,
        "replaced": steps.replace,
        "updated": steps.update,
    }
    return json_response(
        {
            "requested": True,
            "changes": changes,
            "config_errors": len(engine.config_errors()),
            "last_reload": engine.last_reload,
        }
    )


@bp.get("/instances/<instance_id:str>/logs")
@openapi.definition(
    summary="The last lines of an instance's log file",
    tag="Instances",
    parameter=[
        Parameter(
            "instance_id",
            {"type": "string", "pattern": INSTANCE_ID.pattern, "maxLength": 80},
            "path",
            required=True,
            description="e.g. demo@cpu or demo@gpu0-1",
        ),
        Parameter(
            "tail",
            {"type": "integer", "minimum": 1, "maximum": 100000},
            "query",
            description="how many lines (default 100)",
        ),
        Parameter(
            "follow",
            {"type": "boolean"},
            "query",
            description="keep streaming what is appended (across rotation) until the client leaves",
        ),
    ],
    response=responses({200: (None, "log lines, oldest first")}, 404, 422, 503),
)
async def instance_logs(request: Request, instance_id: str) -> HTTPResponse | None:
    instance_id = unquote(instance_id)  # "demo%40cpu" from clients that encode the "@"
    tail = parse_int(query(request, "tail", "100"), ["query", "tail"])
    follow = parse_bool(query(request, "follow"), ["query", "follow"])
    if not 1 <= tail <= 100_000:
        return error_response(
            422, [{"type": "less_than_equal", "loc": ["query", "tail"], "msg": "tail must be 1-100000"}]
        )
    engine = request.app.ctx.engine
    if not INSTANCE_ID.match(instance_id):
        raise NotFound(f"no instance {instance_id!r}")
    inst = engine.instances.get(instance_id) or engine.removing.get(instance_id)
    log_file = inst.log_file if inst else LogFile(engine.settings.state_dir / "logs" / f"{instance_id}.log")
    if inst is None and not log_file.path.exists():
        raise NotFound(f"no instance {instance_id!r}")
    reader = engine.log_reader(instance_id, log_file)  # on a cluster node: read by its agent
    try:
        if not follow:
            lines = await reader.tail(tail)
            return text("".join(line + "\n" for line in lines))
        offset = await reader.size()
        lines = await reader.tail(tail)
    except LogUnavailable as exc:
        return error_response(503, str(exc))
    await _follow(request, reader, offset, lines)
    return None


async def _follow(request: Request, reader: Any, offset: int, lines: list[str]) -> None:
    closing: asyncio.Event = request.app.ctx.closing
    response = await request.respond(
        content_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-cache"}
    )
    await response.send("".join(line + "\n" for line in lines))
    inode = None
    while not closing.is_set() and not request.transport.is_closing():
        try:
            data, new_offset, new_inode = await reader.read_from(offset)
            if inode is not None and new_inode != inode:  # replaced (rename rotation): start over
                data, new_offset, new_inode = await reader.read_from(0)
        except LogUnavailable as exc:
            await response.send(f"[model-supervisor] {exc}; retrying\n")
            await asyncio.sleep(1.0)
            continue
        inode, offset = new_inode, new_offset
        if data:
            await response.send(data)
            continue
        try:
            await asyncio.wait_for(closing.wait(), FOLLOW_POLL)
        except TimeoutError:
            pass
    await response.eof()


@bp.get("/events")
@openapi.definition(
    summary="Server-sent events: state transitions, configuration changes (resume with Last-Event-ID)",
    tag="Events",
    parameter=[
        Parameter(
            "last_event_id",
            {"type": "integer", "minimum": 0},
            "query",
            description="resume after this event id (the Last-Event-ID header also works)",
        )
    ],
    response=responses({200: (("text/event-stream", {"type": "string"}), "one event per message")}, 422),
)
async def events(request: Request) -> HTTPResponse | None:
    raw = request.headers.get("last-event-id") or query(request, "last_event_id")
    last_id = parse_int(raw, ["query", "last_event_id"]) if raw else None
    bus = request.app.ctx.engine.bus
    closing: asyncio.Event = request.app.ctx.closing
    response = await request.respond(
        content_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.send(": connected\nretry: 1000\n\n")
    sub = bus.open(last_id)
    stop = asyncio.ensure_future(closing.wait())
    nxt: asyncio.Future[Event] | None = None
    try:
        while not request.transport.is_closing():
            nxt = asyncio.ensure_future(sub.get())
            done, _ = await asyncio.wait({nxt, stop}, timeout=HEARTBEAT, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                if stop in done:
                    break
                await response.send(": keep-alive\n\n")
                continue
            event = nxt.result()
            await response.send(
                f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.as_dict())}\n\n"
            )
    finally:
        # A client that leaves cancels this handler mid-wait: cancel the pending get too, or
        # asyncio logs "Task was destroyed but it is pending" for it (issue 13).
        if nxt is not None:
            nxt.cancel()
        stop.cancel()
        sub.close()
    await response.eof()
    return None
