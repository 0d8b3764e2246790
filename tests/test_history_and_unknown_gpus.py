"""GPU and instance history for the dashboard's plots; GPUs that nobody can vouch for (issue 13)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from supervisor.adapters.gpu.history import GpuHistory, GpuPoint
from supervisor.config.settings import Settings
from supervisor.core.states import State

from .api_helpers import running_api
from .conftest import declaration, sleep_cmd, wait_until, write_decl
from .test_gpu_integration import SimGpus, gpu_settings, wait_gpu_sample


def test_history_is_bounded_and_windowed() -> None:
    h = GpuHistory(sample_interval=1.0, window=10.0)
    for t in range(100):
        h.add(float(t), (GpuPoint(0, t, 100, float(t), 50.0),))
    h.add(50.0, (GpuPoint(0, 1, 100, 1.0, 1.0),))  # older than the last: ignored
    assert len(h) == 12  # window / interval + 2
    out = h.as_dict(now=99.0, seconds=5)
    assert out["gpus"][0]["t"] == [94.0, 95.0, 96.0, 97.0, 98.0, 99.0]
    assert out["gpus"][0]["memory_used"][-1] == 99 and out["gpus"][0]["memory_total"] == 100


@pytest.mark.slow
async def test_gpu_history_follows_the_samples(settings: Settings, tmp_path: Path) -> None:
    sim = SimGpus(tmp_path / "gpus.toml", gpus=2)
    sim.set(0, memory_used_mib=1000, utilization_percent=10.0, power_draw_w=100.0)
    async with running_api(gpu_settings(settings, sim)) as api:
        await wait_gpu_sample(api)
        sim.set(0, memory_used_mib=3000, utilization_percent=75.0, power_draw_w=250.0)
        await wait_until(lambda: api.app.ctx.gpus.snapshot().devices[0].memory_used_mib == 3000)
        await wait_gpu_sample(api)
        r = await api.get("/api/v1/gpus/history")
        assert r.status_code == 200
        body = r.json()
        assert [g["id"] for g in body["gpus"]] == [0, 1]
        g0 = body["gpus"][0]
        assert len(g0["t"]) == len(g0["memory_used"]) == len(g0["utilization"]) == len(g0["power_draw"]) >= 3
        assert g0["t"] == sorted(g0["t"]) and g0["t"][-1] <= body["now"]
        assert 1000 in g0["memory_used"] and g0["memory_used"][-1] == 3000
        assert g0["utilization"][-1] == 75.0 and g0["power_draw"][-1] == 250.0
        assert (await api.get("/api/v1/gpus/history?seconds=0")).json()["window_seconds"] == 1
        assert (await api.get("/api/v1/gpus/history?seconds=x")).status_code == 422


@pytest.mark.slow
async def test_instance_history_shows_restarts(settings: Settings, conf_dir: Path) -> None:
    write_decl(conf_dir, declaration("strip", sleep_cmd()))
    async with running_api(settings) as api:
        inst = api.engine.instances["strip@cpu"]
        await inst.wait_state(State.RUNNING, timeout=10)
        await api.post("/api/v1/models/strip/restart?wait=true")
        body = (await api.get("/api/v1/instances/history")).json()
        entry = next(i for i in body["instances"] if i["instance_id"] == "strip@cpu")
        assert entry["state"] == "STOPPED"  # where it was when the window began (before its first start)
        tos = [t["to"] for t in entry["transitions"]]
        assert tos == ["STARTING", "RUNNING", "STOPPING", "STOPPED", "STARTING", "RUNNING"], tos


@pytest.mark.slow
async def test_gpus_that_are_not_known_are_said_everywhere(
    settings: Settings, conf_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_decl(conf_dir, declaration("phantom", sleep_cmd(), gpus=[5, 7]))
    caplog.set_level(logging.WARNING, logger="supervisor.runtime.gpu_tracker")
    async with running_api(settings.model_copy(update={"gpu_source": "none"})) as api:
        for iid in ("phantom@gpu5", "phantom@gpu7"):  # they still run: a laptop demo needs that
            await api.engine.instances[iid].wait_state(State.RUNNING, timeout=10)
        health = (await api.get("/healthz")).json()
        warnings = health["warnings"]
        assert len(warnings) == 2 and warnings[0].startswith("GPU 5 is not known: no GPU source")
        assert warnings[1].startswith("GPU 7 is not known: no GPU source") and "phantom@gpu7" in warnings[1]
        assert "phantom@gpu5" in health["warnings"][0]
        await wait_until(lambda: "GPU 7 is not known: no GPU source" in caplog.text)
        assert caplog.text.count("GPU 5 is not known") == 1  # logged once, not at every reconcile
        await api.engine.reload("again")
        assert caplog.text.count("GPU 5 is not known") == 1


@pytest.mark.slow
async def test_no_warning_with_a_gpu_source(settings: Settings, conf_dir: Path, tmp_path: Path) -> None:
    sim = SimGpus(tmp_path / "gpus.toml", gpus=1)
    write_decl(conf_dir, declaration("real", sleep_cmd(), gpus=[0]))
    async with running_api(gpu_settings(settings, sim)) as api:
        await wait_gpu_sample(api)
        assert (await api.get("/healthz")).json()["warnings"] == []
