"""Cluster mode (issue 14) against a real Ray cluster on this machine (loopback only).

One `ray.cluster_utils.Cluster` for the module (a head with no GPUs, workers `gpu-a` and
`gpu-b` with logical GPUs 0 and 1; tests that remove a node add their own), each test with its
own supervisor (engine, or a `serve` process for re-adoption) and its own state dir. After
every test no backend, actor or driver of the test is left, checked by pid; after the module
none of the cluster's processes is (checked by pid, never by name).

The load rules (node without cluster mode, unknown labels, ids) need no Ray and always run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from supervisor.adapters.marks import MARK_ENV, scope_of
from supervisor.backends.registry import default_registry
from supervisor.config.declarations import DeclarationInvalid, Defaults, parse_declaration
from supervisor.config.settings import load_settings
from supervisor.core.spec import instance_id
from supervisor.core.states import State
from supervisor.runtime.engine import Engine
from supervisor.wiring import build

from .conftest import (
    FAST_RESTART,
    PY,
    REPO,
    alive,
    declaration,
    demo_cmd,
    free_port,
    free_range,
    wait_until,
    write_decl,
)
from .ray_rig import descendants
from .serve_helpers import Serve

HEALTH = {"type": "http", "start_interval": 0.05, "interval": 0.5}


# -- load rules (no Ray needed) ----------------------------------------------------------------
def _parse(doc: dict, defaults: Defaults):
    return parse_declaration(doc, Path("/c/x.toml"), default_registry(), defaults)


def test_node_without_cluster_mode_is_a_load_error_naming_the_key() -> None:
    with pytest.raises(DeclarationInvalid) as err:
        _parse(declaration("x", node="gpu-a"), Defaults())
    (e,) = err.value.errors
    assert e.key == "node" and 'cluster = "ray"' in e.message and "'gpu-a'" in e.message


def test_unknown_or_malformed_node_labels_are_load_errors() -> None:
    cluster = Defaults(cluster=True, nodes=frozenset({"gpu-a", "gpu-b"}))
    with pytest.raises(DeclarationInvalid) as err:
        _parse(declaration("x", node="gpu-c"), cluster)
    assert err.value.errors[0].key == "node" and "unknown node 'gpu-c'" in err.value.errors[0].message
    assert "gpu-a, gpu-b" in err.value.errors[0].message
    with pytest.raises(DeclarationInvalid) as err:
        _parse(declaration("x", node="GPU_A"), cluster)
    assert err.value.errors[0].key == "node" and "not a node label" in err.value.errors[0].message


def test_where_a_declaration_runs() -> None:
    cluster = Defaults(cluster=True, nodes=frozenset({"gpu-a"}))
    assert _parse(declaration("x", node="gpu-a"), cluster).node == "gpu-a"
    assert _parse(declaration("x"), cluster).node == "*"  # any node with the GPUs free
    assert _parse(declaration("x", gpus="auto"), cluster).node == "*"  # the node is chosen with the GPUs
    assert _parse(declaration("x", node="local"), cluster).node is None  # this machine, no Ray
    assert _parse(declaration("x"), Defaults()).node is None
    assert instance_id("llama", (1,), "gpu-a") == "llama@gpu-a:gpu1"
    assert instance_id("llama", (), "gpu-a") == "llama@gpu-a:cpu"
    assert instance_id("llama", (0, 1), "*") == "llama@gpu0-1"


def test_cluster_settings_are_checked() -> None:
    from supervisor.config.settings import SettingsError

    with pytest.raises(SettingsError, match="needs ray_address"):
        load_settings(cluster="ray")
    with pytest.raises(SettingsError, match="not a node label"):
        load_settings(cluster="ray", ray_address="127.0.0.1:1", ray_nodes=["Bad"])


@pytest.mark.slow
def test_cluster_mode_does_not_import_ray_in_the_supervisor() -> None:
    code = (
        "import sys; from supervisor.config.settings import load_settings; from supervisor.wiring import build;"
        "import asyncio\n"
        "async def main():\n"
        "    e = build(load_settings(cluster='ray', ray_address='127.0.0.1:1', state_dir='/tmp/x-msup')).engine\n"
        "    assert 'ray' in e.runners\n"
        "asyncio.run(main()); print('ray' in sys.modules)"
    )
    out = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_node_command_plans_resources_and_label_from_the_gpus() -> None:
    from supervisor.cluster.node import NodeError, plan_join
    from supervisor.config.cluster_launch import gpu_resource

    nvml = lambda: (0, 1, 2, 3)
    join = plan_join("10.0.0.1:6379", "gpu-a", None, None, detect=nvml)
    assert join.gpus == (0, 1, 2, 3) and join.resources() == {gpu_resource(g): 1.0 for g in range(4)}
    argv = join.argv("/py")
    assert (
        argv[:8]
        == [
            "/py",
            "-m",
            "ray.scripts.scripts",
            "start",
            "--address",
            "10.0.0.1:6379",
            "--block",
            "--num-gpus",
        ]
        and argv[8] == "4"
    )
    assert argv[argv.index("--labels") + 1] == "msup-node=gpu-a"
    assert plan_join("h:1", None, None, 2, detect=nvml).gpus == (0, 1)  # the first N
    assert plan_join("h:1", None, "1,0", None, detect=lambda: pytest.fail("NVML asked")).gpus == (0, 1)
    assert plan_join("h:1", None, None, 0, detect=lambda: pytest.fail("NVML asked")).gpus == ()
    assert "--labels" not in plan_join("h:1", None, "none", None).argv("/py")
    for bad, words in [
        (("h:1", "GPU_A", "0", None), "--label 'GPU_A' is not a node label"),
        (("h:1", None, "0,x", None), "--gpus '0,x'"),
        (("h:1", None, "0,0", None), "distinct"),
        (("h:1", None, "0", 1), "give one of them"),
        (("h:1", None, None, 5), "NVML reports 4"),
        (("", None, "0", None), "--address"),
    ]:
        with pytest.raises(NodeError, match=words):
            plan_join(*bad, detect=nvml)


@pytest.mark.slow
def test_node_command_without_nvml_says_what_to_pass() -> None:
    out = subprocess.run(
        [PY, "-m", "supervisor", "node", "--address", "127.0.0.1:1", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LD_LIBRARY_PATH": "/nonexistent"},
    )
    if out.returncode == 0:
        pytest.skip("this machine has NVML: the command read its GPUs")
    assert out.returncode == 2 and "--gpus 0,1" in out.stderr and "--num-gpus 0" in out.stderr, out.stderr


# -- the real cluster ------------------------------------------------------------------------
try:
    import ray  # noqa: F401 - is Ray installed?

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False

needs_ray = pytest.mark.skipif(
    not HAVE_RAY and not os.environ.get("MODEL_SUPERVISOR_TEST_REQUIRE_RAY"),
    reason="Ray is not installed (pip install 'model-supervisor[ray]')",
)

# Ray starts a worker process per actor: minutes, not seconds, on a loaded 2-core machine.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def rig():
    if not HAVE_RAY:
        pytest.fail("MODEL_SUPERVISOR_TEST_REQUIRE_RAY is set but Ray is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="msr", dir="/tmp"))  # short: unix socket paths
    os.environ["RAY_TMPDIR"] = str(tmp)
    from .ray_rig import ray_pids, rig_python, start_cluster

    began = time.monotonic()
    cluster, nodes = start_cluster(tmp, [("gpu-a", [0, 1]), ("gpu-b", [0, 1])])
    print(f"cluster up in {time.monotonic() - began:.1f} s")
    pids = ray_pids(cluster)
    try:
        yield {"cluster": cluster, "nodes": nodes, "python": rig_python(tmp), "tmp": tmp}
    finally:
        pids |= ray_pids(cluster)
        cluster.shutdown()
        deadline = time.monotonic() + 60  # Ray's processes end slowly on a loaded machine
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
        left = [p for p in pids if alive(p)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"the cluster left processes behind: {left}"


def cluster_settings(tmp_path: Path, rig: dict, monkeypatch: pytest.MonkeyPatch, **extra):
    for key in list(os.environ):
        if key.startswith("MODEL_SUPERVISOR_"):
            monkeypatch.delenv(key)
    (tmp_path / "conf.d").mkdir(exist_ok=True)
    values = dict(
        conf_dir=tmp_path / "conf.d",
        state_dir=tmp_path / "state",
        port_range=free_range(),
        cluster="ray",
        ray_address=rig["cluster"].address,
        ray_python=str(rig["python"]),
        ray_placement_timeout=90.0,
        ray_unreachable_grace=20.0,
        gpu_source="none",
    )
    values.update(extra)
    return load_settings(**values)


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.split("=", 1) for item in f.read().decode().split("\0") if "=" in item)


class Tracker:
    """Every backend pid and actor pid a test saw: none may be alive at its end."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def add(self, engine: Engine) -> None:
        for inst in engine.instances.values():
            handle = inst._handle
            if handle is not None and handle.pid:
                self.pids.add(handle.pid)

    def check(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(alive(p) for p in self.pids):
            time.sleep(0.05)
        left = sorted(p for p in self.pids if alive(p))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"left running: {left}"


async def started(tmp_path, rig, monkeypatch, docs, **extra) -> Engine:
    settings = cluster_settings(tmp_path, rig, monkeypatch, **extra)
    for doc in docs:
        write_decl(settings.conf_dir, doc)
    engine = build(settings).engine
    await engine.start()
    return engine


def handle_of(engine: Engine, iid: str):
    return engine.instances[iid]._handle


async def running(engine: Engine, iid: str, track: Tracker):
    """Instance `iid` once it is declared (it may wait for the nodes' GPUs: each node's agent is
    a Ray worker to start first, slow on a loaded machine) and RUNNING; tracked."""
    await wait_until(lambda: iid in engine.instances, 240)
    inst = engine.instances[iid]
    await inst.wait_state(State.RUNNING, timeout=180)
    track.add(engine)
    return inst


@pytest.mark.slow
@needs_ray
async def test_placement_by_label_and_free_gpus_with_exact_gpu_ids(tmp_path, rig, monkeypatch) -> None:
    docs = [
        declaration("pinned", demo_cmd(), node="gpu-a", gpus=[1], health=HEALTH),
        declaration("cpu", demo_cmd(), node="gpu-b", health=HEALTH),
    ]
    engine = await started(tmp_path, rig, monkeypatch, docs)
    track = Tracker()
    try:
        ids = ["pinned@gpu-a:gpu1", "anywhere@gpu1", "cpu@gpu-b:cpu"]
        began = time.monotonic()
        for iid in ids[::2]:
            await engine.instances[iid].wait_state(State.RUNNING, timeout=180)
        print(f"2 instances RUNNING on their nodes in {time.monotonic() - began:.2f} s")
        # Declared after `pinned` runs; it keeps off gpu-a anyway (a declaration pinned there
        # names GPU 1: test_an_unpinned_run_keeps_off_the_gpus_pinned_declarations_name).
        write_decl(engine.settings.conf_dir, declaration("anywhere", demo_cmd(), gpus=[1], health=HEALTH))
        await engine.reload("test")
        assert sorted(engine.instances) == sorted(ids)
        await engine.instances[ids[1]].wait_state(State.RUNNING, timeout=180)
        track.add(engine)
        pinned, anywhere, cpu = (handle_of(engine, i) for i in ids)
        assert pinned.node == "gpu-a" and cpu.node == "gpu-b"
        assert anywhere.node == "gpu-b"  # GPU 1 of gpu-a is taken by `pinned`
        assert engine.instances[ids[1]].snapshot()["node"] == "gpu-b"  # where it was placed, not declared
        env = environ(pinned.pid)
        assert (env["CUDA_VISIBLE_DEVICES"], env["NVIDIA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"]) == (
            "1",
            "1",
            "PCI_BUS_ID",
        )  # the declared id, not the one Ray chose (0)
        assert env[MARK_ENV].startswith(f"{scope_of(engine.settings.state_dir)}:{pinned.token}:")
        assert environ(anywhere.pid)["CUDA_VISIBLE_DEVICES"] == "1"
        assert environ(cpu.pid)["CUDA_VISIBLE_DEVICES"] == ""
        assert not any(k.startswith("RAY_") for k in env)
        # Its log is written on the node (here: the same path the supervisor reads).
        assert "starting pinned@gpu-a:gpu1" in engine.instances[ids[0]].log_file.path.read_text()
    finally:
        await asyncio.wait_for(engine.shutdown(), 180)
    track.check()


@pytest.mark.slow
@needs_ray
def test_node_command_joins_with_its_gpus_and_label_and_leaves_nothing(tmp_path, rig) -> None:
    cluster = rig["cluster"]
    state = cluster.global_state

    def joined() -> list[dict]:
        return [
            n
            for n in state.node_table()
            if n.get("Alive") and (n.get("Labels") or {}).get("msup-node") == "gpu-x"
        ]

    log = open(tmp_path / "node.log", "wb")
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "supervisor",
            "node",
            "--address",
            cluster.address,
            "--label",
            "gpu-x",
            "--gpus",
            "0,1",
            "--num-cpus",
            "1",
            "--node-ip-address",
            "127.0.0.1",
            "--ray-python",
            str(rig["python"]),
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pids: set[int] = set()
    try:
        began = time.monotonic()
        deadline = began + 60
        while not joined():
            assert proc.poll() is None, (tmp_path / "node.log").read_text()
            assert time.monotonic() < deadline, state.node_table()
            time.sleep(0.2)
        print(f"node joined in {time.monotonic() - began:.1f} s")
        (node,) = joined()
        resources = node["Resources"]
        assert (
            resources.get("msup_gpu_0") == 1
            and resources.get("msup_gpu_1") == 1
            and resources.get("GPU") == 2
        )
        assert not any(k.startswith("msup_gpu_") and k not in ("msup_gpu_0", "msup_gpu_1") for k in resources)
        pids = descendants(proc.pid) | {proc.pid}
        assert len(pids) > 2  # the raylet and its agents, below the pid the command became
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) is not None
        wait_for_dead(pids, 60)
        deadline = time.monotonic() + 20
        while joined():  # the head hears of it: gone from the cluster too
            assert time.monotonic() < deadline, state.node_table()
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        wait_for_dead(pids, 60)  # before the leftover check of the test's teardown
        log.close()


@pytest.mark.slow
@needs_ray
async def test_the_node_shows_in_api_status_metrics_events_and_cli(tmp_path, rig, monkeypatch) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from supervisor.cli.remote import _status_table

    from .api_helpers import running_api

    settings = cluster_settings(tmp_path, rig, monkeypatch)
    write_decl(settings.conf_dir, declaration("shown", demo_cmd(), node="gpu-a", gpus=[1], health=HEALTH))
    write_decl(settings.conf_dir, declaration("here", demo_cmd(), node="local", health=HEALTH))
    track = Tracker()
    async with running_api(settings) as api:  # its teardown stops the engine
        for iid in ("shown@gpu-a:gpu1", "here@cpu"):
            await api.engine.instances[iid].wait_state(State.RUNNING, timeout=180)
        track.add(api.engine)
        items = {it["instance_id"]: it for it in (await api.get("/api/v1/models/status")).json()}
        assert items["shown@gpu-a:gpu1"]["node"] == "gpu-a" and items["here@cpu"]["node"] is None
        assert (await api.get("/api/v1/models/status/shown")).json()[0]["node"] == "gpu-a"
        text = (await api.get("/metrics")).text
        ready = {
            s.labels["instance"]: s.labels["node"]
            for f in text_string_to_metric_families(text)
            if f.name == "model_supervisor_instance_ready"
            for s in f.samples
        }
        assert ready == {"shown@gpu-a:gpu1": "gpu-a", "here@cpu": ""}
        running = [
            e.data for e in api.engine.bus.history if e.type == "transition" and e.data["to"] == "RUNNING"
        ]
        assert {e["instance"]: e.get("node") for e in running} == {
            "shown@gpu-a:gpu1": "gpu-a",
            "here@cpu": None,
        }
        header, *rows = _status_table(list(items.values())).splitlines()
        assert header.split()[:3] == ["INSTANCE", "STATE", "NODE"]
        assert sorted(r.split()[:3] for r in rows) == [
            ["here@cpu", "RUNNING", "-"],
            ["shown@gpu-a:gpu1", "RUNNING", "gpu-a"],
        ]
    track.check()


@pytest.mark.slow
@needs_ray
async def test_exit_of_a_remote_backend_restarts_it_under_its_policy(tmp_path, rig, monkeypatch) -> None:
    doc = declaration("crashy", demo_cmd(), node="gpu-a", gpus=[0], health=HEALTH, restart=FAST_RESTART)
    engine = await started(tmp_path, rig, monkeypatch, [doc])
    track = Tracker()
    try:
        inst = engine.instances["crashy@gpu-a:gpu0"]
        await inst.wait_state(State.RUNNING, timeout=180)
        first = inst.pid
        track.add(engine)
        killed = time.monotonic()
        os.kill(first, signal.SIGKILL)
        await inst.wait_for(lambda i: i.state != State.RUNNING, timeout=30)
        noticed = time.monotonic() - killed
        await inst.wait_for(lambda i: i.state == State.RUNNING and i.pid != first, timeout=180)
        track.add(engine)
        print(f"exit noticed after {noticed * 1000:.1f} ms")
        assert any("exited unexpectedly (killed by SIGKILL)" in t.reason for t in inst.history)
        assert inst.restarts == 1 and handle_of(engine, inst.id).node == "gpu-a"
    finally:
        await asyncio.wait_for(engine.shutdown(), 180)
    track.check()


@pytest.mark.slow
@needs_ray
async def test_stop_leaves_nothing_not_even_a_setsid_grandchild(tmp_path, rig, monkeypatch) -> None:
    pidfile = tmp_path / "grandchild.pid"
    doc = declaration(
        "tree",
        demo_cmd(
            "--spawn-grandchild",
            "--grandchild-setsid",
            "--grandchild-pidfile",
            str(pidfile),
            "--ignore-sigterm",
        ),
        node="gpu-b",
        gpus=[0],
        health=HEALTH,
        stop={"timeout": 1.0},
    )
    engine = await started(tmp_path, rig, monkeypatch, [doc])
    track = Tracker()
    try:
        inst = engine.instances["tree@gpu-b:gpu0"]
        await inst.wait_state(State.RUNNING, timeout=180)
        await wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 30)
        grandchild = int(pidfile.read_text())
        leader = inst.pid
        actor_pid = None
        track.add(engine)
        track.pids.add(grandchild)
        assert os.getsid(grandchild) != os.getsid(leader)  # it left the backend's session
        info = await engine.runners["ray"].client.call("attach", name=inst.id, label_key="msup-node")
        actor_pid = info["actor_pid"]
        track.pids.add(actor_pid)
        await asyncio.wait_for(inst.stop(), 90)
        assert inst.state == State.STOPPED
        assert inst.last_exit.signal == signal.SIGKILL  # it ignored SIGTERM for stop.timeout
        assert not alive(leader) and not alive(grandchild)
        await wait_until(lambda: not alive(actor_pid), 30)  # the actor went after the backend
        assert await engine.runners["ray"].client.call("list") == []
    finally:
        await asyncio.wait_for(engine.shutdown(), 180)
    track.check()


@pytest.mark.slow
@needs_ray
def test_a_second_supervisor_adopts_the_runs_by_actor_name(tmp_path, rig, monkeypatch) -> None:
    settings = cluster_settings(tmp_path, rig, monkeypatch)
    conf, state = settings.conf_dir, settings.state_dir
    write_decl(conf, declaration("keep", demo_cmd(), node="gpu-a", gpus=[0], health=HEALTH))
    write_decl(conf, declaration("keep2", demo_cmd(), gpus=[1], health=HEALTH))
    file = tmp_path / "settings.toml"
    file.write_text(
        f'cluster = "ray"\nray_address = "{rig["cluster"].address}"\nray_python = "{rig["python"]}"\n'
        'gpu_source = "none"\nray_placement_timeout = 90.0\n'
    )
    ids = {"keep@gpu-a:gpu0": "RUNNING", "keep2@gpu1": "RUNNING"}
    first = Serve(conf, state, "--settings", str(file), port_range=settings.port_range)
    second = None
    pids: set[int] = set()
    try:
        before = first.wait_states(ids, timeout=90)
        pids = {before[i]["pid"] for i in ids}
        first.kill()  # SIGKILL: the detached actors and their backends live on
        assert all(alive(p) for p in pids)
        second = Serve(conf, state, "--settings", str(file), port_range=settings.port_range)
        began = time.monotonic()
        after = second.wait_states(ids, timeout=90)
        print(f"adopted after a SIGKILL of serve in {time.monotonic() - began:.2f} s (API start included)")
        assert {after[i]["pid"] for i in ids} == pids  # the same backends: nothing restarted
        assert all(after[i]["restarts"] == 0 for i in ids)
        assert all("adopted" in (after[i]["reason"] or "") for i in ids), after
        assert second.terminate(60) == 0
        second = None
        wait_for_dead(pids, 45)
    finally:
        for s in (first, second):
            if s is not None and s.proc.poll() is None:
                s.terminate(60)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        wait_for_dead(pids, 60)  # before the leftover check of the test's teardown


def wait_for_dead(pids: set[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(alive(p) for p in pids), f"still running: {[p for p in pids if alive(p)]}"


@pytest.mark.slow
@needs_ray
async def test_driver_killed_reattaches_without_restarting_the_backend(tmp_path, rig, monkeypatch) -> None:
    doc = declaration("steady", demo_cmd(), node="gpu-a", gpus=[0], health=HEALTH, restart=FAST_RESTART)
    engine = await started(tmp_path, rig, monkeypatch, [doc])
    track = Tracker()
    try:
        inst = engine.instances["steady@gpu-a:gpu0"]
        await inst.wait_state(State.RUNNING, timeout=180)
        pid = inst.pid
        track.add(engine)
        client = engine.runners["ray"].client
        os.kill(client.driver_pid, signal.SIGKILL)
        await wait_until(lambda: client.connects == 2 and client.up, 90)
        # The re-attach call clears the give-up the lost driver started (awaited, not slept for);
        # then a second passes in which nothing restarts it.
        await wait_until(lambda: handle_of(engine, inst.id)._grace is None, 90)
        await asyncio.sleep(1.0)
        assert inst.state == State.RUNNING and inst.pid == pid and inst.restarts == 0
        assert handle_of(engine, inst.id)._grace is None  # re-attached, no pending give-up
    finally:
        await asyncio.wait_for(engine.shutdown(), 180)
    track.check()


@pytest.mark.slow
@needs_ray
async def test_unreachable_cluster_backs_off_with_that_reason_and_local_runs_are_untouched(
    tmp_path, rig, monkeypatch
) -> None:
    docs = [
        declaration(
            "remote",
            demo_cmd(),
            node="gpu-a",
            gpus=[0],
            health=HEALTH,
            restart={**FAST_RESTART, "max_retries": 1},
        ),
        declaration("here", demo_cmd(), node="local", health=HEALTH),
    ]
    # Nothing listens there: ray.init would retry for ever; the helper is given up on instead.
    engine = await started(
        tmp_path, rig, monkeypatch, docs, ray_address=f"127.0.0.1:{free_port()}", ray_placement_timeout=2.0
    )
    try:
        here = engine.instances["here@cpu"]
        await here.wait_state(State.RUNNING, timeout=90)
        remote = engine.instances["remote@gpu-a:gpu0"]
        await remote.wait_for(lambda i: any(t.to_state == State.BACKOFF for t in i.history), timeout=180)
        reason = next(t.reason for t in remote.history if t.to_state == State.BACKOFF)
        assert "could not start: cluster unreachable: no connection to the Ray head at 127.0.0.1:" in reason
        assert "not counted as a failure" in reason
        # An outage is not the model's fault: past max_retries it keeps waiting, never FATAL.
        await remote.wait_for(lambda i: sum(t.to_state == State.BACKOFF for t in i.history) >= 2, timeout=180)
        assert remote.failures == 0 and not any(t.to_state == State.FATAL for t in remote.history)
        assert here.state == State.RUNNING and here.restarts == 0
    finally:
        await asyncio.wait_for(engine.shutdown(), 180)


@pytest.mark.slow
@needs_ray
async def test_a_removed_worker_fails_its_runs_and_unpinned_ones_are_replaced(
    tmp_path, rig, monkeypatch
) -> None:
    from .ray_rig import node_args

    cluster = rig["cluster"]
    extra = {label: cluster.add_node(**node_args(label, [2], rig["tmp"])) for label in ("gpu-c", "gpu-d")}
    cluster.wait_for_nodes()
    engine = await started(
        tmp_path,
        rig,
        monkeypatch,
        [declaration("mobile", demo_cmd(), gpus=[2], health=HEALTH, restart=FAST_RESTART)],
    )
    track = Tracker()
    removed = None
    try:
        mobile = engine.instances["mobile@gpu2"]
        await mobile.wait_state(State.RUNNING, timeout=180)
        track.add(engine)
        old = handle_of(engine, mobile.id)
        first_node, old_pid = old.node, old.pid
        assert first_node in extra
        # A second model pinned to the node that is about to go.
        write_decl(
            engine.settings.conf_dir,
            declaration(
                "pinned",
                demo_cmd(),
                node=first_node,
                health=HEALTH,
                restart={**FAST_RESTART, "initial_delay": 1.0},
            ),
        )
        await engine.reload("test")
        pinned = engine.instances[f"pinned@{first_node}:cpu"]
        await pinned.wait_state(State.RUNNING, timeout=180)
        track.add(engine)
        removed = extra.pop(first_node)
        began = time.monotonic()
        cluster.remove_node(removed)
        await mobile.wait_for(lambda i: i.state == State.RUNNING and i.pid != old_pid, timeout=180)
        print(f"re-placed on another node {time.monotonic() - began:.2f} s after the node was removed")
        track.add(engine)
        assert handle_of(engine, mobile.id).node != first_node
        assert any(f"lost on node {first_node}" in t.reason for t in mobile.history), list(mobile.history)
        assert not alive(old_pid)  # the orphan of the lost run was reaped (its node is this machine)
        await pinned.wait_for(lambda i: i.state in (State.BACKOFF, State.FATAL), timeout=90)
        assert any(f"lost on node {first_node}" in t.reason for t in pinned.history), [
            t.reason for t in pinned.history
        ]
    finally:
        await asyncio.wait_for(engine.shutdown(), 180)
        for node in extra.values():
            cluster.remove_node(node)
    track.check()


# -- node agents: GPUs, ownership, strays, probes, logs, the reaper, the GPU gate ----------------
def write_gpus(path: Path, gpus: dict[int, dict]) -> None:
    """A simulated GPU file: {index: {"used": MiB or None, "processes": [(pid, MiB)]}}."""
    lines = []
    for index, gpu in sorted(gpus.items()):
        lines += ["[[gpu]]", f"index = {index}", "memory_total_mib = 10000"]
        if gpu.get("used") is not None:
            lines.append(f"memory_used_mib = {gpu['used']}")
        for pid, mib in gpu.get("processes", ()):
            lines += ["[[gpu.process]]", f"pid = {pid}", f"used_memory_mib = {mib}"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)  # the agent reads it again on every sample: never half a file


def simulated_nodes(tmp_path: Path) -> dict:
    for label in ("local", "gpu-a", "gpu-b"):
        write_gpus(tmp_path / f"gpus-{label}.toml", {0: {}, 1: {}})
    return {
        "gpu_source": "simulated",
        "gpu_simulated_file": tmp_path / "gpus-{node}.toml",
        "gpu_sample_interval": 0.25,
    }


@pytest.mark.slow
@needs_ray
async def test_node_agents_report_gpus_owners_strays_and_probes_and_logs_run_on_the_node(
    tmp_path, rig, monkeypatch
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from supervisor.adapters.runners.ray import RemoteLog

    from .api_helpers import running_api

    settings = cluster_settings(tmp_path, rig, monkeypatch, **simulated_nodes(tmp_path))
    write_decl(settings.conf_dir, declaration("seen", demo_cmd(), node="gpu-a", gpus=[1], health=HEALTH))
    write_decl(
        settings.conf_dir,
        declaration(
            "sick",
            demo_cmd("--unhealthy-after", "1"),
            node="gpu-b",
            gpus=[1],
            health={**HEALTH, "failure_threshold": 1},
            restart={**FAST_RESTART, "initial_delay": 30.0},
        ),
    )
    stranger = subprocess.Popen([PY, "-c", "import time; time.sleep(120)"])  # no run mark: a stray
    track = Tracker()
    track.pids.add(stranger.pid)
    try:
        async with running_api(settings) as api:
            seen, sick = api.engine.instances["seen@gpu-a:gpu1"], api.engine.instances["sick@gpu-b:gpu1"]
            await seen.wait_state(State.RUNNING, timeout=180)
            track.add(api.engine)
            # The readiness probe ran in the actor, on its node's loopback.
            assert seen.last_probe == "GET /health -> 200 (on node gpu-a)"
            # So does liveness: the backend turns unhealthy after 1 s and is stopped for it.
            await sick.wait_for(lambda i: any("unhealthy" in t.reason for t in i.history), timeout=180)
            track.add(api.engine)
            reason = next(t.reason for t in sick.history if "unhealthy" in t.reason)
            assert "GET /health -> 503 (on node gpu-a)" not in reason and "(on node gpu-b)" in reason, reason

            write_gpus(tmp_path / "gpus-gpu-a.toml", {0: {}, 1: {"processes": [(seen.pid, 2048)]}})
            write_gpus(tmp_path / "gpus-gpu-b.toml", {0: {"processes": [(stranger.pid, 512)]}, 1: {}})

            async def gpus() -> dict:
                return {(g["node"], g["id"]): g for g in (await api.get("/api/v1/gpus")).json()}

            deadline = time.monotonic() + 15
            while not (await gpus())[("gpu-a", 1)]["processes"] and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            by = await gpus()
            assert set(by) == {(None, 0), (None, 1), ("gpu-a", 0), ("gpu-a", 1), ("gpu-b", 0), ("gpu-b", 1)}
            assert [
                (p["pid"], p["instance_id"], p["gpu_memory_usage"]) for p in by[("gpu-a", 1)]["processes"]
            ] == [(seen.pid, "seen@gpu-a:gpu1", 2048)]
            assert by[("gpu-a", 1)]["simulated"] is True and by[("gpu-a", 1)]["memory_used"] == 2048
            items = {it["instance_id"]: it for it in (await api.get("/api/v1/models/status")).json()}
            assert items["seen@gpu-a:gpu1"]["gpu_memory_mib"] == 2048  # from its node's sample
            metrics = list(text_string_to_metric_families((await api.get("/metrics")).text))
            used = {
                (s.labels["node"], s.labels["gpu"]): s.value
                for f in metrics
                if f.name == "model_supervisor_gpu_memory_used_bytes"
                for s in f.samples
            }
            assert used[("gpu-a", "1")] == 2048 * 2**20 and ("", "0") in used and ("gpu-b", "1") in used
            mine = {
                s.labels["instance"]: s.value
                for f in metrics
                if f.name == "model_supervisor_instance_gpu_memory_bytes"
                for s in f.samples
            }
            assert mine["seen@gpu-a:gpu1"] == 2048 * 2**20
            await wait_until(lambda: bool(api.engine.runners["ray"].nodes.strays()), 45)
            strays = (await api.get("/api/v1/gpus/strays")).json()
            assert [(s["node"], s["gpu"], s["pid"]) for s in strays] == [("gpu-b", 0, stranger.pid)]
            nodes = {n["node"]: n for n in (await api.get("/healthz")).json()["nodes"]}
            assert nodes["gpu-a"]["gpu_source"] == "simulated" and nodes["gpu-a"]["gpus"] == 2

            # Its log lives on the node and is read by the node's agent, tail and follow.
            assert isinstance(api.engine.log_reader(seen.id, seen.log_file), RemoteLog)
            got = await api.get(f"/api/v1/instances/{seen.id}/logs?tail=50")
            assert got.status_code == 200 and "starting seen@gpu-a:gpu1" in got.text
            async with api.client.stream(
                "GET", f"/api/v1/instances/{seen.id}/logs?tail=1&follow=true"
            ) as stream:
                chunks = stream.aiter_text()
                await asyncio.wait_for(chunks.__anext__(), 30)
                with open(seen.log_file.path, "a") as f:
                    f.write("a line the backend wrote on its node\n")
                text = ""
                while "a line the backend wrote" not in text:
                    text += await asyncio.wait_for(chunks.__anext__(), 30)
    finally:
        stranger.kill()
        stranger.wait()
    track.check()


@pytest.mark.slow
@needs_ray
async def test_a_nodes_strays_are_killed_there_by_policy_or_through_the_api(
    tmp_path, rig, monkeypatch
) -> None:
    from .api_helpers import running_api

    extra = simulated_nodes(tmp_path)
    settings = cluster_settings(
        tmp_path, rig, monkeypatch, **extra, strays_per_gpu={1: "kill"}, strays_kill_after=1.0
    )
    write_decl(settings.conf_dir, declaration("own", demo_cmd(), node="gpu-a", gpus=[0], health=HEALTH))
    sleep = [PY, "-c", "import time; time.sleep(120)"]
    reported, doomed, unrelated = (subprocess.Popen(sleep) for _ in range(3))
    track = Tracker()
    track.pids |= {reported.pid, doomed.pid, unrelated.pid}
    try:
        async with running_api(settings) as api:
            events = api.engine.bus.open()
            own = api.engine.instances["own@gpu-a:gpu0"]
            await own.wait_state(State.RUNNING, timeout=180)
            track.add(api.engine)
            write_gpus(tmp_path / "gpus-gpu-a.toml", {0: {"processes": [(own.pid, 1024)]}, 1: {}})
            # GPU 0 of gpu-b: reported only; GPU 1: "kill" after 1 s.
            write_gpus(
                tmp_path / "gpus-gpu-b.toml",
                {0: {"processes": [(reported.pid, 256)]}, 1: {"processes": [(doomed.pid, 512)]}},
            )
            await wait_until(lambda: doomed.poll() is not None, 60)
            assert doomed.returncode == -signal.SIGTERM  # by gpu-b's agent, on its own
            seen: dict[str, list[dict]] = {}
            while "stray_killed" not in seen:
                event = await asyncio.wait_for(events.get(), 30)
                seen.setdefault(event.type, []).append(event.data)
            assert {(e["node"], e["gpu"], e["pid"]) for e in seen["stray"]} >= {
                ("gpu-b", 0, reported.pid),
                ("gpu-b", 1, doomed.pid),
            }
            assert seen["stray_killed"] == [
                {"pid": doomed.pid, "gpu": 1, "node": "gpu-b", "how": "terminated"}
            ]
            strays = {s["pid"]: s for s in (await api.get("/api/v1/gpus/strays")).json()}
            assert (
                strays[reported.pid]["node"],
                strays[reported.pid]["policy"],
                strays[reported.pid]["action"],
            ) == ("gpu-b", "report", "reported")
            assert strays[reported.pid]["user"]  # its user on the node, for strays_allow_users
            assert own.pid not in strays and own.state == State.RUNNING
            # Through the API, judged on the node by the local rules.
            got = await api.delete(f"/api/v1/processes/{unrelated.pid}?node=gpu-b")
            assert got.status_code == 403 and "neither using a GPU" in got.json()["detail"], got.text
            assert "on node gpu-b" in got.json()["detail"] and unrelated.poll() is None
            got = await api.delete(f"/api/v1/processes/{reported.pid}?node=gpu-c")
            assert got.status_code == 404 and "no node 'gpu-c'" in got.json()["detail"], got.text
            got = await api.delete(f"/api/v1/processes/{reported.pid}?node=gpu-b")
            assert got.status_code == 200, got.text
            body = got.json()
            assert (body["status"], body["node"], body["instance_id"]) == ("killed", "gpu-b", None)
            assert (
                "is a GPU process that belongs to no supervised instance (on node gpu-b)" in body["message"]
            )
            assert reported.poll() == -signal.SIGTERM  # the API answers once it is gone
            assert own.state == State.RUNNING and unrelated.poll() is None
            events.close()
    finally:
        for proc in (reported, doomed, unrelated):
            proc.kill()
            proc.wait()
    track.check()


@pytest.mark.slow
@needs_ray
async def test_the_reaper_stops_a_run_no_instance_owns_and_spares_live_ones(
    tmp_path, rig, monkeypatch
) -> None:
    from supervisor.adapters.marks import new_token

    docs = [
        declaration("live", demo_cmd(), node="gpu-a", gpus=[0], health=HEALTH),
        declaration("here", demo_cmd(), node="local", health=HEALTH),
    ]
    engine = await started(tmp_path, rig, monkeypatch, docs, gpu_sample_interval=0.25)
    track = Tracker()
    ghost = None
    try:
        live, here = engine.instances["live@gpu-a:gpu0"], engine.instances["here@cpu"]
        await live.wait_state(State.RUNNING, timeout=180)
        await here.wait_state(State.RUNNING, timeout=180)
        track.add(engine)
        pids = (live.pid, here.pid)
        # What a lost node leaves when it comes back: a backend of an earlier run, in its own
        # session, with our scope's mark, that no instance owns (started after the start-up sweep).
        mark = f"{scope_of(engine.settings.state_dir)}:{new_token()}:ghost@gpu-a:gpu0"
        ghost = subprocess.Popen(
            [PY, "-c", "import time; time.sleep(120)"],
            start_new_session=True,
            env={**os.environ, MARK_ENV: mark},
        )
        track.pids.add(ghost.pid)
        began = time.monotonic()
        await wait_until(lambda: ghost.poll() is not None, 90)
        print(f"unowned run reaped {time.monotonic() - began:.2f} s after it appeared")
        await wait_until(
            lambda: any(e.type == "reaped" for e in engine.bus.history), 10
        )  # once the call returns
        reaped = [e.data for e in engine.bus.history if e.type == "reaped"]
        assert [r["instance"] for r in reaped] == ["ghost@gpu-a:gpu0"]
        assert ghost.pid in sum(reaped[0]["stopped"].values(), [])
        assert (live.pid, here.pid) == pids and live.state == here.state == State.RUNNING
        assert live.restarts == here.restarts == 0
    finally:
        await asyncio.wait_for(engine.shutdown(), 180)
        if ghost is not None and ghost.poll() is None:
            ghost.kill()
            ghost.wait()
    track.check()


@pytest.mark.slow
@needs_ray
async def test_a_remote_restart_waits_until_its_node_releases_the_gpu(tmp_path, rig, monkeypatch) -> None:
    gpu_a = tmp_path / "gpus-gpu-a.toml"
    doc = declaration("gated", demo_cmd(), node="gpu-a", gpus=[0], health=HEALTH, restart=FAST_RESTART)
    engine = await started(
        tmp_path, rig, monkeypatch, [doc], gpu_release_timeout=30.0, **simulated_nodes(tmp_path)
    )
    track = Tracker()
    try:
        inst = engine.instances["gated@gpu-a:gpu0"]
        nodes = engine.runners["ray"].nodes
        await inst.wait_state(State.RUNNING, timeout=180)
        track.add(engine)
        first = inst.pid
        write_gpus(gpu_a, {0: {"used": 6000, "processes": [(first, 6000)]}, 1: {}})
        await wait_until(lambda: inst.id in nodes.last_run, 45)
        # It dies; its memory stays held (a worker not gone yet): the restart must wait.
        os.kill(first, signal.SIGKILL)
        await inst.wait_for(lambda i: i.pid != first, timeout=90)
        await inst.wait_state(State.STARTING, timeout=90)  # where the restart waits for the GPU
        await asyncio.sleep(2.0)  # samples of memory still held: it must not have started
        assert inst.state == State.STARTING and inst.pid is None, (inst.state, inst.pid)
        released = time.monotonic()
        write_gpus(gpu_a, {0: {}, 1: {}})
        await inst.wait_for(lambda i: i.state == State.RUNNING and i.pid not in (None, first), timeout=90)
        print(f"restarted {time.monotonic() - released:.2f} s after its node released the GPU")
        track.add(engine)
        assert inst.restarts == 1
    finally:
        await asyncio.wait_for(engine.shutdown(), 180)
    track.check()


@pytest.mark.slow
@needs_ray
async def test_actors_of_declarations_removed_while_down_are_stopped_at_start(
    tmp_path, rig, monkeypatch
) -> None:
    docs = [
        declaration("stays", demo_cmd(), node="gpu-a", gpus=[0], health=HEALTH),
        declaration("gone", demo_cmd(), node="gpu-b", gpus=[0], health=HEALTH),
        declaration("norecord", demo_cmd(), node="gpu-b", health=HEALTH),
        declaration("off", demo_cmd(), node="gpu-a", health=HEALTH),
    ]
    engine = await started(tmp_path, rig, monkeypatch, docs)
    track = Tracker()
    second = None
    try:
        ids = ["stays@gpu-a:gpu0", "gone@gpu-b:gpu0", "norecord@gpu-b:cpu", "off@gpu-a:cpu"]
        for iid in ids:
            await engine.instances[iid].wait_state(State.RUNNING, timeout=180)
        track.add(engine)
        pids = {iid: engine.instances[iid].pid for iid in ids}
        conf, state = engine.settings.conf_dir, engine.settings.state_dir
        await asyncio.wait_for(engine.shutdown(keep_running=True), 180)  # an upgrade: all left running
        assert all(alive(p) for p in pids.values())
        # While it is down: one declaration removed, one removed and its run record lost too,
        # one disabled.
        (conf / "gone.toml").unlink()
        (conf / "norecord.toml").unlink()
        (state / "run" / "norecord@gpu-b:cpu.json").unlink()
        write_decl(conf, declaration("off", demo_cmd(), node="gpu-a", health=HEALTH, enabled=False))
        second = build(engine.settings).engine
        await second.start()
        stays = second.instances["stays@gpu-a:gpu0"]
        await stays.wait_state(State.RUNNING, timeout=180)
        assert stays.pid == pids["stays@gpu-a:gpu0"] and stays.restarts == 0  # adopted
        client = second.runners["ray"].client
        deadline = time.monotonic() + 30
        while await client.call("list") != ["stays@gpu-a:gpu0"] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await client.call("list") == ["stays@gpu-a:gpu0"]
        wait_for_dead({pids[i] for i in ids[1:]}, 45)
        # The first engine's objects still live in this process: having left the cluster, they
        # must never judge (probe) or reap the runs they left behind.
        await asyncio.sleep(2.0)
        assert stays.state == State.RUNNING and stays.pid == pids["stays@gpu-a:gpu0"] and stays.restarts == 0
    finally:
        if second is not None:
            await asyncio.wait_for(second.shutdown(), 180)
        else:
            await asyncio.wait_for(engine.shutdown(), 180)
    track.check()


@pytest.mark.slow
@needs_ray
def test_the_dashboard_shows_each_nodes_gpus_and_where_instances_run(tmp_path, rig, request) -> None:
    """In a real Chromium against a cluster-mode `serve`: one card per GPU per node, the owner
    of a remote GPU process, a remote stray highlighted and killed on its node by its agent."""
    from .browser_helpers import Server, browser, demo_declaration, expect

    simulated_nodes(tmp_path)
    stranger = subprocess.Popen([PY, "-c", "import time; time.sleep(120)"])
    server = Server(tmp_path)
    pids: set[int] = {stranger.pid}
    try:
        server.declare(
            demo_declaration("far", node="gpu-a", gpus=[1], port=free_port() - 1)
        )  # base + 1 is free
        server.start(
            MODEL_SUPERVISOR_CLUSTER="ray",
            MODEL_SUPERVISOR_RAY_ADDRESS=rig["cluster"].address,
            MODEL_SUPERVISOR_RAY_PYTHON=str(rig["python"]),
            MODEL_SUPERVISOR_GPU_SOURCE="simulated",
            MODEL_SUPERVISOR_GPU_SIMULATED_FILE=str(tmp_path / "gpus-{node}.toml"),
            MODEL_SUPERVISOR_GPU_SAMPLE_INTERVAL="0.25",
        )
        far = server.wait_state("far@gpu-a:gpu1", "RUNNING", timeout=180)["pid"]
        pids.add(far)
        write_gpus(tmp_path / "gpus-gpu-a.toml", {0: {}, 1: {"processes": [(far, 3072)]}})
        write_gpus(tmp_path / "gpus-gpu-b.toml", {0: {"processes": [(stranger.pid, 256)]}, 1: {}})
        with browser(request, server) as ui:
            page = ui.page
            page.goto(server.url + "/")
            expect(page.locator("article.gpu")).to_have_count(6)  # 2 here, 2 on each node
            card = page.locator('article[data-node="gpu-a"][data-gpu="1"]')
            expect(card.locator(".badge.node")).to_have_text("gpu-a")
            expect(card.locator(f'tr[data-pid="{far}"] .owner')).to_have_text(
                "far@gpu-a:gpu1", timeout=15_000
            )
            stray = page.locator(f'article[data-node="gpu-b"][data-gpu="0"] tr[data-pid="{stranger.pid}"]')
            expect(stray.locator(".owner")).to_have_text("stray", timeout=15_000)
            # Every node's GPUs have their history plots too: loaded, then fed by the node's `gpu` events.
            history = json.loads(server.request("/api/v1/gpus/history")[2])
            mine = next(g for g in history["gpus"] if (g.get("node"), g["id"]) == ("gpu-a", 1))
            assert mine["memory_used"][-1] == 3072 and {g.get("node") for g in history["gpus"]} == {
                None,
                "gpu-a",
                "gpu-b",
            }
            plot = card.locator('svg.plot[data-metric="memory_used"]')
            expect(plot).to_have_attribute("data-last", "3072", timeout=15_000)
            first = int(plot.get_attribute("data-points"))
            write_gpus(tmp_path / "gpus-gpu-a.toml", {0: {}, 1: {"processes": [(far, 4096)]}})
            expect(plot).to_have_attribute("data-last", "4096", timeout=15_000)
            assert int(plot.get_attribute("data-points")) > first
            expect(page.locator("article.gpu .plots")).to_have_count(6)
            expect(ui.row("far@gpu-a:gpu1").locator("[data-field=gpus]")).to_have_text("gpu-a: 1")
            expect(
                card.locator(f'tr[data-pid="{far}"] [data-action=kill]')
            ).to_be_hidden()  # owned: no button
            stray.locator("[data-action=kill]").click()
            expect(page.locator("#confirm-dialog")).to_contain_text(
                f"pid {stranger.pid}) uses GPU 0 of node gpu-b"
            )
            page.click("#confirm-ok")
            assert stranger.wait(timeout=45) == -signal.SIGTERM  # by the agent of gpu-b
            expect(page.locator("#notices .notice").last).to_contain_text("(on node gpu-b)", timeout=10_000)
            assert alive(far)
            assert ui.console_errors == []
    finally:
        server.stop()
        stranger.kill()
        stranger.wait()
    wait_for_dead(pids, 45)


@pytest.mark.slow
@needs_ray
async def test_an_unpinned_run_keeps_off_the_gpus_pinned_declarations_name(
    tmp_path, rig, monkeypatch
) -> None:
    crash = [PY, "-c", "import sys; sys.exit(3)"]
    docs = [
        declaration("blocker", demo_cmd(), node="gpu-b", gpus=[1], health=HEALTH),
        # Pinned to GPU 1 of gpu-a and not running (it crash-loops): its GPU stays reserved.
        declaration("pinned", crash, node="gpu-a", gpus=[1], restart={**FAST_RESTART, "initial_delay": 60.0}),
    ]
    engine = await started(tmp_path, rig, monkeypatch, docs, ray_placement_timeout=30.0)
    track = Tracker()
    try:
        await engine.instances["blocker@gpu-b:gpu1"].wait_state(State.RUNNING, timeout=180)
        track.add(engine)
        write_decl(
            engine.settings.conf_dir,
            declaration(
                "anywhere",
                demo_cmd(),
                gpus=[1],
                health=HEALTH,
                restart={**FAST_RESTART, "initial_delay": 0.5},
            ),
        )
        await engine.reload("test")
        anywhere = engine.instances["anywhere@gpu1"]
        await anywhere.wait_for(lambda i: any(t.to_state == State.BACKOFF for t in i.history), timeout=90)
        track.add(engine)
        reason = next(t.reason for t in anywhere.history if t.to_state == State.BACKOFF)
        assert (
            "no node it may use has GPU 1: on gpu-a, gpu-b a declaration pinned there names it" in reason
        ), reason
        assert not any(t.to_state == State.RUNNING for t in anywhere.history)
        (engine.settings.conf_dir / "blocker.toml").unlink()  # GPU 1 of gpu-b is free now
        await engine.reload("test")
        await anywhere.wait_state(State.RUNNING, timeout=180)
        track.add(engine)
        assert handle_of(engine, anywhere.id).node == "gpu-b"
    finally:
        await asyncio.wait_for(engine.shutdown(), 180)
    track.check()


@pytest.mark.slow
@needs_ray
async def test_gpus_auto_on_a_node_chooses_from_that_nodes_gpus(tmp_path, rig, monkeypatch) -> None:
    extra = simulated_nodes(tmp_path)
    # gpu-a's GPU 0 is nearly full (someone else's memory); GPU 1 has room. This machine's
    # GPUs (gpus-local.toml) are all free: the choice must come from the node's sample.
    write_gpus(tmp_path / "gpus-gpu-a.toml", {0: {"used": 9000}, 1: {"used": 500}})
    docs = [
        declaration("chooser", demo_cmd(), node="gpu-a", gpus="auto", min_free_memory_mb=4000, health=HEALTH),
        declaration("greedy", demo_cmd(), node="gpu-b", gpus="auto", instances=3, health=HEALTH),
    ]
    engine = await started(tmp_path, rig, monkeypatch, docs, **extra)
    track = Tracker()
    try:
        # Settled once the node's agent has reported its GPUs (a reload of its own).
        inst = await running(engine, "chooser@gpu-a:gpu1", track)
        assert environ(inst.pid)["CUDA_VISIBLE_DEVICES"] == "1"
        assert engine.catalog.placements["chooser#0"] == (1,)
        # gpu-b has two GPUs for three exclusive instances: the file is an error naming them.
        errors = [e for e in engine.config_errors() if e["file"].endswith("greedy.toml")]
        assert errors and errors[0]["key"] == "gpus", errors
        assert (
            "cannot place" in errors[0]["message"] and "held by greedy@gpu-b:gpu" in errors[0]["message"]
        ), errors
    finally:
        await asyncio.wait_for(engine.shutdown(), 180)
    track.check()


@pytest.mark.slow
@needs_ray
async def test_gpus_auto_without_node_chooses_a_node_stays_there_and_moves_when_it_leaves(
    tmp_path, rig, monkeypatch
) -> None:
    from .ray_rig import node_args

    cluster = rig["cluster"]
    extra = simulated_nodes(tmp_path)
    # GPU 2 exists on gpu-c and gpu-d only; gpu-c's has the most room, gpu-a and gpu-b are full.
    for label in ("gpu-a", "gpu-b"):
        write_gpus(tmp_path / f"gpus-{label}.toml", {0: {"used": 9900}, 1: {"used": 9900}})
    write_gpus(tmp_path / "gpus-gpu-c.toml", {2: {"used": 1000}})
    write_gpus(tmp_path / "gpus-gpu-d.toml", {2: {"used": 4000}})
    added = {label: cluster.add_node(**node_args(label, [2], rig["tmp"])) for label in ("gpu-c", "gpu-d")}
    cluster.wait_for_nodes()
    doc = declaration(
        "roamer",
        demo_cmd(),
        gpus="auto",
        min_free_memory_mb=3000,
        port="auto",
        health=HEALTH,
        restart=FAST_RESTART,
    )
    engine = await started(tmp_path, rig, monkeypatch, [doc], **extra)
    track = Tracker()
    try:
        inst = await running(engine, "roamer@gpu-c:gpu2", track)
        assert handle_of(engine, inst.id).node == "gpu-c" and environ(inst.pid)["CUDA_VISIBLE_DEVICES"] == "2"
        assert inst.snapshot()["node"] == "gpu-c"
        placements = json.loads((engine.settings.state_dir / "placements.json").read_text())
        assert placements == {"roamer#0": {"node": "gpu-c", "gpus": [2]}}
        old_pid, old_port = inst.pid, inst.spec.port
        # gpu-d has more room now: nothing moves (the model keeps running where it is).
        write_gpus(tmp_path / "gpus-gpu-d.toml", {2: {"used": 0}})
        await engine.reload("test")
        assert list(engine.instances) == ["roamer@gpu-c:gpu2"] and inst.pid == old_pid
        # An upgrade: this supervisor leaves, the next one adopts the run where it was placed,
        # before and after its cluster connection brings the nodes' GPUs.
        await asyncio.wait_for(engine.shutdown(keep_running=True), 180)
        engine = build(engine.settings).engine  # the same state dir and port range
        await engine.start()
        inst = engine.instances["roamer@gpu-c:gpu2"]
        await inst.wait_state(State.RUNNING, timeout=180)
        assert inst.pid == old_pid and inst.restarts == 0
        await asyncio.sleep(1.0)  # the nodes' first samples and the reload they cause
        assert list(engine.instances) == ["roamer@gpu-c:gpu2"] and inst.pid == old_pid
        # gpu-c leaves the cluster: the run fails, and the instance is placed again on gpu-d,
        # under a new id, with a fresh port; the old backend does not outlive its node.
        began = time.monotonic()
        cluster.remove_node(added.pop("gpu-c"))
        await wait_until(lambda: "roamer@gpu-d:gpu2" in engine.instances, 180)
        moved = engine.instances["roamer@gpu-d:gpu2"]
        await moved.wait_state(State.RUNNING, timeout=180)
        print(f"placed again on gpu-d and RUNNING {time.monotonic() - began:.2f} s after gpu-c was removed")
        track.add(engine)
        assert list(engine.instances) == ["roamer@gpu-d:gpu2"]
        assert handle_of(engine, moved.id).node == "gpu-d" and moved.spec.port != old_port
        assert engine.catalog.placed_on == {"roamer#0": "gpu-d"}
        await wait_until(lambda: not alive(old_pid), 90)
    finally:
        await asyncio.wait_for(engine.shutdown(), 180)
        for node in added.values():
            cluster.remove_node(node)
    track.pids.add(old_pid)
    track.check()


@pytest.mark.slow
@needs_ray
async def test_a_cluster_runs_ports_are_checked_on_its_node_and_an_automatic_one_moves(
    tmp_path, rig, monkeypatch
) -> None:
    import socket

    fixed = free_port()
    stranger = socket.socket()  # holds the fixed port from the start
    stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    stranger.bind(("127.0.0.1", fixed))
    stranger.listen()
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    docs = [
        declaration(
            "fixed",
            demo_cmd(),
            node="gpu-b",
            port=fixed,
            health=HEALTH,
            restart={**FAST_RESTART, "initial_delay": 5.0},
        ),
        declaration(
            "mover", demo_cmd(), node="gpu-a", health=HEALTH, restart={**FAST_RESTART, "initial_delay": 1.0}
        ),
    ]
    engine = await started(tmp_path, rig, monkeypatch, docs)
    track = Tracker()
    try:
        fixed_inst = engine.instances["fixed@gpu-b:cpu"]
        await fixed_inst.wait_for(lambda i: any(t.to_state == State.BACKOFF for t in i.history), timeout=180)
        reason = next(t.reason for t in fixed_inst.history if t.to_state == State.BACKOFF)
        # Found by the run's actor, on its node (not by a check on the supervisor's machine).
        assert (
            f"port {fixed} is already in use by pid {os.getpid()}" in reason and "on node gpu-b" in reason
        ), reason
        mover = engine.instances["mover@gpu-a:cpu"]
        await mover.wait_state(State.RUNNING, timeout=180)
        track.add(engine)
        old_pid, old_port = mover.pid, mover.spec.port
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:  # take its port while it backs off
            try:
                squatter.bind(("127.0.0.1", old_port))
                break
            except OSError:
                assert time.monotonic() < deadline, "the old backend's port was never released"
                await asyncio.sleep(0.02)
        squatter.listen()
        await wait_until(
            lambda: (
                "mover@gpu-a:cpu" in engine.instances
                and engine.instances["mover@gpu-a:cpu"].spec.port != old_port
            ),
            30,
        )
        mover = engine.instances["mover@gpu-a:cpu"]
        await mover.wait_state(State.RUNNING, timeout=180)
        track.add(engine)
        assert any(
            f"automatic port {old_port} is held by pid {os.getpid()}" in t.reason
            and "on node gpu-a" in t.reason
            for t in mover.history
        ), [t.reason for t in mover.history]
    finally:
        await asyncio.wait_for(engine.shutdown(), 180)
        stranger.close()
        squatter.close()
    track.check()


def test_a_run_is_reaped_only_after_three_samples_and_three_seconds_unowned() -> None:
    from supervisor.cluster.nodes import NodeRun, unowned_runs

    runs = {"lost": NodeRun("a@gpu-a:gpu0", (10,)), "ours": NodeRun("b@gpu-a:gpu1", (11,))}
    live = lambda token, instance: token == "ours"
    seen: dict = {}
    assert unowned_runs(runs, live, seen, now=0.0) == []
    assert unowned_runs(runs, live, seen, now=1.0) == []
    assert unowned_runs(runs, live, seen, now=2.0) == []  # 3 samples, but only 2 s
    assert unowned_runs(runs, live, seen, now=3.0) == ["lost"]
    assert "ours" not in seen
    # Gone from a sample (it ended, or it was a launch in flight that is ours now): counting restarts.
    assert unowned_runs({}, live, seen, now=4.0) == [] and seen == {}
