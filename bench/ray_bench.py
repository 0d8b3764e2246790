"""Cluster mode (issue 14) on a real local Ray cluster: latency, cold start, adoption, memory.

    python bench/ray_bench.py                  # the issue's sizes: 60 instances over 3 nodes
    python bench/ray_bench.py --instances 12   # a lighter run

Prints one JSON document on stdout (progress on stderr). Needs `pip install '.[ray]'`.
The cluster is tests/ray_rig.py's (loopback only, one head with no workloads, 3 workers
`gpu-a`..`gpu-c`); the supervisor is an Engine in this process with its Ray driver helper.

* `drop_to_running_s`: a declaration file written into the watched conf.d/ until its backend
  (pinned to `gpu-b`, an HTTP health check) is RUNNING there; repeated, median and max.
* `exit_noticed_ms`: SIGKILL of a remote backend until the instance leaves RUNNING.
* `cold_start`: a new supervisor with N declarations spread over the 3 nodes until all are
  RUNNING (the driver helper's start, `import ray` and `ray.init` included).
* `restart_adopt_s`: the supervisor leaves its runs (`shutdown(keep_running=True)`, as on an
  upgrade) and a new one adopts all N by actor name (same pids, no restart).
* `memory_mib`: PSS added to the supervisor (this process's RSS growth plus the driver helper),
  and per node: its Ray processes' growth plus the instance actors living there, and its node
  agent (the backends themselves are the models' and not counted).
* `node_probe_ms`: one health probe run by the actor on its node (supervisor -> driver -> actor).
* `idle_cpu_percent_10s`: with all N RUNNING, CPU used in 10 s by the supervisor, the driver,
  the node agents and the instance actors (liveness probes and node samples included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NODES = {"gpu-a": [0, 1], "gpu-b": [0, 1], "gpu-c": [0, 1]}
HEALTH = {"type": "http", "start_interval": 0.02, "interval": 1.0}
FAST = {"initial_delay": 0.0, "jitter": 0.0, "max_retries": 0, "min_uptime": 0.5}


def progress(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def pss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def node_pids(node) -> set[int]:
    return {i.process.pid for infos in node.all_processes.values() for i in infos if i.process is not None}


def summary(values: list[float], scale: float = 1.0, digits: int = 3) -> dict:
    return {
        "median": round(statistics.median(values) * scale, digits),
        "max": round(max(values) * scale, digits),
        "n": len(values),
    }


async def wait_running(engine, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    from supervisor.core.states import State

    while True:
        missing = [i for i in ids if i not in engine.instances or engine.instances[i].state != State.RUNNING]
        if not missing:
            return
        if time.monotonic() > deadline:
            states = {
                i: engine.instances[i].state.value if i in engine.instances else "absent" for i in missing[:5]
            }
            raise SystemExit(f"not RUNNING after {timeout} s: {len(missing)} of {len(ids)}, e.g. {states}")
        await asyncio.sleep(0.002)


async def run(args: argparse.Namespace, tmp: Path) -> dict:
    from supervisor.config.settings import load_settings
    from supervisor.core.states import State
    from supervisor.wiring import build
    from tests.conftest import declaration, demo_cmd, free_range, write_decl
    from tests.ray_rig import ray_pids, rig_python, start_cluster

    result: dict = {"instances": args.instances, "nodes": list(NODES)}
    began = time.monotonic()
    cluster, nodes = start_cluster(tmp, list(NODES.items()))
    result["cluster_up_s"] = round(time.monotonic() - began, 2)
    progress(f"cluster up in {result['cluster_up_s']} s")
    all_pids = ray_pids(cluster)
    base = {label: sum(pss_mib(p) for p in node_pids(n)) for label, n in nodes.items()}
    conf, state = tmp / "conf.d", tmp / "state"
    conf.mkdir()
    for key in [k for k in os.environ if k.startswith("MODEL_SUPERVISOR_")]:
        del os.environ[key]
    settings = load_settings(
        conf_dir=conf,
        state_dir=state,
        port_range=free_range(args.instances + 20),
        cluster="ray",
        ray_address=cluster.address,
        ray_python=str(rig_python(tmp)),
        ray_placement_timeout=120.0,
        gpu_source="none",
        log_level="WARNING",
    )
    backends: set[int] = set()
    rss_before = rss_mib(os.getpid())
    engine = build(settings).engine
    try:
        await engine.start(watch=True)
        # -- declaration dropped -> RUNNING on a remote node --------------------------------
        drops = []
        for i in range(args.repeat):
            iid = f"drop{i}@gpu-b:cpu"
            t0 = time.perf_counter()
            write_decl(conf, declaration(f"drop{i}", demo_cmd(), node="gpu-b", health=HEALTH))
            await wait_running(engine, [iid], 60)
            drops.append(time.perf_counter() - t0)
            backends.add(engine.instances[iid].pid)
            (conf / f"drop{i}.toml").unlink()
            while iid in engine.instances:
                await asyncio.sleep(0.01)
        result["drop_to_running_s"] = summary(drops)
        progress("drop -> RUNNING", result["drop_to_running_s"])
        # -- exit of a remote backend -> the supervisor knows ---------------------------------
        write_decl(conf, declaration("crashy", demo_cmd(), node="gpu-a", health=HEALTH, restart=FAST))
        await wait_running(engine, ["crashy@gpu-a:cpu"], 60)
        inst = engine.instances["crashy@gpu-a:cpu"]
        exits = []
        for _ in range(args.repeat):
            await inst.wait_for(lambda i: i.state == State.RUNNING, timeout=60)
            pid = inst.pid
            backends.add(pid)
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            await inst.wait_for(lambda i: i.state != State.RUNNING, timeout=10)
            exits.append(time.perf_counter() - t0)
            await inst.wait_for(lambda i: i.state == State.RUNNING and i.pid != pid, timeout=60)
        result["exit_noticed_ms"] = summary(exits, 1000, 1)
        progress("exit noticed", result["exit_noticed_ms"])
        (conf / "crashy.toml").unlink()
    finally:
        await engine.shutdown()
    # -- cold start of N instances over the nodes ------------------------------------------
    labels = list(NODES)
    ids = []
    for i in range(args.instances):
        label = labels[i % len(labels)]
        write_decl(conf, declaration(f"m{i:03d}", demo_cmd(), node=label, health=HEALTH))
        ids.append(f"m{i:03d}@{label}:cpu")
    engine = build(settings).engine
    t0 = time.perf_counter()
    try:
        await engine.start(watch=True)
        await wait_running(engine, ids, 600)
        result["cold_start"] = {"seconds": round(time.perf_counter() - t0, 2), "instances": len(ids)}
        progress("cold start", result["cold_start"])
        pids = {i: engine.instances[i].pid for i in ids}
        backends |= set(pids.values())
        # -- memory: the supervisor, and each node -----------------------------------------
        client = engine.runners["ray"].client
        actors: dict[str, list[int]] = {label: [] for label in labels}
        for iid in ids:
            info = await client.call("attach", name=iid, label_key="msup-node")
            actors[info["node_label"]].append(info["actor_pid"])
        all_pids |= {p for ps in actors.values() for p in ps}
        per_node = {}
        for label, node in nodes.items():
            ray_now = sum(pss_mib(p) for p in node_pids(node))
            actor_pss = [pss_mib(p) for p in actors[label]]
            per_node[label] = {
                "instances": len(actors[label]),
                "ray_processes_growth": round(ray_now - base[label], 1),
                "actors": round(sum(actor_pss), 1),
                "per_actor": round(statistics.mean(actor_pss), 1) if actor_pss else 0.0,
                "added": round(ray_now - base[label] + sum(actor_pss), 1),
                "ray_node_base": round(base[label], 1),
            }
        samples = engine.runners["ray"].nodes.samples
        for label in labels:
            agent = samples[label].agent_pid if label in samples else None
            per_node[label]["node_agent_pss"] = round(pss_mib(agent), 1) if agent else None
            if agent:
                all_pids.add(agent)
        result["memory_mib"] = {
            "supervisor_process_rss_growth": round(rss_mib(os.getpid()) - rss_before, 1),
            "driver_helper_pss": round(pss_mib(client.driver_pid), 1),
            "nodes": per_node,
        }
        progress("memory", json.dumps(result["memory_mib"]))
        # -- a health probe on the node, through driver and actor ----------------------------
        probe_iid = ids[0]
        handle = engine.instances[probe_iid]._handle
        spec = engine.instances[probe_iid].spec
        rtts = []
        for _ in range(50):
            t0 = time.perf_counter()
            assert (await handle.probe(spec.health, spec.port)).ok
            rtts.append(time.perf_counter() - t0)
        result["node_probe_ms"] = summary(rtts, 1000, 2)
        progress("probe on the node", result["node_probe_ms"])
        # -- idle cost: CPU of the supervisor, its driver and the node agents over 10 s ------
        watched = {
            "supervisor": [os.getpid()],
            "driver_helper": [client.driver_pid],
            "node_agents": [
                samples[lb].agent_pid for lb in labels if lb in samples and samples[lb].agent_pid
            ],
            "instance_actors": [p for ps in actors.values() for p in ps],
        }
        cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in watched.items()}
        await asyncio.sleep(10.0)
        result["idle_cpu_percent_10s"] = {
            k: round(100 * (sum(cpu_seconds(p) for p in v) - cpu0[k]) / 10.0, 2) for k, v in watched.items()
        }
        result["idle_cpu_percent_10s"]["note"] = (
            f"{len(ids)} instances, HTTP liveness every "
            f"{HEALTH['interval']} s, node samples every "
            f"{settings.gpu_sample_interval} s"
        )
        progress("idle CPU", result["idle_cpu_percent_10s"])
        # -- the supervisor restarts: all adopted ------------------------------------------
        t1 = time.perf_counter()
        await engine.shutdown(keep_running=True)
        left = time.perf_counter() - t1
        engine = build(settings).engine
        t2 = time.perf_counter()
        await engine.start(watch=True)
        await wait_running(engine, ids, 120)
        adopted = time.perf_counter() - t2
        same = sum(1 for i in ids if engine.instances[i].pid == pids[i])
        restarted = sum(engine.instances[i].restarts for i in ids)
        result["restart_adopt_s"] = {
            "seconds": round(adopted, 2),
            "old_supervisor_left_in_s": round(left, 2),
            "same_pids": same,
            "of": len(ids),
            "restarts": restarted,
        }
        progress("adopted", result["restart_adopt_s"])
    finally:
        t3 = time.perf_counter()
        await engine.shutdown()
        result["stop_all_s"] = round(time.perf_counter() - t3, 2)
        all_pids |= ray_pids(cluster)
        cluster.shutdown()
    deadline = time.monotonic() + 20
    mine = all_pids | backends
    while time.monotonic() < deadline and any(_alive(p) for p in mine):
        await asyncio.sleep(0.1)
    result["left_running"] = sorted(p for p in mine if _alive(p))
    for pid in result["left_running"]:
        os.kill(pid, signal.SIGKILL)
    return result


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=5, help="runs of the drop and exit measurements")
    parser.add_argument(
        "--liveness-interval",
        type=float,
        default=1.0,
        help="seconds between liveness probes (a large value: the idle cost without probes)",
    )
    args = parser.parse_args()
    HEALTH["interval"] = args.liveness_interval
    tmp = Path(tempfile.mkdtemp(prefix="msb", dir="/tmp"))  # short: unix socket paths
    os.environ["RAY_TMPDIR"] = str(tmp)  # before anything imports Ray
    print(json.dumps(asyncio.run(run(args, tmp)), indent=2))


if __name__ == "__main__":
    main()
