"""GPUs end to end with the simulated source: real child processes appear as GPU processes.

Attribution, strays and their kill policy, GPU existence checks, exclusivity, `gpus = "auto"`
placement and the GPU-gated restart, through a real engine and a real API server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from supervisor.config.settings import Settings
from supervisor.core.states import State

from .api_helpers import Api, running_api
from .conftest import alive, declaration, demo_cmd, wait_until, write_decl

pytestmark = pytest.mark.slow  # a real API server and real child processes

TCP = {"type": "tcp", "start_interval": 0.05}


class SimGpus:
    def __init__(self, path: Path, gpus: int = 2, total: int = 81920) -> None:
        self.path = path
        self.gpus = [
            {"index": i, "name": f"Sim {i}", "memory_total_mib": total, "process": []} for i in range(gpus)
        ]
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(".sim.tmp")
        tmp.write_text(tomli_w.dumps({"gpu": self.gpus}))
        os.replace(tmp, self.path)

    def set(self, index: int, **fields: Any) -> None:
        self.gpus[index].update(fields)
        self.write()

    def add_process(self, index: int, pid: int, mib: int, name: str | None = None) -> None:
        proc = {"pid": pid, "used_memory_mib": mib}
        if name:
            proc["name"] = name
        self.gpus[index]["process"].append(proc)
        self.write()


@pytest.fixture
def sim(tmp_path: Path) -> SimGpus:
    return SimGpus(tmp_path / "gpus.toml")


def gpu_settings(settings: Settings, sim: SimGpus, **extra: Any) -> Settings:
    return settings.model_copy(
        update={
            "gpu_source": "simulated",
            "gpu_simulated_file": sim.path,
            "gpu_sample_interval": 0.05,
            **extra,
        }
    )


async def wait_gpu_sample(api: Api) -> None:
    tracker = api.app.ctx.gpus
    version = tracker.local_version
    await wait_until(lambda: tracker.local_version >= version + 2)


@pytest.fixture
def stranger() -> Any:
    """A process that is not ours to supervise (its own session, so not in our group)."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


async def test_gpu_processes_are_attributed_to_their_instance(
    settings: Settings, sim: SimGpus, conf_dir: Path, tmp_path: Path
) -> None:
    pidfile = tmp_path / "worker.pid"
    write_decl(
        conf_dir,
        declaration(
            "llm", demo_cmd("--spawn-grandchild", "--grandchild-pidfile", str(pidfile)), gpus=[0], health=TCP
        ),
    )
    async with running_api(gpu_settings(settings, sim)) as api:
        inst = api.engine.instances["llm@gpu0"]
        await inst.wait_state(State.RUNNING, timeout=15)
        await wait_until(pidfile.exists)
        worker = int(pidfile.read_text())
        sim.add_process(0, inst.pid, 1024)
        sim.add_process(0, worker, 3072)  # a worker process (the grandchild) holds most memory
        await wait_gpu_sample(api)
        gpus = (await api.get("/api/v1/gpus")).json()
        assert (
            [g["id"] for g in gpus] == [0, 1]
            and gpus[0]["simulated"] is True
            and gpus[0]["source"] == "simulated"
        )
        owners = {p["pid"]: p["instance_id"] for p in gpus[0]["processes"]}
        assert owners == {inst.pid: "llm@gpu0", worker: "llm@gpu0"}
        (item,) = (await api.get("/api/v1/models/status")).json()
        assert item["gpu_memory_mib"] == 4096 and {p["pid"] for p in item["gpu_processes"]} == {
            inst.pid,
            worker,
        }
        assert (await api.get("/api/v1/gpus/strays")).json() == []
        assert (await api.get("/healthz")).json()["gpu_count"] == 2


DOUBLE_FORK = """
import os, sys, time
if os.fork() == 0:          # the intermediate: starts a worker in a session of its own, then dies
    os.setsid()
    if os.fork() == 0:
        open(sys.argv[1] + ".tmp", "w").write(str(os.getpid())); os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(120)
    os._exit(0)
time.sleep(120)
"""


async def test_orphaned_setsid_worker_is_attributed_by_its_mark(
    settings: Settings, sim: SimGpus, conf_dir: Path, tmp_path: Path
) -> None:
    """A GPU worker outside its instance's session whose parent died (no ppid or group path to the
    instance) still belongs to it, by the run mark it inherited: not a stray (issue 10)."""
    import sys

    pidfile = tmp_path / "worker.pid"
    write_decl(conf_dir, declaration("llm", [sys.executable, "-c", DOUBLE_FORK, str(pidfile)], gpus=[0]))
    async with running_api(gpu_settings(settings, sim, strays="kill", strays_kill_after=0.0)) as api:
        inst = api.engine.instances["llm@gpu0"]
        await inst.wait_state(State.RUNNING, timeout=15)
        await wait_until(pidfile.exists)
        worker = int(pidfile.read_text())
        assert os.getsid(worker) != os.getsid(inst.pid)
        sim.add_process(0, worker, 3072)
        await wait_gpu_sample(api)
        await wait_gpu_sample(api)
        gpus = (await api.get("/api/v1/gpus")).json()
        assert {p["pid"]: p["instance_id"] for p in gpus[0]["processes"]} == {worker: "llm@gpu0"}
        assert (await api.get("/api/v1/gpus/strays")).json() == [] and alive(worker)
        await inst.stop("test over")
        await wait_until(lambda: not alive(worker), timeout=10)  # stopped with its instance


async def test_strays_are_reported_then_killed_by_policy(
    settings: Settings, sim: SimGpus, stranger: Any
) -> None:
    allowed = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        s = gpu_settings(
            settings,
            sim,
            strays_per_gpu={1: "kill"},
            strays_kill_after=0.3,
            strays_allow_names=["allowed-daemon"],
        )
        async with running_api(s) as api:
            sim.add_process(0, stranger.pid, 500)  # GPU 0: report only
            await wait_gpu_sample(api)
            strays = (await api.get("/api/v1/gpus/strays")).json()
            assert [(x["pid"], x["gpu"], x["policy"], x["action"]) for x in strays] == [
                (stranger.pid, 0, "report", "reported")
            ]
            assert (await api.get("/api/v1/gpus")).json()[0]["processes"][0]["instance_id"] is None
            assert any(e.type == "stray" and e.data["pid"] == stranger.pid for e in api.engine.bus.history)

            sim.gpus[0]["process"] = []
            sim.add_process(1, stranger.pid, 700)  # GPU 1: kill
            sim.add_process(1, allowed.pid, 100, name="allowed-daemon")
            await wait_until(lambda: stranger.poll() is not None, timeout=10)
            assert stranger.returncode == -signal.SIGTERM
            await wait_gpu_sample(api)
            assert alive(allowed.pid)
            actions = {x["pid"]: x["action"] for x in (await api.get("/api/v1/gpus/strays")).json()}
            assert actions == {allowed.pid: "allowed"}
    finally:
        allowed.kill()
        allowed.wait()


async def test_declared_gpus_must_exist_and_are_exclusive(
    settings: Settings, sim: SimGpus, conf_dir: Path
) -> None:
    write_decl(conf_dir, declaration("first", ["sleep", "3600"], gpus=[0]))
    write_decl(conf_dir, declaration("second", ["sleep", "3600"], gpus=[0]))
    write_decl(conf_dir, declaration("ghost", ["sleep", "3600"], gpus=[7]))
    write_decl(conf_dir, declaration("share-a", ["sleep", "3600"], gpus=[1], share_gpus=True))
    write_decl(conf_dir, declaration("share-b", ["sleep", "3600"], gpus=[1], share_gpus=True))
    async with running_api(gpu_settings(settings, sim)) as api:
        errors = {Path(e["file"]).stem: e["message"] for e in (await api.get("/api/v1/config/errors")).json()}
        assert "GPU 0 is already held by instance first@gpu0" in errors["second"]
        assert "GPU 7 does not exist on this machine (GPUs: 0, 1)" in errors["ghost"]
        assert set(api.engine.instances) == {"first@gpu0", "share-a@gpu1", "share-b@gpu1"}
        r = await api.post(
            "/api/v1/models/start",
            {
                "model_name": "third",
                "model_type": "process",
                "gpu_id": 0,
                "config": {"command": ["sleep", "3600"]},
            },
        )
        assert r.status_code == 409 and "GPU 0 is already held by instance first@gpu0" in r.json()["detail"]
        r = await api.post("/api/v1/models/start", {"model_name": "first", "gpu_id": 5})
        assert r.status_code == 409 and "GPU 5 does not exist" in r.json()["detail"]


async def test_without_a_gpu_source_nothing_is_checked(settings: Settings, conf_dir: Path) -> None:
    write_decl(conf_dir, declaration("anywhere", ["sleep", "3600"], gpus=[7]))
    async with running_api(settings) as api:  # gpu_source none
        assert "anywhere@gpu7" in api.engine.instances
        assert (await api.get("/api/v1/gpus")).json() == []
        assert "off" in (await api.get("/healthz")).json()["gpu_reason"]


async def test_auto_placement_picks_free_memory_and_sticks(
    settings: Settings, sim: SimGpus, conf_dir: Path
) -> None:
    sim.set(0, memory_used_mib=70000)  # GPU 0: 11920 MiB free; GPU 1: 81920 free
    write_decl(conf_dir, declaration("auto1", ["sleep", "3600"], gpus="auto", min_free_memory_mb=40000))
    write_decl(
        conf_dir,
        declaration("auto2", ["sleep", "3600"], gpus="auto", min_free_memory_mb=10000, share_gpus=True),
    )
    s = gpu_settings(settings, sim)
    async with running_api(s) as api:
        assert set(api.engine.instances) == {"auto1@gpu1", "auto2@gpu0"}, api.engine.config_errors()
        placements = json.loads((settings.state_dir / "placements.json").read_text())
        assert placements == {"auto1#0": [1], "auto2#0": [0]}
    sim.set(0, memory_used_mib=0)  # now GPU 0 is the freer one: placements must not move
    sim.set(1, memory_used_mib=60000)
    async with running_api(s) as api:
        assert set(api.engine.instances) == {"auto1@gpu1", "auto2@gpu0"}
        write_decl(
            conf_dir,
            declaration(
                "toobig", ["sleep", "3600"], gpus="auto", gpus_per_instance=2, min_free_memory_mb=50000
            ),
        )
        await api.engine.reload("test")
        (error,) = api.engine.config_errors()
        assert (
            error["key"] == "gpus" and "cannot place: needs 2 GPU(s) with 50000 MiB free" in error["message"]
        )


async def test_auto_counts_what_declared_instances_still_need(
    settings: Settings, sim: SimGpus, conf_dir: Path
) -> None:
    sim.set(0, memory_total_mib=30000)
    sim.set(1, memory_total_mib=30000)
    for n in range(2):
        write_decl(
            conf_dir,
            declaration(f"big{n}", ["sleep", "3600"], gpus="auto", min_free_memory_mb=20000, share_gpus=True),
        )
    write_decl(
        conf_dir,
        declaration("big2", ["sleep", "3600"], gpus="auto", min_free_memory_mb=20000, share_gpus=True),
    )
    async with running_api(gpu_settings(settings, sim)) as api:
        placed = sorted(i for i in api.engine.instances)
        assert placed == ["big0@gpu0", "big1@gpu1"]  # not both on one GPU: 2 x 20000 > 30000
        (error,) = api.engine.config_errors()
        assert "big2" in error["file"] and "cannot place" in error["message"]


async def test_restart_waits_for_gpu_memory_release(settings: Settings, sim: SimGpus, conf_dir: Path) -> None:
    sim.set(0, memory_total_mib=6000)
    write_decl(
        conf_dir, declaration("oomy", demo_cmd(), gpus=[0], health=TCP, restart={"initial_delay": 0.0})
    )
    async with running_api(gpu_settings(settings, sim, gpu_release_timeout=30.0)) as api:
        inst = api.engine.instances["oomy@gpu0"]
        await inst.wait_state(State.RUNNING, timeout=15)
        first = inst.pid
        sim.add_process(0, first, 4000)
        sim.set(0, memory_used_mib=4000)  # the driver still counts it after the process dies
        await wait_until(lambda: api.app.ctx.gpus.instance_gpu("oomy@gpu0")["memory_mib"] == 4000)
        os.kill(first, signal.SIGKILL)
        await inst.wait_state(State.BACKOFF, timeout=30)
        await inst.wait_state(State.STARTING, timeout=30)  # initial_delay 0: at once, to wait there
        await asyncio.sleep(1.0)  # five samples of memory still held: it must not have started
        assert inst.state == State.STARTING and inst.pid is None, "restarted into memory still held"
        released = time.time()
        sim.gpus[0]["process"] = []
        sim.set(0, memory_used_mib=0)
        await inst.wait_state(State.RUNNING, timeout=15)
        starts = [
            line for line in inst.log_file.path.read_text().splitlines() if "] starting oomy@gpu0" in line
        ]
        assert len(starts) == 2
        spawned = datetime.strptime(starts[-1].split()[1].rstrip("]"), "%Y-%m-%dT%H:%M:%S.%fZ")
        assert spawned.replace(tzinfo=UTC).timestamp() >= released


async def test_gate_gives_up_after_the_timeout_and_says_why(
    settings: Settings, sim: SimGpus, conf_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sim.set(0, memory_total_mib=6000)
    write_decl(
        conf_dir, declaration("stuck", demo_cmd(), gpus=[0], health=TCP, restart={"initial_delay": 0.0})
    )
    async with running_api(gpu_settings(settings, sim, gpu_release_timeout=0.5)) as api:
        inst = api.engine.instances["stuck@gpu0"]
        await inst.wait_state(State.RUNNING, timeout=15)
        first = inst.pid
        sim.add_process(0, first, 4000)
        sim.set(0, memory_used_mib=5000)
        await wait_until(lambda: api.app.ctx.gpus.instance_gpu("stuck@gpu0")["memory_mib"] == 4000)
        os.kill(first, signal.SIGKILL)
        await inst.wait_for(lambda i: i.state == State.RUNNING and i.pid != first, timeout=15)
    assert any(
        "starting anyway after 0.5 s" in r.getMessage() and "1000 MiB free of the 4000 MiB" in r.getMessage()
        for r in caplog.records
    )


async def test_gpu_samples_reach_the_event_stream(settings: Settings, sim: SimGpus) -> None:
    async with running_api(gpu_settings(settings, sim)) as api:
        async with api.client.stream("GET", "/api/v1/events") as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and '"type": "gpu"' in line:
                    event = json.loads(line[6:])
                    break
        assert event["simulated"] is True and [g["id"] for g in event["gpus"]] == [0, 1]
        assert not any(e.type == "gpu" for e in api.engine.bus.history)  # not kept for replay
