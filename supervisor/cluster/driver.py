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
  (the backend exited), `{"event": "lost", "name": ..., "reason": "..."}` (its actor or node died).
Ray's own output is sent to stderr so it can never corrupt the protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

#: How a name-based lookup says "no such actor": ray.get_actor raises ValueError.
_GONE = ValueError


class Driver:
    def __init__(self, namespace: str, out: Any) -> None:
        import ray

        from .actor import InstanceActor

        self.ray = ray
        self.namespace = namespace
        self.out = out
        self.actor_class = ray.remote(InstanceActor)
        self.watches: dict[str, asyncio.Task] = {}
        self.tasks: set[asyncio.Task] = set()

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
        try:
            return await asyncio.to_thread(self.ray.get_actor, name, namespace=self.namespace)
        except _GONE:
            return None

    async def op_nodes(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._nodes)

    def _nodes(self) -> list[dict[str, Any]]:
        return [{"id": n["NodeID"], "alive": n["Alive"], "labels": n.get("Labels") or {},
                 "resources": n.get("Resources") or {}, "address": n.get("NodeManagerAddress")}
                for n in self.ray.nodes()]

    async def op_launch(self, name: str, spec: dict[str, Any], node: str, label_key: str,
                        resources: dict[str, float], num_gpus: float, placement_timeout: float) -> dict[str, Any]:
        nodes = [n for n in await asyncio.to_thread(self._nodes) if n["alive"]]
        fits = [n for n in nodes if (node == "*" or n["labels"].get(label_key) == node)
                and all(n["resources"].get(r, 0) >= amount for r, amount in resources.items())]
        if not fits:
            raise LookupError(_no_node(node, resources, nodes, label_key))
        old = await self._actor(name)
        if old is not None:  # a run nobody tracks any more: stop first, start later
            await self._stop_and_kill(name, old, 15, spec.get("stop_timeout", 30.0))
        options: dict[str, Any] = {"name": name, "namespace": self.namespace, "lifetime": "detached",
                                   "max_restarts": 0, "num_cpus": 0, "num_gpus": num_gpus,
                                   "resources": resources, "max_concurrency": 64}
        if node != "*":
            options["label_selector"] = {label_key: node}
        actor = self.actor_class.options(**options).remote()
        try:
            # A request for a GPU another instance holds stays pending: bounded here.
            info = await asyncio.wait_for(_get(actor.start.remote(spec)), placement_timeout)
        except asyncio.TimeoutError:
            await asyncio.to_thread(self.ray.kill, actor)
            where = "no node" if node == "*" else f"node {node} has not"
            gpus = ", ".join(r.removeprefix("msup_gpu_") for r in sorted(resources))
            wanted = f"GPU {gpus} free" if gpus else "room for it"
            raise TimeoutError(f"not placed within {placement_timeout:g} s: {where} {wanted}") from None
        except Exception:
            await asyncio.to_thread(self.ray.kill, actor)
            raise
        info["node_label"] = self._label_of(info["node_id"], nodes, label_key)
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
        info = await _get(actor.info.remote())
        nodes = await asyncio.to_thread(self._nodes)
        info["node_label"] = self._label_of(info["node_id"], nodes, label_key)
        if not info["exited"]:
            self._watch(name, actor)
        return info

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
        try:
            left = await _get(actor.cleanup.remote(signum, timeout))
        except self.ray.exceptions.RayActorError:
            # Killed by the stop that just ended this run: its name outlives it for a moment,
            # and the stop already swept what the run left.
            left = 0
        self._unwatch(name)
        await asyncio.to_thread(self.ray.kill, actor)
        return left

    async def op_list(self) -> list[str]:
        found = await asyncio.to_thread(self.ray.util.list_named_actors, all_namespaces=True)
        return sorted(a["name"] for a in found if a.get("namespace") == self.namespace)

    async def _stop_and_kill(self, name: str, actor: Any, signum: int, timeout: float) -> dict[str, Any] | None:
        try:
            status = await _get(actor.stop.remote(signum, timeout))
        except self.ray.exceptions.RayActorError:
            status = None  # the actor is already gone: nothing left to stop gracefully
        self._unwatch(name)
        await asyncio.to_thread(self.ray.kill, actor)
        return status

    # -- exit watching ---------------------------------------------------------------------
    def _watch(self, name: str, actor: Any) -> None:
        self._unwatch(name)
        task = asyncio.ensure_future(self._wait_exit(name, actor))
        self.watches[name] = task
        task.add_done_callback(lambda t: self.watches.pop(name, None) if self.watches.get(name) is t else None)

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
                self.emit({"event": "lost", "name": name, "reason": _lost_reason(exc)})
                return
            self.emit({"event": "exit", "name": name, "status": status})
            return


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


async def serve(args: argparse.Namespace, out: Any) -> None:
    import ray

    began = time.monotonic()
    ray.init(address=args.address, namespace=args.namespace, log_to_driver=False, logging_level="WARNING")
    driver = Driver(args.namespace, out)
    driver.emit({"event": "ready", "nodes": await driver.op_nodes(), "seconds": round(time.monotonic() - began, 3)})
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
