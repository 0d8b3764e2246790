"""The loopback-only Ray test rig (shared/RAY_FACTS.md): one place for its private-API patch.

* `start_cluster` runs a `ray.cluster_utils.Cluster` in this process: a head with no GPUs and
  workers that declare logical GPUs, their per-GPU resources and their `msup-node` label, every
  socket on 127.0.0.1, no dashboard, a short RAY_TMPDIR (unix socket names are limited);
* `rig_python(dir)` is an executable that behaves like this Python for `-m MODULE ARGS` with
  the patch applied first: the supervisor's `ray_python` setting points at it, so the driver
  helper connects over loopback exactly as it would to a real head otherwise.
* `ClusterProcess` runs such a cluster in a child process of its own (`python -m tests.ray_rig
  --cluster CONFIG`), for tests that start a head while a supervisor runs (a new head after
  a lost one): Ray starts nodes only from a main thread (it installs a SIGTERM handler), which
  would block the test's event loop for seconds. It reports the pid of every process its
  nodes started, the GCS's among them, so a test kills and checks them by pid.

The patch: `ray.init(address="127.0.0.1:P")` rewrites loopback to the host's routable address
(`ray._private.services.resolve_ip_for_localhost`) and then hangs connecting there.
"""

from __future__ import annotations

import json
import os
import runpy
import select
import signal
import subprocess
import sys
import time
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
    args = {
        "node_ip_address": "127.0.0.1",
        "num_cpus": 1,
        "num_gpus": len(gpus),
        "resources": {f"msup_gpu_{g}": 1.0 for g in gpus},
    }
    if label is not None:
        args["labels"] = {LABEL_KEY: label}
    return args


def start_cluster(tmp: Path, workers: list[tuple[str, list[int]]], gcs_port: int | None = None):
    """(cluster, {label: node}); RAY_TMPDIR must already name `tmp` (set by the caller, before
    anything imports Ray). `gcs_port`: the head's GCS port (a new head on a lost head's port)."""
    patch()
    from ray.cluster_utils import Cluster

    head = {
        "node_ip_address": "127.0.0.1",
        "include_dashboard": False,
        "num_cpus": 0,
        "num_gpus": 0,
        "temp_dir": str(tmp / "ray"),
    }
    if gcs_port is not None:
        head["gcs_server_port"] = gcs_port
    cluster = Cluster(initialize_head=True, head_node_args=head)
    nodes = {}
    for label, gpus in workers:
        nodes[label] = cluster.add_node(**node_args(label, gpus, tmp))
    cluster.wait_for_nodes()
    return cluster, nodes


def rig_python(directory: Path) -> Path:
    path = directory / "rig-python"
    root = Path(__file__).resolve().parent.parent
    path.write_text(
        f'#!/bin/sh\ncd {root} 2>/dev/null || true\nexec {sys.executable} -m tests.ray_rig "$@"\n'
    )
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


class ClusterProcess:
    """A rig cluster (a head on `gcs_port`, `workers` as in `start_cluster`) in a child process
    in its own session; `env` is added to the environment of every process of the cluster
    (e.g. a lowered `RAY_gcs_rpc_server_reconnect_timeout_s`). Blocking: call `start` and
    `stop` from a thread in async tests."""

    def __init__(
        self,
        tmp: Path,
        workers: list[tuple[str, list[int]]],
        gcs_port: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp, self.workers, self.gcs_port = tmp, workers, gcs_port
        self.env = {**os.environ, "RAY_TMPDIR": str(tmp), **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.address = f"127.0.0.1:{gcs_port}"
        self.gcs_pid = 0
        self.raylets: dict[str, int] = {}  # label -> the raylet pid of that worker
        self.pids: set[int] = set()  # every process the nodes started, the GCS's included

    def start(self, timeout: float = 60.0) -> ClusterProcess:
        config = {"tmp": str(self.tmp), "workers": self.workers, "gcs_port": self.gcs_port}
        log = open(self.tmp / f"cluster-{self.gcs_port}-{time.monotonic_ns()}.log", "wb")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.ray_rig", "--cluster", json.dumps(config)],
                cwd=Path(__file__).resolve().parent.parent,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
                start_new_session=True,
            )
        finally:
            log.close()
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"the rig cluster did not start within {timeout:g} s (see {log.name})")
        message = json.loads(line)
        self.gcs_pid, self.raylets, self.pids = message["gcs_pid"], message["raylets"], set(message["pids"])
        self.pids |= descendants(self.proc.pid)  # with the agents each raylet started
        return self

    def stop(self, timeout: float = 30.0) -> list[int]:
        """Shut the cluster down (the child's `Cluster.shutdown`), then SIGKILL by pid whatever
        of it is still alive 30 s later (a generous grace on a loaded machine); returns those pids. After a clean run there are none;
        after a lost head there are: a raylet that ends for want of its GCS leaves its
        DashboardAgent and RuntimeEnvAgent behind (reparented to init, they end about 60 s
        later), and the head's log monitor does not end at all."""
        proc, self.proc = self.proc, None
        if proc is None:
            return []
        self.pids |= descendants(proc.pid)  # the workers the raylets started since
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by its pid
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in self.pids):
            time.sleep(0.05)
        left = sorted(p for p in self.pids if _alive(p))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        return left


def descendants(root: int) -> set[int]:
    """The live descendants of `root` (an orphan reparented away is no longer one: take this
    while the tree is whole)."""
    from supervisor.adapters.procscan import scan, tree

    return tree(scan(), root)


def _alive(pid: int) -> bool:
    """Exists and is not a zombie (a killed node process stays one until its parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _serve_cluster(config: dict) -> None:
    """The child of `ClusterProcess`: start, report the pids on stdout, shut down on stdin EOF."""
    from ray._private import ray_constants

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever Ray prints goes to the log, never between protocol lines
    workers = [(label, gpus) for label, gpus in config["workers"]]
    cluster, nodes = start_cluster(Path(config["tmp"]), workers, config["gcs_port"])
    gcs = cluster.head_node.all_processes[ray_constants.PROCESS_TYPE_GCS_SERVER][0].process.pid
    raylets = {
        label: node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        for label, node in nodes.items()
    }
    out.write(json.dumps({"gcs_pid": gcs, "raylets": raylets, "pids": sorted(ray_pids(cluster))}) + "\n")
    sys.stdin.buffer.read()  # until the test closes it (or dies)
    cluster.shutdown()
    out.close()


if __name__ == "__main__":  # rig-python -m MODULE ARGS...  |  python -m tests.ray_rig --cluster CONFIG
    if sys.argv[1:2] == ["--cluster"]:
        _serve_cluster(json.loads(sys.argv[2]))
        os._exit(0)  # Ray's atexit hooks have nothing left to do
    patch()
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        sys.exit("usage: rig-python -m MODULE [ARGS...]")
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    runpy.run_module(module, run_name="__main__", alter_sys=True)
