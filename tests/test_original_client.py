"""The old tool's clients keep working: its README's requests, answered in shapes its own
pydantic models (copied from its schemas.py, see ../shared/ORIGINAL_API.md §2) accept."""

from __future__ import annotations

import subprocess
from enum import Enum
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from supervisor.config.settings import Settings

from .api_helpers import running_api
from .conftest import write_decl

pytestmark = pytest.mark.slow  # a real API server and real child processes


# -- the old tool's models, as its clients have them ------------------------------------------
class ModelType(str, Enum):
    TRITON = "triton"
    COMFYUI = "comfyui"


class ModelInstanceStatus(str, Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    ERROR = "ERROR"


class ModelInstanceInfo(BaseModel):
    model_config = ConfigDict(use_enum_values=True)
    instance_id: str
    model_name: str
    model_type: ModelType
    active_gpu_ids: list[int]
    total_instances: int
    status: ModelInstanceStatus
    pid: int | None = None
    port: int | None = None
    created_at: str
    updated_at: str


class ModelStatusItem(BaseModel):
    model_config = ConfigDict(use_enum_values=True)
    model_name: str
    model_type: str
    gpu_id: int


class GPUProcess(BaseModel):
    pid: int
    name: str | None = "N/A"
    gpu_memory_usage: int


class GPUInfo(BaseModel):
    id: int
    memory_usage: float
    power_draw: float
    processes: list[GPUProcess]


class KillProcessResponse(BaseModel):
    pid: int
    status: str
    message: str | None = None


@pytest.fixture
def mam(conf_dir: Path, tmp_path: Path) -> Path:
    """MAM declared as the old tool had it: Triton, in Docker, the image never pulled here."""
    repo = tmp_path / "model_repository" / "MAM"
    repo.mkdir(parents=True)
    return write_decl(
        conf_dir,
        {
            "name": "MAM",
            "backend": "triton",
            "model_repository": str(repo.parent),
            "pull": "never",
            "gpus": [],
            "instances_per_gpu": 8,
            "restart": {"initial_delay": 60.0},
        },
    )


async def test_readme_requests_answered_in_the_old_shapes(
    settings: Settings, mam: Path, tmp_path: Path
) -> None:
    sim = tmp_path / "gpus.toml"
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    sim.write_text(f"""
[[gpu]]
index = 0
memory_total_mib = 81920
memory_used_mib = 4096
power_draw_w = 150.7
[[gpu.process]]
pid = {sleeper.pid}
used_memory_mib = 4096
name = "python"
""")
    try:
        s = settings.model_copy(
            update={"gpu_source": "simulated", "gpu_simulated_file": sim, "gpu_sample_interval": 0.1}
        )
        async with running_api(s) as api:
            # POST /models/start, the README's example body verbatim
            r = await api.post(
                "/api/v1/models/start",
                {"model_name": "MAM", "model_type": "triton", "gpu_id": 0, "config": {}},
            )
            assert r.status_code == 202, r.text
            info = ModelInstanceInfo.model_validate(r.json())
            assert (
                info.model_type == "triton" and info.active_gpu_ids == [0] and info.instance_id == "MAM@gpu0"
            )

            # GET /models/status and /models/status/{model_name}
            items = [
                ModelStatusItem.model_validate(i) for i in (await api.get("/api/v1/models/status")).json()
            ]
            assert [(i.model_name, i.model_type, i.gpu_id) for i in items] == [("MAM", "triton", 0)]
            one = [
                ModelStatusItem.model_validate(i) for i in (await api.get("/api/v1/models/status/MAM")).json()
            ]
            assert one == items
            assert (await api.get("/api/v1/models/supported")).json() == {"MAM": "triton"}

            # GET /gpus: the README's GPUInfo example
            gpus = [GPUInfo.model_validate(g) for g in (await api.get("/api/v1/gpus")).json()]
            assert gpus[0].id == 0 and gpus[0].memory_usage == 5.0 and gpus[0].power_draw == 150.7
            assert gpus[0].processes == [GPUProcess(pid=sleeper.pid, name="python", gpu_memory_usage=4096)]

            # DELETE /processes/{pid}: a stray GPU process may be killed
            r = await api.delete(f"/api/v1/processes/{sleeper.pid}")
            assert r.status_code == 200
            assert KillProcessResponse.model_validate(r.json()).status == "killed"

            # POST /models/stop
            r = await api.post(
                "/api/v1/models/stop", {"model_name": "MAM", "model_type": "triton", "gpu_id": 0}
            )
            assert r.status_code == 200, r.text
            stopped = ModelInstanceInfo.model_validate(r.json())
            assert (
                stopped.status == "STOPPED" and stopped.active_gpu_ids == [] and stopped.total_instances == 0
            )

            # the old 404 body shape: {"detail": "..."}
            r = await api.post(
                "/api/v1/models/stop", {"model_name": "MAM", "model_type": "triton", "gpu_id": 0}
            )
            assert (
                r.status_code == 404
                and r.json()["detail"] == "Model 'MAM' not found or not running on GPU 0."
            )
            # the old 422 shape: detail items with loc
            r = await api.post("/api/v1/models/start", {"model_name": "MAM", "gpu_id": -1, "config": {}})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "gpu_id"]
    finally:
        sleeper.kill()
        sleeper.wait()
