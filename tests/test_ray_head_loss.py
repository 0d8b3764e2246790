"""Cluster mode (issue 14): the Ray head is lost, then a new head comes up on its port.

Its own cluster (never the shared module rig: this test kills its head), run by
`ray_rig.ClusterProcess` in a child process: a head and one worker labelled `gpu-a`, every
socket on 127.0.0.1. What happens, measured with Ray 2.60 on this rig (2 cores):

* the GCS killed, the supervisor's driver helper is ended by Ray `ray_reconnect_timeout` s
  later ("Failed to connect to GCS within N seconds"): the cluster is unreachable;
* the worker's raylet ends after the nodes' own reconnect timeout (Ray's default 60 s,
  lowered to `NODE_RECONNECT` here), and the actor with it; the backend (its own session)
  lives on as an orphan, and nothing of Ray is left to stop it;
* after `ray_unreachable_grace` the run fails with "cluster unreachable: ...", and the
  supervisor's lost-run reaper stops the orphan by its run mark (the node is this machine);
* Ray without an external Redis keeps nothing of the old cluster: a new head on the same
  GCS port and a worker with the same label are a new cluster. The driver helper, restarted
  with backoff, connects to it, and the instance's next start runs it there (a new pid);
* a local instance never notices any of it (same pid, no transition);
* a raylet that ends for want of its GCS leaves its DashboardAgent and RuntimeEnvAgent
  behind (they end about 60 s later, whatever the timeout), the head's log monitor stays:
  `ClusterProcess.stop` kills them by pid.

Timings here: driver ended 2.0-2.9 s after the kill, worker raylet and actor 4.0 s, the run
failed 10-11 s (grace 8 s) and its orphan was reaped at once; RUNNING again 0.2-0.5 s after
the new cluster was up (the helper's connection attempt under way reached the new GCS).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from supervisor.adapters.health import health_to_wire
from supervisor.cluster.client import ClusterClient
from supervisor.config.cluster_launch import LABEL_KEY
from supervisor.core.states import State

from .conftest import alive, declaration, demo_cmd, free_port, wait_until
from .test_ray_cluster import HEALTH, Tracker, handle_of, needs_ray, started

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a real Ray cluster, slow under load

#: The driver's RAY_gcs_rpc_server_reconnect_timeout_s (the `ray_reconnect_timeout` setting).
RECONNECT = 2
#: The same for the cluster's raylets (Ray's default: 60 s), so the old worker goes quickly.
NODE_RECONNECT = 3
#: Longer than NODE_RECONNECT after the driver's end, so the actor is gone before the run is
#: given up on: the reaper then meets a true orphan.
GRACE = 8.0
#: A short fixed delay: while unreachable each start waits for the helper's attempt anyway.
#: While unreachable, a failed start backs off without counting toward max_retries (RunnerUnavailable).
RESTART = {"initial_delay": 0.3, "factor": 1.0, "jitter": 0.0, "max_retries": 0, "min_uptime": 1.0}


@needs_ray
async def test_head_lost_is_cluster_unreachable_the_orphan_is_reaped_and_a_new_head_runs_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .ray_rig import ClusterProcess, rig_python

    short = Path(tempfile.mkdtemp(prefix="msh", dir="/tmp"))  # unix socket paths are short
    monkeypatch.setenv("RAY_TMPDIR", str(short))
    port = free_port()
    node_env = {"RAY_gcs_rpc_server_reconnect_timeout_s": str(NODE_RECONNECT)}
    clusters: list[ClusterProcess] = []
    left: list[int] = []  # of a cluster that kept its head: none may outlive its shutdown
    track = Tracker()
    engine = None
    try:
        began = time.monotonic()
        old = await asyncio.to_thread(ClusterProcess(short, [("gpu-a", [0])], port, node_env).start)
        clusters.append(old)
        print(f"cluster up in {time.monotonic() - began:.1f} s")
        docs = [
            declaration("remote", demo_cmd(), node="gpu-a", gpus=[0], health=HEALTH, restart=RESTART),
            declaration("here", demo_cmd(), node="local", health=HEALTH),
        ]
        engine = await started(
            tmp_path,
            {"cluster": old, "python": rig_python(short)},
            monkeypatch,
            docs,
            ray_reconnect_timeout=RECONNECT,
            ray_unreachable_grace=GRACE,
            ray_placement_timeout=10.0,
        )
        remote, here = engine.instances["remote@gpu-a:gpu0"], engine.instances["here@cpu"]
        await remote.wait_state(State.RUNNING, timeout=60)
        await here.wait_state(State.RUNNING, timeout=30)
        track.add(engine)
        client = engine.runners["ray"].client
        backend, here_pid, driver = remote.pid, here.pid, client.driver_pid
        assert backend and here_pid and driver
        actor = (await client.call("attach", name=remote.id, label_key=LABEL_KEY))["actor_pid"]
        track.pids |= {actor, driver}

        os.kill(old.gcs_pid, signal.SIGKILL)  # the head's GCS, by the pid the rig started
        killed = time.monotonic()
        await wait_until(lambda: not alive(driver), RECONNECT + 20)
        driver_gone = time.monotonic() - killed
        await wait_until(lambda: not alive(actor) and not alive(old.raylets["gpu-a"]), NODE_RECONNECT + 20)
        actor_gone = time.monotonic() - killed
        # Ray has left the backend behind, and the run is not given up on yet (the grace).
        assert alive(backend), "Ray stopped the backend itself: the orphan case below is not met"
        assert remote.state == State.RUNNING and remote.pid == backend, list(remote.history)

        await remote.wait_for(lambda i: i.state != State.RUNNING, timeout=GRACE + 20)
        failed = time.monotonic() - killed
        lost = next(t for t in remote.history if t.from_state == State.RUNNING)
        assert lost.to_state == State.BACKOFF, lost
        assert "cluster unreachable: the Ray driver exited" in lost.reason, lost
        assert f"Failed to connect to GCS within {RECONNECT} seconds" in lost.reason  # the setting reached it
        assert failed >= GRACE  # the grace was kept
        await wait_until(lambda: not alive(backend), 10)  # the lost-run reaper, by its mark
        reaped = time.monotonic() - killed
        print(
            f"GCS killed: driver ended after {driver_gone:.1f} s, worker raylet and actor after "
            f"{actor_gone:.1f} s (the backend an orphan), run failed after {failed:.1f} s, orphan reaped "
            f"after {reaped:.1f} s"
        )
        # What Ray leaves of a cluster that lost its head (agents, the log monitor) is killed by pid.
        lingering = sorted(p for p in old.pids if alive(p))
        stragglers = await asyncio.to_thread(old.stop)
        print(
            f"{len(old.pids) - len(lingering)} of the old cluster's {len(old.pids)} processes had ended on "
            f"their own, {len(stragglers)} were still there 30 s after its shutdown (killed)"
        )

        # A new head on the lost head's port, and a worker with the same label: a new cluster.
        restarted = time.monotonic()
        new = await asyncio.to_thread(ClusterProcess(short, [("gpu-a", [0])], port, node_env).start)
        clusters.append(new)
        up = time.monotonic() - restarted
        await remote.wait_for(lambda i: i.state == State.RUNNING and i.pid not in (None, backend), timeout=60)
        recovered = time.monotonic() - restarted
        print(
            f"new cluster up in {up:.1f} s; the remote instance RUNNING again {recovered:.1f} s after the "
            f"new head was started ({recovered - up:.1f} s after it was up), {remote.restarts} restarts"
        )
        track.add(engine)
        assert client.up and client.connects >= 2 and client.driver_pid != driver
        assert handle_of(engine, remote.id).node == "gpu-a"
        info = await client.call("attach", name=remote.id, label_key=LABEL_KEY)
        assert info["pid"] == remote.pid and info["actor_pid"] != actor
        track.pids |= {info["actor_pid"], client.driver_pid}

        # Any new driver (this one after the reconnect) may be asked to probe a run before the
        # run's re-attach reaches it: it finds the actor by name, never fails a healthy backend.
        fresh = ClusterClient(new.address, client.namespace, str(rig_python(short)), tmp_path / "fresh.log")
        try:
            spec = remote.running_spec or remote.spec
            answer = await fresh.call(
                "probe", name=remote.id, health=health_to_wire(spec.health), port=spec.port, wait=30
            )
            track.pids.add(fresh.driver_pid)
        finally:
            await fresh.close()
        assert answer["ok"], answer

        # The local instance never noticed.
        assert here.state == State.RUNNING and here.pid == here_pid and here.restarts == 0
        assert [t.to_state for t in here.history] == [State.STARTING, State.RUNNING], list(here.history)
    finally:
        if engine is not None:
            await asyncio.wait_for(engine.shutdown(), 60)
        for cluster in reversed(clusters):
            left += await asyncio.to_thread(cluster.stop)  # a no-op for the old one, stopped above
        shutil.rmtree(short, ignore_errors=True)
    track.check()
    assert not left, f"the new cluster left processes behind: {left}"
    assert not [p for c in clusters for p in c.pids if alive(p)]
