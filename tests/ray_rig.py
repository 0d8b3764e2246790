"""The loopback-only Ray test rig (shared/RAY_FACTS.md): one place for its private-API patch.

* `start_cluster` runs a `ray.cluster_utils.Cluster` in this process: a head with no GPUs and
  workers that declare logical GPUs, their per-GPU resources and their `msup-node` label, every
  socket on 127.0.0.1, no dashboard, a short RAY_TMPDIR (unix socket names are limited);
* `rig_python(dir)` is an executable that behaves like this Python for `-m MODULE ARGS` with
  the patch applied first: the supervisor's `ray_python` setting points at it, so the driver
  helper connects over loopback exactly as it would to a real head otherwise.

The patch: `ray.init(address="127.0.0.1:P")` rewrites loopback to the host's routable address
(`ray._private.services.resolve_ip_for_localhost`) and then hangs connecting there.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

LABEL_KEY = "msup-node"


def patch() -> None:
    import ray
    from ray._private import services

    services.resolve_ip_for_localhost = lambda host: host
    real_init = ray.init

    def init(*args, **kwargs):
        kwargs.setdefault("_node_ip_address", "127.0.0.1")
        return real_init(*args, **kwargs)

    ray.init = init


def node_args(label: str | None, gpus: list[int], tmp: Path) -> dict:
    args = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "num_gpus": len(gpus),
            "resources": {f"msup_gpu_{g}": 1.0 for g in gpus}}
    if label is not None:
        args["labels"] = {LABEL_KEY: label}
    return args


def start_cluster(tmp: Path, workers: list[tuple[str, list[int]]]):
    """(cluster, {label: node}); RAY_TMPDIR must already name `tmp` (set by the caller, before
    anything imports Ray)."""
    patch()
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.1", "include_dashboard": False, "num_cpus": 0, "num_gpus": 0,
        "temp_dir": str(tmp / "ray")})
    nodes = {}
    for label, gpus in workers:
        nodes[label] = cluster.add_node(**node_args(label, gpus, tmp))
    cluster.wait_for_nodes()
    return cluster, nodes


def rig_python(directory: Path) -> Path:
    path = directory / "rig-python"
    root = Path(__file__).resolve().parent.parent
    path.write_text(f"#!/bin/sh\ncd {root} 2>/dev/null || true\nexec {sys.executable} -m tests.ray_rig \"$@\"\n")
    path.chmod(0o755)
    return path


def ray_pids(cluster) -> set[int]:
    """Every process the cluster's nodes started (raylets, gcs_server, agents, workers' parents)."""
    pids: set[int] = set()
    for node in [cluster.head_node, *cluster.worker_nodes]:
        if node is None:
            continue
        for infos in node.all_processes.values():
            for info in infos:
                if info.process is not None:
                    pids.add(info.process.pid)
    return pids


if __name__ == "__main__":  # rig-python -m MODULE ARGS...
    patch()
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: rig-python -m MODULE [ARGS...]")
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    runpy.run_module(module, run_name="__main__", alter_sys=True)
