"""The Ray driver: a helper process the supervisor talks to over a pipe (JSON lines).

    python -m supervisor.cluster.driver --address HEAD:6379 --namespace msup-<scope>

Why a process of its own (shared/RAY_FACTS.md): `ray.init` to a dead address retries for
ever without raising, and Ray terminates a driver about 60 s after it loses the head. Here
either only costs this helper; the supervisor sees its pipe close ("cluster unreachable"),
restarts it with backoff, and its local instances never notice.

Protocol, one JSON object per line:
* in (stdin): `{"id": N, "op": "...", ...}`; stdin closing (the supervisor died) ends the
  driver, never the actors (they are detached: a later supervisor adopts them by name);
* out (stdout): `{"id": N, "ok": true, "result": ...}` or `{"id": N, "ok": false, "error": "..."}`,
  and events: `{"event": "ready", "nodes": [...]}`, `{"event": "exit", "name": ..., "status": {...}}`
  (the backend exited), `{"event": "lost", "name": ..., "reason": "..."}` (its actor or node died),
  `{"event": "nodes", "samples": [...]}` (every node agent's GPU sample and runs, each interval).
Ray's own output is sent to stderr so it can never corrupt the protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import Any, TextIO

#: How a name-based lookup says "no such actor": ray.get_actor raises ValueError.
_GONE = ValueError


class Driver:
    def __init__(self, namespace: str, out: TextIO, agents: AgentOptions | None = None) -> None:
        import ray

        from supervisor.cluster.actor import InstanceActor

        self.ray = ray
        self.namespace = namespace
        self.out = out
        # Any: Ray types a created actor as `ActorHandle[T] | type[T]`, whose methods have no
        # `.remote` for mypy (only `@ray.method` ones do); its handles are Any here anyway.
        self.actor_class: Any = ray.remote(InstanceActor)
        self.agents = AgentPool(self, agents or AgentOptions())
        self.watches: dict[str, asyncio.Task[None]] = {}
        #: Actors this driver launched or attached to: `ray.get_actor` costs a GCS round trip
        #: (~0.1 s), too slow for a probe every few hundred milliseconds.
        self.handles: dict[str, Any] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def emit(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message, default=str) + "\n")
        self.out.flush()

    # -- requests ----------------------------------------------------------------------
    async def handle(self, request: dict[str, Any]) -> None:
        rid = request.get("id")
        try:
            op = getattr(self, "op_" + str(request.get("op")), None)
            if op is None:
                raise ValueError(f"unknown op {request.get('op')!r}")
            result = await op(**{k: v for k, v in request.items() if k not in ("id", "op")})
        except Exception as exc:  # every failure goes back to the caller, in words
            self.emit({"id": rid, "ok": False, "error": _describe(exc)})
        else:
            self.emit({"id": rid, "ok": True, "result": result})

    async def _actor(self, name: str) -> Any | None:
        if name in self.handles:
            return self.handles[name]
        try:
            return await asyncio.to_thread(self.ray.get_actor, name, namespace=self.namespace)
        except _GONE:
            return None

    async def op_nodes(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._nodes)

    def _nodes(self) -> list[dict[str, Any]]:
        return [
            {
                "id": n["NodeID"],
                "alive": n["Alive"],
                "labels": n.get("Labels") or {},
                "resources": n.get("Resources") or {},
                "address": n.get("NodeManagerAddress"),
            }
            for n in self.ray.nodes()
        ]

    async def op_launch(
        self,
        name: str,
        spec: dict[str, Any],
        node: str,
        label_key: str,
        resources: dict[str, float],
        num_gpus: float,
        placement_timeout: float,
        avoid: list[str] | None = None,
    ) -> dict[str, Any]:
        """`avoid`: labels of nodes an unpinned run keeps off (a pinned declaration names its GPUs there)."""
        nodes = [n for n in await asyncio.to_thread(self._nodes) if n["alive"]]
        fits = [
            n
            for n in nodes
            if (node == "*" or n["labels"].get(label_key) == node)
            and all(n["resources"].get(r, 0) >= amount for r, amount in resources.items())
        ]
        if not fits:
            raise LookupError(_no_node(node, resources, nodes, label_key))
        avoid = avoid or []
        if avoid and not [n for n in fits if n["labels"].get(label_key) not in avoid]:
            gpus = ", ".join(r.removeprefix("msup_gpu_") for r in sorted(resources))
            raise LookupError(
                f"no node it may use has GPU {gpus}: on {', '.join(sorted(avoid))} a declaration "
                f"pinned there names it"
            )
        old = await self._actor(name)
        if old is not None:  # a run nobody tracks any more: stop first, start later
            await self._stop_and_kill(name, old, 15, spec.get("stop_timeout", 30.0))
        options: dict[str, Any] = {
            "name": name,
            "namespace": self.namespace,
            "lifetime": "detached",
            "max_restarts": 0,
            "num_cpus": 0,
            "num_gpus": num_gpus,
            "resources": resources,
            "max_concurrency": 64,
        }
        if node != "*":
            options["label_selector"] = {label_key: node}
        elif avoid:
            options["label_selector"] = {label_key: f"!in({', '.join(sorted(avoid))})"}
        actor = self.actor_class.options(**options).remote()
        try:
            # A request for a GPU another instance holds stays pending: bounded here.
            info: dict[str, Any] = await asyncio.wait_for(_get(actor.start.remote(spec)), placement_timeout)
        except TimeoutError:
            await asyncio.to_thread(self.ray.kill, actor)
            where = "no node" if node == "*" else f"node {node} has not"
            gpus = ", ".join(r.removeprefix("msup_gpu_") for r in sorted(resources))
            wanted = f"GPU {gpus} free" if gpus else "room for it"
            raise TimeoutError(f"not placed within {placement_timeout:g} s: {where} {wanted}") from None
        except Exception:
            await asyncio.to_thread(self.ray.kill, actor)
            raise
        if info.get("refused"):  # a port of the run is taken on that node: nothing was started
            await asyncio.to_thread(self.ray.kill, actor)
            return info
        info["node_label"] = self._label_of(info["node_id"], nodes, label_key)
        self.handles[name] = actor
        self._watch(name, actor)
        return info

    @staticmethod
    def _label_of(node_id: str, nodes: list[dict[str, Any]], label_key: str) -> str | None:
        return next((n["labels"].get(label_key) for n in nodes if n["id"] == node_id), None)

    async def op_attach(self, name: str, label_key: str = "") -> dict[str, Any] | None:
        """The run of actor `name` (None: no such actor), watched from now on."""
        actor = await self._actor(name)
        if actor is None:
            return None
        info: dict[str, Any] = await _get(actor.info.remote())
        nodes = await asyncio.to_thread(self._nodes)
        info["node_label"] = self._label_of(info["node_id"], nodes, label_key)
        self.handles[name] = actor
        if not info["exited"]:
            self._watch(name, actor)
        return info

    async def op_probe(self, name: str, health: dict[str, Any], port: int) -> dict[str, Any]:
        """The instance's health probe, run by its actor on the node's loopback."""
        # A driver started since the run began (after a reconnect) knows its actor only once the
        # run re-attaches; a probe that comes first looks it up by name (the cache's miss path),
        # or a healthy backend would fail a health check after every driver restart.
        actor = await self._actor(name)
        if actor is None:
            return {"ok": False, "detail": "its actor is gone"}
        try:
            answer: dict[str, Any] = await _get(actor.probe.remote(health, port))
            return answer
        except self.ray.exceptions.RayActorError as exc:
            return {"ok": False, "detail": f"its actor did not answer: {_lost_reason(exc)}"}

    async def op_stop(self, name: str, signum: int, timeout: float) -> dict[str, Any] | None:
        actor = await self._actor(name)
        if actor is None:
            return None
        return await self._stop_and_kill(name, actor, signum, timeout)

    async def op_cleanup(self, name: str, signum: int, timeout: float) -> int:
        """After an exit: the run's leftovers stopped, then the actor (its GPUs freed in Ray)."""
        actor = await self._actor(name)
        if actor is None:
            return 0
        left: int  # processes of the run still there after the sweep
        try:
            left = await _get(actor.cleanup.remote(signum, timeout))
        except self.ray.exceptions.RayActorError:
            # Killed by the stop that just ended this run: its name outlives it for a moment,
            # and the stop already swept what the run left.
            left = 0
        self._unwatch(name)
        self.handles.pop(name, None)
        await asyncio.to_thread(self.ray.kill, actor)
        return left

    async def op_reap(self, token: str, signum: int, timeout: float) -> dict[str, list[int]]:
        """Stop what run `token` left, on every node (only its own node has any)."""
        return await self.agents.reap(token, signum, timeout)

    async def op_log(self, node_id: str, method: str, path: str, **args: Any) -> Any:
        """An instance log on its node: `tail` (lines), `size`, or `read_from` (offset)."""
        if method not in ("tail", "size", "read_from"):
            raise ValueError(f"unknown log method {method!r}")
        agent = self.agents.on(node_id)
        if agent is None:
            raise LookupError(f"no agent on node {node_id[:12]} (is the node alive?)")
        return await _get(getattr(agent, method).remote(path, **args))

    async def op_kill(self, node_id: str, pid: int, grace: float, force: bool = False) -> dict[str, Any]:
        """Kill process `pid` on node `node_id`, judged there (NodeAgent.kill)."""
        agent = self.agents.on(node_id)
        if agent is None:
            raise LookupError(f"no agent on node {node_id[:12]} (is the node alive?)")
        answer: dict[str, Any] = await _get(agent.kill.remote(pid, grace, force))
        return answer

    async def op_list(self) -> list[str]:
        found = await asyncio.to_thread(self.ray.util.list_named_actors, all_namespaces=True)
        return sorted(a["name"] for a in found if a.get("namespace") == self.namespace)

    async def _stop_and_kill(
        self, name: str, actor: Any, signum: int, timeout: float
    ) -> dict[str, Any] | None:
        status: dict[str, Any] | None  # the run's exit status (ExitStatus on the wire)
        try:
            status = await _get(actor.stop.remote(signum, timeout))
        except self.ray.exceptions.RayActorError:
            status = None  # the actor is already gone: nothing left to stop gracefully
        self._unwatch(name)
        self.handles.pop(name, None)
        await asyncio.to_thread(self.ray.kill, actor)
        return status

    # -- exit watching ---------------------------------------------------------------------
    def _watch(self, name: str, actor: Any) -> None:
        self._unwatch(name)
        task = asyncio.ensure_future(self._wait_exit(name, actor))
        self.watches[name] = task
        task.add_done_callback(
            lambda t: self.watches.pop(name, None) if self.watches.get(name) is t else None
        )

    def _unwatch(self, name: str) -> None:
        task = self.watches.pop(name, None)
        if task is not None:
            task.cancel()

    async def _wait_exit(self, name: str, actor: Any) -> None:
        errors = self.ray.exceptions
        while True:
            try:
                status = await _get(actor.wait_exit.remote())
            except errors.ActorUnavailableError:
                # Its node stopped answering (a killed raylet): either back soon or declared
                # dead, which turns this into ActorDiedError.
                await asyncio.sleep(1.0)
                continue
            except errors.RayActorError as exc:
                if self.handles.get(name) is actor:
                    del self.handles[name]
                self.emit({"event": "lost", "name": name, "reason": _lost_reason(exc)})
                return
            self.emit({"event": "exit", "name": name, "status": status})
            return


class AgentOptions:
    def __init__(self, gpu_source: str = "auto", gpu_file: str | None = None, interval: float = 1.0) -> None:
        self.gpu_source, self.gpu_file, self.interval = gpu_source, gpu_file, interval


class AgentPool:
    """One node agent (`supervisor.cluster.agent`) pinned to every live node, created as nodes
    appear; every `interval`, all of them sampled at once and the results sent to the
    supervisor as one `{"event": "nodes", "samples": [...]}`."""

    def __init__(self, driver: Driver, options: AgentOptions) -> None:
        from supervisor.cluster.agent import NodeAgent

        self.driver = driver
        self.options = options
        self.agent_class = driver.ray.remote(NodeAgent)
        self.agents: dict[str, Any] = {}  # node id -> agent handle
        self.labels: dict[str, str] = {}  # node id -> its label (or short id)
        self.labelled: set[str] = set()  # node ids that carry our label (`model-supervisor node --label`)
        self.scope = driver.namespace.removeprefix("msup-")

    def on(self, node_id: str) -> Any | None:
        return self.agents.get(node_id)

    def _ensure(self, nodes: list[dict[str, Any]]) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from supervisor.config.cluster_launch import LABEL_KEY

        alive = {n["id"]: n for n in nodes if n["alive"]}
        for node_id in list(self.agents):
            if node_id not in alive:
                del self.agents[node_id]
                self.labels.pop(node_id, None)
                self.labelled.discard(node_id)
        for node_id, node in alive.items():
            if node_id in self.agents:
                continue
            label = node["labels"].get(LABEL_KEY) or node_id[:12]
            self.labels[node_id] = label
            if node["labels"].get(LABEL_KEY):
                self.labelled.add(node_id)
            # Not detached and not named: it dies with this driver, never outlives a supervisor.
            self.agents[node_id] = self.agent_class.options(
                num_cpus=0,
                max_concurrency=16,
                max_restarts=-1,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(self.scope, label, self.options.gpu_source, self.options.gpu_file)

    async def run(self) -> None:
        while True:
            began = time.monotonic()
            try:
                self._ensure(await asyncio.to_thread(self.driver._nodes))
                self.driver.emit({"event": "nodes", "samples": await self._sample_all()})
            except Exception as exc:  # a GCS hiccup: the next round tries again
                self.driver.emit({"event": "error", "error": f"node agents: {_describe(exc)}"})
            await asyncio.sleep(max(0.05, self.options.interval - (time.monotonic() - began)))

    async def _sample_all(self) -> list[dict[str, Any]]:
        agents = list(self.agents.items())
        # A node that does not answer (a hung raylet) must not hold up the others' samples.
        timeout = max(5.0, 3 * self.options.interval)
        results = await asyncio.gather(
            *(asyncio.wait_for(_get(a.sample.remote()), timeout) for _, a in agents), return_exceptions=True
        )
        out = []
        for (node_id, _), result in zip(agents, results, strict=False):
            if isinstance(result, BaseException):
                result = {
                    "node_id": node_id,
                    "label": self.labels.get(node_id, node_id[:12]),
                    "error": "no answer" if isinstance(result, asyncio.TimeoutError) else _describe(result),
                }
            out.append({**result, "labelled": node_id in self.labelled})
        return out

    async def reap(self, token: str, signum: int, timeout: float) -> dict[str, list[int]]:
        agents = list(self.agents.items())
        results = await asyncio.gather(
            *(_get(a.reap.remote(token, signum, timeout)) for _, a in agents), return_exceptions=True
        )
        return {
            self.labels.get(node_id, node_id[:12]): result
            for (node_id, _), result in zip(agents, results, strict=False)
            if not isinstance(result, BaseException) and result
        }


async def _get(ref: Any) -> Any:
    return await ref


def _no_node(node: str, resources: dict[str, float], nodes: list[dict[str, Any]], label_key: str) -> str:
    labels = sorted({n["labels"].get(label_key) or n["id"][:12] for n in nodes})
    gpus = ", ".join(r.removeprefix("msup_gpu_") for r in sorted(resources))
    if node != "*" and not any(n["labels"].get(label_key) == node for n in nodes):
        return f"no live node is labelled {node!r} (live nodes: {', '.join(labels) or 'none'})"
    where = f"node {node}" if node != "*" else "no live node"
    return f"{where} has GPU {gpus} (live nodes: {', '.join(labels) or 'none'})"


def _lost_reason(exc: BaseException) -> str:
    text = str(exc)
    if "node" in text.lower() and ("died" in text.lower() or "dead" in text.lower()):
        return "its node was lost"
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("ActorDiedError", "The actor is dead", "ray.")):
            return "its actor died: " + line[:200]
    return "its actor died"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # RayTaskError wraps the actor's exception; its last line is "ExcType: message".
    last = next((line for line in reversed(text) if line.strip()), type(exc).__name__)
    return last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last


async def serve(args: argparse.Namespace, out: TextIO) -> None:
    import ray

    began = time.monotonic()
    ray.init(
        address=args.address, namespace=args.namespace, log_to_driver=False, logging_level=logging.WARNING
    )
    agents = AgentOptions(args.gpu_source, args.gpu_file, args.sample_interval)
    driver = Driver(args.namespace, out, agents)
    driver.emit(
        {"event": "ready", "nodes": await driver.op_nodes(), "seconds": round(time.monotonic() - began, 3)}
    )
    sampler = asyncio.ensure_future(driver.agents.run())
    sampler.add_done_callback(lambda t: None if t.cancelled() else t.exception())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break  # the supervisor is gone: the detached actors stay for the next one
        try:
            request = json.loads(line)
        except ValueError:
            driver.emit({"event": "error", "error": f"not JSON: {line[:80]!r}"})
            continue
        task = asyncio.ensure_future(driver.handle(request))
        driver.tasks.add(task)
        task.add_done_callback(driver.tasks.discard)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m supervisor.cluster.driver")
    parser.add_argument("--address", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument(
        "--gpu-source", default="auto", help="what the node agents sample (the gpu_source setting)"
    )
    parser.add_argument(
        "--gpu-file", default=None, help="simulated GPU file; {node} becomes each node's label"
    )
    parser.add_argument("--sample-interval", type=float, default=1.0, help="seconds between node samples")
    args = parser.parse_args(argv)
    # The protocol gets a private copy of stdout; fd 1 becomes stderr, so nothing Ray or a
    # library prints can land between two protocol lines.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        asyncio.run(serve(args, out))
    except Exception as exc:
        out.write(json.dumps({"event": "fatal", "error": _describe(exc)}) + "\n")
        out.flush()
        os._exit(1)
    # Ray's atexit shutdown can hang once the head is gone; nothing of ours needs it.
    os._exit(0)


if __name__ == "__main__":
    main()
