"""GET /metrics, parsed with prometheus-client's own parser, after real transitions."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.config.settings import Settings
from supervisor.core.states import State

from .api_helpers import Api, running_api
from .conftest import declaration, demo_cmd, wait_until, write_decl
from .test_gpu_integration import SimGpus, gpu_settings, wait_gpu_sample

pytestmark = pytest.mark.slow  # a real API server and real child processes


async def scrape(api: Api) -> dict:
    r = await api.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(family, **labels) -> float:
    for sample in family.samples:
        if all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise AssertionError(f"no sample with {labels} in {family.name}: {family.samples}")


async def test_metrics_names_types_labels_and_a_crash(
    settings: Settings, conf_dir: Path, tmp_path: Path
) -> None:
    sim = SimGpus(tmp_path / "gpus.toml", gpus=2)
    write_decl(
        conf_dir,
        declaration(
            "web",
            demo_cmd(),
            gpus=[0],
            health={"type": "tcp", "start_interval": 0.05},
            restart={"initial_delay": 0.0},
        ),
    )
    (conf_dir / "broken.toml").write_text('name = "broken"\n')
    async with running_api(gpu_settings(settings, sim)) as api:
        inst = api.engine.instances["web@gpu0"]
        await inst.wait_state(State.RUNNING, timeout=15)
        sim.add_process(0, inst.pid, 3000)
        await wait_gpu_sample(api)
        status = (await api.get("/api/v1/models/status")).json()
        assert [it["node"] for it in status] == [None]  # on this machine (cluster mode: its node)
        m = await scrape(api)

        types = {name: f.type for name, f in m.items() if name.startswith("model_supervisor_")}
        assert types["model_supervisor_instance_state"] == "gauge"  # a StateSet is a gauge in the text format
        assert types["model_supervisor_instance_restarts"] == "counter"
        assert types["model_supervisor_reconcile_duration_seconds"] == "histogram"
        for name in (
            "instance_consecutive_failures",
            "instance_uptime_seconds",
            "instance_ready",
            "instance_gpu_memory_bytes",
            "gpu_memory_used_bytes",
            "gpu_memory_total_bytes",
            "gpu_processes",
            "gpu_stray_processes",
            "config_errors",
            "config_error_files",
        ):
            assert types[f"model_supervisor_{name}"] == "gauge", name
        labels = {"model": "web", "instance": "web@gpu0", "backend": "process", "gpu": "0", "node": ""}
        assert value(m["model_supervisor_instance_state"], **labels, state="RUNNING") == 1
        assert value(m["model_supervisor_instance_state"], **labels, state="BACKOFF") == 0
        assert value(m["model_supervisor_instance_ready"], **labels) == 1
        assert value(m["model_supervisor_instance_restarts"], **labels) == 0
        assert value(m["model_supervisor_instance_gpu_memory_bytes"], **labels) == 3000 * 1024 * 1024
        gpu0 = {"gpu": "0", "uuid": "GPU-sim-0"}
        assert value(m["model_supervisor_gpu_memory_total_bytes"], **gpu0) == 81920 * 1024 * 1024
        assert value(m["model_supervisor_gpu_processes"], **gpu0) == 1
        assert value(m["model_supervisor_gpu_stray_processes"], **gpu0) == 0
        assert value(m["model_supervisor_config_error_files"]) == 1
        assert (
            value(
                m["model_supervisor_api_requests"], route="/api/v1/models/status", method="GET", status="200"
            )
            >= 1
        )
        hist = m["model_supervisor_reconcile_duration_seconds"]
        assert any(s.name.endswith("_count") and s.value >= 1 for s in hist.samples)

        pid = inst.pid
        os.kill(pid, signal.SIGKILL)
        await inst.wait_for(lambda i: i.state == State.RUNNING and i.restarts == 1, timeout=15)
        m = await scrape(api)
        assert value(m["model_supervisor_instance_restarts"], **labels) == 1
        assert value(m["model_supervisor_instance_last_exit_code"], **labels) == 128 + signal.SIGKILL


async def test_metrics_need_the_token(settings: Settings) -> None:
    async with running_api(settings, token="t") as api:
        assert (await api.get("/metrics")).status_code == 200
        assert (await api.client.get("/metrics", headers={"Authorization": ""})).status_code == 401


async def test_strays_count_in_metrics(settings: Settings, tmp_path: Path) -> None:
    import subprocess

    sim = SimGpus(tmp_path / "gpus.toml", gpus=1)
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        async with running_api(gpu_settings(settings, sim)) as api:
            sim.add_process(0, stranger.pid, 100)
            await wait_until(lambda: api.app.ctx.gpus.stray_list)
            m = await scrape(api)
            assert value(m["model_supervisor_gpu_stray_processes"], gpu="0") == 1
    finally:
        stranger.kill()
        stranger.wait()
