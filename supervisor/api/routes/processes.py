"""DELETE /api/v1/processes/{pid}: kill a stray GPU process, safely (here, or with `node`
on a cluster node, where its agent judges it by the same rules)."""

from __future__ import annotations

import asyncio
import logging

from sanic import Blueprint, Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response
from sanic_ext import openapi

from supervisor.adapters import kill
from supervisor.adapters.procscan import scan
from supervisor.api.errors import error_response, parse_bool, parse_int, query
from supervisor.api.routes import Parameter, responses
from supervisor.api.schemas import KillProcessResponse
from supervisor.runtime.control import Forbidden, NotFound, invalid

log = logging.getLogger(__name__)

bp = Blueprint("processes", url_prefix="/api/v1")

#: SIGTERM first; SIGKILL if the process is still there after this many seconds.
KILL_GRACE = 5.0
#: The largest pid Linux can hand out (2**22, the ceiling of kernel.pid_max).
PID_MAX = 4194304


@bp.delete("/processes/<pid>")
@openapi.definition(
    summary="Kill a process by its PID",
    description="Allowed for a process of a supervised instance (which then restarts under its policy) or a "
    "process using a GPU. Refused (403) for pid <= 1, the supervisor itself, its process group and "
    "its ancestors, always; and for any other process unless force=true. SIGTERM, then SIGKILL after "
    f"{KILL_GRACE:g} s. Answers once the process is gone. In cluster mode, node=<label> kills a "
    "process of that node, judged there by the same rules (503 while the node cannot be reached).",
    tag="GPU and processes",
    parameter=[
        Parameter("pid", {"type": "integer", "minimum": 1, "maximum": PID_MAX}, "path", required=True),
        Parameter("force", {"type": "boolean"}, "query", description="kill an unrelated process anyway"),
        Parameter("node", {"type": "string"}, "query", description="cluster mode: the node's label"),
    ],
    response=responses({200: (KillProcessResponse, "the process is gone")}, 403, 404, 422, 503),
)
async def kill_process(request: Request, pid: str) -> HTTPResponse:
    target = parse_int(pid, ["path", "pid"])
    force = parse_bool(query(request, "force"), ["query", "force"])
    node = query(request, "node")
    if node is not None and node != "local":
        return await _kill_on_node(request, node, target, force)
    engine = request.app.ctx.engine
    table = await asyncio.to_thread(scan)
    if target > 1 and target not in table:
        raise NotFound("Process not found")
    instance_pids = {iid: inst.pid for iid, inst in engine.instances.items() if inst.pid is not None}
    facts = kill.facts_for(target, table, instance_pids, request.app.ctx.gpus.gpu_pids())
    verdict = kill.judge(facts, force)
    if not verdict.allowed:
        raise Forbidden(verdict.reason)
    log.warning("killing pid %s through the API: %s", target, verdict.reason)
    try:
        how = await kill.terminate(target, KILL_GRACE)
    except ProcessLookupError:
        raise NotFound("Process not found") from None
    except PermissionError:
        raise Forbidden("Permission denied") from None
    message = f"{verdict.reason}; {_ended(how)}"
    return json_response(
        {"pid": target, "status": "killed", "message": message, "instance_id": verdict.instance}
    )


async def _kill_on_node(request: Request, node: str, pid: int, force: bool) -> HTTPResponse:
    from supervisor.cluster.client import ClusterError, ClusterUnreachable  # cluster mode only

    nodes = request.app.ctx.gpus.cluster_nodes
    if nodes is None:
        raise invalid(
            ["query", "node"],
            'needs cluster mode (cluster = "ray" in the settings); leave it out for this machine',
        )
    try:
        answer = await nodes.kill(node, pid, force, KILL_GRACE)
    except LookupError as exc:
        raise NotFound(str(exc)) from None
    except (ClusterUnreachable, ClusterError) as exc:
        return error_response(503, f"node {node} cannot be reached: {exc}")
    if answer.get("missing"):
        raise NotFound(f"Process not found on node {node}")
    if "refused" in answer:
        raise Forbidden(f"{answer['refused']} (on node {node})")
    how = answer["how"]
    message = f"{answer['reason']} (on node {node}); {_ended(how)}"
    return json_response(
        {
            "pid": pid,
            "status": "killed",
            "message": message,
            "instance_id": answer.get("instance"),
            "node": node,
        }
    )


def _ended(how: str) -> str:
    return "exited after SIGTERM" if how == "terminated" else f"SIGKILLed after {KILL_GRACE:g} s"
