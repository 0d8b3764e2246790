"""POST /api/v1/models/stop names an instance by `instance_id` alone, or by `model_name` with
`gpu_id` null for a CPU-only model (issue 12: a CPU instance could not be stopped through the
old endpoint, 422 gpu_id required); the old body keeps working. A real server on 127.0.0.1."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from supervisor.config.settings import Settings
from supervisor.core.states import State

from .api_helpers import Api, running_api
from .conftest import alive, declaration, demo_cmd, sleep_cmd, write_decl

pytestmark = pytest.mark.slow  # real child processes

HTTP = {"type": "http", "start_interval": 0.05}


@asynccontextmanager
async def serving(settings: Settings, *docs: dict) -> AsyncIterator[Api]:
    """The server, started once `docs` are on disk: instances that exist at start-up wait for
    the sweep of an earlier run's leftovers, which a reload right after the start could race."""
    for doc in docs:
        write_decl(settings.conf_dir, doc)
    async with running_api(settings) as api:
        yield api


def read(conf_dir: Path, name: str) -> dict:
    return tomllib.loads((conf_dir / f"{name}.toml").read_text())


async def running(api: Api, iid: str) -> int:
    inst = api.engine.instances[iid]
    await inst.wait_state(State.RUNNING)
    assert inst.pid is not None and alive(inst.pid)
    return inst.pid


async def test_cpu_only_instance_stops_with_gpu_id_null_and_by_instance_id(
    settings: Settings, conf_dir: Path
) -> None:
    async with serving(settings, declaration("tts", demo_cmd(), health=HTTP)) as api:
        pid = await running(api, "tts@cpu")

        r = await api.post("/api/v1/models/stop", {"model_name": "tts", "gpu_id": None})
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["instance_id"] == "tts@cpu" and info["status"] == "STOPPED" and info["pid"] is None
        assert info["total_instances"] == 0 and info["active_gpu_ids"] == []
        assert not alive(pid)
        assert read(conf_dir, "tts")["enabled"] is False  # the file stays: the model remains known
        assert (await api.get("/api/v1/models/supported")).json() == {"tts": "process"}

        # A second stop is the old "not running" 404, like a second stop on a GPU.
        r = await api.post("/api/v1/models/stop", {"model_name": "tts"})
        assert r.status_code == 404 and r.json()["detail"] == "Model 'tts' not found or not running."

        assert (await api.post("/api/v1/models/tts/enable")).status_code == 202
        pid = await running(api, "tts@cpu")
        r = await api.post("/api/v1/models/stop", {"instance_id": "tts@cpu"})  # instance_id alone
        assert r.status_code == 200, r.text
        assert (
            r.json()["status"] == "STOPPED" and not alive(pid) and read(conf_dir, "tts")["enabled"] is False
        )


async def test_instance_id_alone_stops_that_gpu_instance(settings: Settings, conf_dir: Path) -> None:
    async with serving(settings, declaration("MAM", sleep_cmd(), gpus=[0, [1, 2]])) as api:
        pid0 = await running(api, "MAM@gpu0")
        pid12 = await running(api, "MAM@gpu1-2")

        r = await api.post("/api/v1/models/stop", {"instance_id": "MAM@gpu1-2"})
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["instance_id"] == "MAM@gpu1-2" and info["status"] == "STOPPED"
        assert info["active_gpu_ids"] == [0] and info["total_instances"] == 1
        assert not alive(pid12) and alive(pid0) and read(conf_dir, "MAM")["gpus"] == [0]

        # The old body still works, and so does instance_id with a model_name and gpu_id that agree.
        write_decl(conf_dir, declaration("MAM", sleep_cmd(), gpus=[0, 1]))
        await api.engine.reload("test")
        r = await api.post(
            "/api/v1/models/stop", {"model_name": "MAM", "gpu_id": 1, "instance_id": "MAM@gpu1"}
        )
        assert r.status_code == 200 and r.json()["instance_id"] == "MAM@gpu1"
        r = await api.post("/api/v1/models/stop", {"model_name": "MAM", "model_type": "process", "gpu_id": 0})
        assert r.status_code == 200 and r.json()["total_instances"] == 0
        assert read(conf_dir, "MAM")["gpus"] == [] and not alive(pid0)


async def test_bodies_that_name_no_instance_or_the_wrong_one_change_nothing(
    settings: Settings, conf_dir: Path
) -> None:
    async with serving(
        settings, declaration("MAM", sleep_cmd(), gpus=[0, 1]), declaration("other", sleep_cmd(), gpus=[2])
    ) as api:
        await running(api, "MAM@gpu0")
        before = (conf_dir / "MAM.toml").read_text()

        r = await api.post("/api/v1/models/stop", {"model_name": "MAM"})  # GPUs, yet no gpu_id
        assert r.status_code == 422
        item = r.json()["detail"][0]
        assert item["loc"] == ["body", "gpu_id"] and "give gpu_id or instance_id" in item["msg"], item
        r = await api.post("/api/v1/models/stop", {})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "model_name"]
        r = await api.post("/api/v1/models/stop", {"instance_id": "ghost@cpu"})
        assert r.status_code == 404 and r.json()["detail"] == "Instance 'ghost@cpu' not found."
        r = await api.post("/api/v1/models/stop", {"instance_id": "MAM@gpu0", "gpu_id": 1})  # disagree
        assert (
            r.status_code == 404
            and r.json()["detail"] == "Model 'MAM' has no running instance 'MAM@gpu0' on GPU 1."
        )
        r = await api.post(
            "/api/v1/models/stop", {"model_name": "MAM", "instance_id": "other@gpu2"}
        )  # another model's
        assert r.status_code == 404
        r = await api.post("/api/v1/models/stop", {"model_name": "MAM", "gpu_id": -1})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "gpu_id"]
        assert (conf_dir / "MAM.toml").read_text() == before
        assert api.engine.instances["MAM@gpu0"].state == State.RUNNING
        assert api.engine.instances["other@gpu2"].state == State.RUNNING


async def test_auto_placed_instance_is_a_409_naming_what_to_do(
    settings: Settings, conf_dir: Path, tmp_path: Path
) -> None:
    sim = tmp_path / "gpus.toml"
    sim.write_text("[[gpu]]\nindex = 0\nmemory_total_mib = 81920\nmemory_used_mib = 0\n")
    s = settings.model_copy(update={"gpu_source": "simulated", "gpu_simulated_file": sim})
    write_decl(conf_dir, declaration("auto", sleep_cmd(), gpus="auto"))
    async with running_api(s) as api:
        before = (conf_dir / "auto.toml").read_text()
        (iid,) = [i.id for i in api.engine.model_instances("auto")]
        r = await api.post("/api/v1/models/stop", {"instance_id": iid})
        assert r.status_code == 409, r.text
        assert 'gpus = "auto"' in r.json()["detail"] and "/api/v1/models/auto/disable" in r.json()["detail"]
        assert (conf_dir / "auto.toml").read_text() == before
