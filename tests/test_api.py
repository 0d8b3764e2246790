"""The REST API against a real server on 127.0.0.1: contract, error paths, edits of conf.d/."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from supervisor.backends.process import ProcessKind
from supervisor.config.settings import Settings
from supervisor.core.states import State

from .api_helpers import Api, running_api
from .conftest import PY, alive, declaration, demo_cmd, free_port, wait_until, write_decl

pytestmark = pytest.mark.slow  # a real API server, and processes behind it

TCP = {"type": "tcp", "start_interval": 0.05}


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with running_api(settings) as a:
        yield a


def demo_config(**extra) -> dict:
    return {"command": demo_cmd(), "health": {"type": "http", "start_interval": 0.05}, **extra}


def read_gpus(conf_dir: Path, name: str):
    return tomllib.loads((conf_dir / f"{name}.toml").read_text()).get("gpus")


# -- the original contract --------------------------------------------------------------------
async def test_root_answers_like_the_old_tool(api: Api) -> None:
    r = await api.get("/")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "message": "Welcome to the Model Inference Client API"}


async def test_start_declares_and_runs_then_stop_removes_gpu(api: Api, conf_dir: Path) -> None:
    r = await api.post(
        "/api/v1/models/start?wait=true",
        {"model_name": "MAM", "model_type": "process", "gpu_id": 0, "config": demo_config()},
    )
    assert r.status_code == 202, r.text
    info = r.json()
    assert list(info)[:10] == [
        "instance_id",
        "model_name",
        "model_type",
        "active_gpu_ids",
        "total_instances",
        "status",
        "pid",
        "port",
        "created_at",
        "updated_at",
    ]
    assert info["instance_id"] == "MAM@gpu0" and info["model_type"] == "process"
    assert info["status"] == "RUNNING" and info["active_gpu_ids"] == [0] and info["total_instances"] == 1
    assert info["created_at"].endswith("+00:00") and alive(info["pid"])
    assert read_gpus(conf_dir, "MAM") == [0]

    r = await api.post(
        "/api/v1/models/start", {"model_name": "MAM", "gpu_id": "1", "config": {}}
    )  # "1": coerced
    assert r.status_code == 202
    assert r.json()["instance_id"] == "MAM@gpu1" and r.json()["active_gpu_ids"] == [0, 1]
    assert read_gpus(conf_dir, "MAM") == [0, 1]

    r = await api.post("/api/v1/models/start", {"model_name": "MAM", "gpu_id": 1, "config": {}})  # idempotent
    assert r.status_code == 202 and read_gpus(conf_dir, "MAM") == [0, 1]

    r = await api.get("/api/v1/models/status")
    items = r.json()
    assert [(i["model_name"], i["model_type"], i["gpu_id"]) for i in items] == [
        ("MAM", "process", 0),
        ("MAM", "process", 1),
    ]
    one = (await api.get("/api/v1/models/status/MAM")).json()
    assert [(i["instance_id"], i["state"], i["pid"]) for i in one] == [
        (i["instance_id"], i["state"], i["pid"]) for i in items
    ]
    assert (await api.get("/api/v1/models/supported")).json() == {"MAM": "process"}

    pid0 = info["pid"]
    r = await api.post("/api/v1/models/stop", {"model_name": "MAM", "gpu_id": 0})
    assert r.status_code == 200, r.text
    stopped = r.json()
    assert stopped["instance_id"] == "MAM@gpu0" and stopped["status"] == "STOPPED" and stopped["pid"] is None
    assert stopped["active_gpu_ids"] == [1] and stopped["total_instances"] == 1
    assert not alive(pid0) and read_gpus(conf_dir, "MAM") == [1]
    r = await api.post("/api/v1/models/stop", {"model_name": "MAM", "gpu_id": 1})
    assert r.status_code == 200
    assert read_gpus(conf_dir, "MAM") == []  # the file stays: the model remains known
    assert (await api.get("/api/v1/models/supported")).json() == {"MAM": "process"}
    assert (await api.get("/api/v1/models/status/MAM")).json() == []


async def test_start_survives_a_supervisor_restart(settings: Settings, conf_dir: Path) -> None:
    async with running_api(settings) as api:
        r = await api.post(
            "/api/v1/models/start",
            {
                "model_name": "keep",
                "model_type": "process",
                "gpu_id": 2,
                "config": {"command": ["sleep", "3600"]},
            },
        )
        assert r.status_code == 202
    async with running_api(settings) as api:
        r = await api.get("/api/v1/models/status/keep")
        assert [i["instance_id"] for i in r.json()] == ["keep@gpu2"]


async def test_wait_reports_a_failed_start(api: Api) -> None:
    r = await api.post(
        "/api/v1/models/start?wait=true&timeout=20",
        {
            "model_name": "broken",
            "model_type": "process",
            "gpu_id": 0,
            "config": {
                "command": [PY, "-c", "import sys; print('no weights found'); sys.exit(3)"],
                "health": {"type": "tcp"},
                "restart": {"initial_delay": 5.0, "jitter": 0.0},
            },
        },
    )
    assert r.status_code == 502
    body = r.json()
    assert "failed to start" in body["detail"] and "exit code 3" in body["detail"]
    assert body["instance"]["state"] == "BACKOFF"


# -- error paths ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body,loc,type_",
    [
        ({"model_name": "m", "gpu_id": -1}, ["body", "gpu_id"], "greater_than_equal"),
        ({"model_name": "m", "gpu_id": 0, "config": None}, ["body", "config"], "dict_type"),
        ({"gpu_id": 0}, ["body", "model_name"], "missing"),
        ({"model_name": "m", "gpu_id": "zero"}, ["body", "gpu_id"], "int_parsing"),
        (
            {"model_name": "../etc", "model_type": "process", "gpu_id": 0},
            ["body", "model_name"],
            "value_error",
        ),
        ({"model_name": "m", "model_type": "tensorflow", "gpu_id": 0}, ["body", "model_type"], "enum"),
        ({"model_name": "m", "gpu_id": 0}, ["body", "model_type"], "missing"),
        (
            {
                "model_name": "m",
                "model_type": "process",
                "gpu_id": 0,
                "config": {"command": ["x"], "restart": {"max_retries": -1}},
            },
            ["body", "config", "restart", "max_retries"],
            "greater_than_equal",
        ),
        (
            {
                "model_name": "m",
                "model_type": "process",
                "gpu_id": 0,
                "config": {"command": ["x"], "comand": 1},
            },
            ["body", "config", "comand"],
            "extra_forbidden",
        ),
        (
            {"model_name": "m", "model_type": "process", "gpu_id": 0, "config": {}},
            ["body", "config", "command"],
            "missing",
        ),
    ],
    ids=[
        "negative-gpu",
        "config-null",
        "no-name",
        "gpu-not-int",
        "bad-name",
        "unknown-backend",
        "type-needed",
        "bad-config-value",
        "unknown-config-key",
        "missing-command",
    ],
)
async def test_start_422_names_the_field(api: Api, conf_dir: Path, body, loc, type_) -> None:
    r = await api.post("/api/v1/models/start", body)
    assert r.status_code == 422, r.text
    items = r.json()["detail"]
    assert any(i["loc"] == loc and i["type"] == type_ for i in items), items
    assert not any(conf_dir.iterdir()), "a rejected request wrote a file"


async def test_malformed_json_is_422(api: Api) -> None:
    r = await api.client.post(
        "/api/v1/models/start", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


async def test_404s(api: Api) -> None:
    r = await api.post("/api/v1/models/stop", {"model_name": "ghost", "gpu_id": 0})
    assert r.status_code == 404 and r.json()["detail"] == "Model 'ghost' not found or not running on GPU 0."
    assert (await api.get("/api/v1/models/status/ghost")).status_code == 404
    assert (await api.get("/api/v1/models/ghost")).status_code == 404
    assert (await api.delete("/api/v1/models/ghost")).status_code == 404
    assert (await api.post("/api/v1/models/ghost/restart")).status_code == 404
    assert (await api.get("/api/v1/instances/ghost@cpu/logs")).status_code == 404
    assert (await api.get("/api/v1/instances/..%2F..%2Fetc%2Fpasswd/logs")).status_code == 404
    r = await api.get("/api/v1/no/such/route")
    assert r.status_code == 404 and "detail" in r.json()


async def test_stop_on_a_gpu_the_model_does_not_use_is_404(api: Api, conf_dir: Path) -> None:
    write_decl(conf_dir, declaration("busy", ["sleep", "3600"], gpus=[0]))
    await api.engine.reload("test")
    r = await api.post("/api/v1/models/stop", {"model_name": "busy", "gpu_id": 3})
    assert r.status_code == 404
    assert read_gpus(conf_dir, "busy") == [0]  # and nothing was freed (weakness 2 and 4)


async def test_409_port_taken_names_the_occupant(api: Api, conf_dir: Path) -> None:
    port = free_port()
    write_decl(conf_dir, declaration("first", ["sleep", "3600"], port=port))
    await api.engine.reload("test")
    r = await api.post(
        "/api/v1/models/start",
        {
            "model_name": "second",
            "model_type": "process",
            "gpu_id": 0,
            "config": {"command": ["sleep", "3600"], "port": port},
        },
    )
    assert r.status_code == 409, r.text
    assert f"port {port}" in r.json()["detail"] and "first@cpu" in r.json()["detail"]
    assert not (conf_dir / "second.toml").exists()


async def test_409_backend_mismatch_and_cpu_model(api: Api, conf_dir: Path) -> None:
    write_decl(conf_dir, declaration("cpuonly", ["sleep", "3600"]))
    await api.engine.reload("test")
    r = await api.post(
        "/api/v1/models/start", {"model_name": "cpuonly", "model_type": "process", "gpu_id": 0}
    )
    assert r.status_code == 409 and 'gpus = "none"' in r.json()["detail"]
    api.engine.registry.register(_OtherKind())
    r = await api.post("/api/v1/models/start", {"model_name": "cpuonly", "model_type": "other", "gpu_id": 0})
    assert r.status_code == 409 and "declared with backend 'process'" in r.json()["detail"]


async def test_409_when_the_file_is_broken(api: Api, conf_dir: Path) -> None:
    path = write_decl(conf_dir, declaration("fragile", ["sleep", "3600"], gpus=[0]))
    await api.engine.reload("test")
    path.write_text(path.read_text() + "\nbogus = 1\n")
    await api.engine.reload("test")
    r = await api.post("/api/v1/models/start", {"model_name": "fragile", "gpu_id": 1})
    assert r.status_code == 409 and "has errors" in r.json()["detail"]
    assert "bogus = 1" in path.read_text()  # the user's edit is not overwritten


# -- declarations as JSON ---------------------------------------------------------------------
async def test_put_get_delete_declaration(api: Api, conf_dir: Path) -> None:
    doc = {"backend": "process", "command": ["sleep", "3600"], "gpus": [1], "restart": {"max_retries": 2}}
    r = await api.put("/api/v1/models/web", doc)
    assert r.status_code == 201, r.text
    assert r.json() == {**doc, "name": "web"}
    assert tomllib.loads((conf_dir / "web.toml").read_text()) == {**doc, "name": "web"}
    inst = api.engine.instances["web@gpu1"]
    await inst.wait_state(State.RUNNING, timeout=10)
    assert (await api.get("/api/v1/models/web")).json() == {**doc, "name": "web"}
    r = await api.put("/api/v1/models/web", {**doc, "restart": {"max_retries": "x"}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "restart", "max_retries"]
    r = await api.put("/api/v1/models/web", {**doc, "name": "other"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]
    r = await api.put("/api/v1/models/web", {**doc, "restart": {"max_retries": 4}})
    assert r.status_code == 200 and inst.spec.restart.max_retries == 4
    listing = (await api.get("/api/v1/models")).json()
    assert [(m["name"], m["file"], m["instances"]) for m in listing] == [
        ("web", str(conf_dir / "web.toml"), ["web@gpu1"])
    ]
    pid = inst.pid
    r = await api.delete("/api/v1/models/web")
    assert r.status_code == 200 and r.json() == {
        "name": "web",
        "file": str(conf_dir / "web.toml"),
        "stopped": ["web@gpu1"],
    }
    assert not (conf_dir / "web.toml").exists() and not alive(pid)


async def test_invalid_names_are_422_before_any_path(api: Api, conf_dir: Path) -> None:
    for name in ("..", ".hidden", "a" * 65, "status"):
        r = await api.put(f"/api/v1/models/{name}", {"backend": "process", "command": ["x"]})
        assert r.status_code in (404, 405, 422), (name, r.status_code)
    r = await api.put("/api/v1/models/.hidden", {"backend": "process", "command": ["x"]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "name"]
    assert list(conf_dir.iterdir()) == []


async def test_restart_enable_disable_and_logs(api: Api, conf_dir: Path) -> None:
    write_decl(conf_dir, declaration("svc", demo_cmd("--name", "svc"), health=TCP))
    await api.engine.reload("test")
    inst = api.engine.instances["svc@cpu"]
    await inst.wait_state(State.RUNNING, timeout=10)
    pid = inst.pid
    r = await api.post("/api/v1/models/svc/restart")
    assert r.status_code == 202
    await inst.wait_for(lambda i: i.state == State.RUNNING and i.pid != pid, timeout=10)
    r = await api.post("/api/v1/models/svc/disable")
    assert r.status_code == 200 and r.json()[0]["state"] == "STOPPED"
    assert tomllib.loads((conf_dir / "svc.toml").read_text())["enabled"] is False
    r = await api.post("/api/v1/models/svc/enable")
    assert r.status_code == 202
    await inst.wait_state(State.RUNNING, timeout=10)
    r = await api.get("/api/v1/instances/svc@cpu/logs?tail=5")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "svc listening on" in (await api.get("/api/v1/instances/svc@cpu/logs")).text
    assert len(r.text.splitlines()) <= 5


async def test_config_errors_endpoint(api: Api, conf_dir: Path) -> None:
    (conf_dir / "bad.toml").write_text('name = "bad"\nbackend = "process"\ncommand = ["x"]\nport = "80"\n')
    await api.engine.reload("test")
    r = await api.get("/api/v1/config/errors")
    assert r.json() == [
        {
            "file": str(conf_dir / "bad.toml"),
            "key": "port",
            "line": None,
            "message": "must be a port number (1-65535) or \"auto\", got '80'",
        }
    ]
    health = (await api.get("/healthz")).json()
    assert health["status"] == "ok" and health["config_errors"] == 1


async def test_reload_endpoint(api: Api, conf_dir: Path) -> None:
    write_decl(conf_dir, declaration("late", ["sleep", "3600"]))
    r = await api.post("/api/v1/reload")
    assert r.status_code == 202
    await wait_until(lambda: "late@cpu" in api.engine.instances)


async def test_concurrent_start_stop_storm_matches_the_file(api: Api, conf_dir: Path) -> None:
    write_decl(conf_dir, declaration("storm", ["sleep", "3600"], gpus=[0], stop={"timeout": 1.0}))
    await api.engine.reload("test")
    rng = random.Random(7)

    async def one() -> int:
        gpu = rng.randrange(4)
        if rng.random() < 0.5:
            r = await api.post("/api/v1/models/start", {"model_name": "storm", "gpu_id": gpu})
        else:
            r = await api.post("/api/v1/models/stop", {"model_name": "storm", "gpu_id": gpu})
        assert r.status_code in (200, 202, 404), r.text
        return r.status_code

    await asyncio.gather(*(one() for _ in range(40)))
    declared = set(read_gpus(conf_dir, "storm"))
    await wait_until(lambda: not api.engine.removing, timeout=20)
    running = {inst.spec.gpus[0] for inst in api.engine.model_instances("storm")}
    assert running == declared
    for inst in api.engine.model_instances("storm"):
        await inst.wait_state(State.RUNNING, timeout=10)


# -- killing processes ------------------------------------------------------------------------
async def test_kill_refuses_dangerous_and_unrelated_pids(api: Api) -> None:
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        # The suite's parent is an ancestor, unless the suite was detached (its parent is init).
        parent = [(os.getppid(), "ancestor")] if os.getppid() != 1 else []
        for pid, words in [
            (0, "never a valid target"),
            (1, "never a valid target"),
            (-1, "never a valid target"),
            (os.getpid(), "the supervisor itself"),
            *parent,
            (sleeper.pid, "neither using a GPU nor part of a supervised instance"),
        ]:
            r = await api.delete(f"/api/v1/processes/{pid}")
            assert r.status_code == 403, (pid, r.text)
            assert words in r.json()["detail"], (pid, r.json())
        assert sleeper.poll() is None
        r = await api.delete(f"/api/v1/processes/{sleeper.pid}?force=true")
        assert r.status_code == 200 and r.json()["status"] == "killed"
        assert sleeper.wait(timeout=5) == -signal.SIGTERM
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    r = await api.delete("/api/v1/processes/99999999")
    assert r.status_code == 404 and r.json()["detail"] == "Process not found"
    r = await api.delete("/api/v1/processes/abc")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "pid"]
    r = await api.delete("/api/v1/processes/99999999?node=gpu-a")  # a cluster node, outside cluster mode
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "node"], r.text
    assert "needs cluster mode" in r.json()["detail"][0]["msg"]
    r = await api.delete("/api/v1/processes/99999999?node=local")  # this machine, by name
    assert r.status_code == 404 and r.json()["detail"] == "Process not found"


async def test_kill_of_a_supervised_process_names_the_instance_and_it_restarts(
    api: Api, conf_dir: Path
) -> None:
    write_decl(conf_dir, declaration("victim", demo_cmd(), health=TCP, restart={"initial_delay": 0.0}))
    await api.engine.reload("test")
    inst = api.engine.instances["victim@cpu"]
    await inst.wait_state(State.RUNNING, timeout=10)
    pid = inst.pid
    r = await api.delete(f"/api/v1/processes/{pid}")
    assert r.status_code == 200, r.text
    assert (
        r.json()["instance_id"] == "victim@cpu"
        and "restarted according to its restart policy" in r.json()["message"]
    )
    await inst.wait_for(lambda i: i.state == State.RUNNING and i.pid not in (None, pid), timeout=10)


# -- auth and docs ----------------------------------------------------------------------------
async def test_bearer_token(settings: Settings) -> None:
    async with running_api(settings, token="s3cret") as api:
        assert (await api.get("/api/v1/models/status")).status_code == 200
        bare = {"Authorization": ""}
        r = await api.client.get("/api/v1/models/status", headers=bare)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert "bearer token" in r.json()["detail"]
        r = await api.client.get("/api/v1/models/status", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert (await api.client.post("/api/v1/models/start", json={}, headers=bare)).status_code == 401
        assert (await api.client.delete("/api/v1/processes/1", headers=bare)).status_code == 401
        assert (await api.client.get("/healthz", headers=bare)).status_code == 200
        assert (await api.client.get("/docs/openapi.json", headers=bare)).status_code == 200
        spec = (await api.client.get("/docs/openapi.json")).json()
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_openapi_and_offline_docs(api: Api) -> None:
    spec = (await api.get("/docs/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    for path in [
        "/api/v1/gpus",
        "/api/v1/processes/{pid}",
        "/api/v1/models/start",
        "/api/v1/models/stop",
        "/api/v1/models/status",
        "/api/v1/models/status/{model_name}",
        "/api/v1/models/supported",
        "/api/v1/models/{name}",
        "/api/v1/events",
        "/healthz",
        "/api/v1/config/errors",
    ]:
        assert path in paths, path
    start = paths["/api/v1/models/start"]["post"]
    assert start["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/StartRequest"
    }
    assert spec["components"]["schemas"]["StartRequest"]["required"] == ["model_name", "gpu_id"]
    page = await api.get("/docs")
    assert page.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower() and "http://" not in page.text and "https://" not in page.text
    asset = await api.get("/docs/assets/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.content) > 100_000
    assert (await api.get("/docs/assets/..%2Fsecret")).status_code == 404


async def test_events_stream_and_resume(api: Api, conf_dir: Path) -> None:
    async with api.client.stream("GET", "/api/v1/events") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        write_decl(conf_dir, declaration("evented", ["sleep", "3600"]))
        await api.engine.reload("test")
        seen = []
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
                if any(e.get("to") == "RUNNING" for e in seen):
                    break
    first_id = seen[0]["id"]
    async with api.client.stream("GET", "/api/v1/events", headers={"Last-Event-ID": str(first_id)}) as resp:
        replay = []
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                replay.append(json.loads(line[6:]))
                if replay[-1]["id"] == seen[-1]["id"]:
                    break
    assert [e["id"] for e in replay] == [e["id"] for e in seen[1:]]


class _OtherKind(ProcessKind):
    """A second registered kind, to provoke a backend mismatch."""

    name = "other"


async def test_status_reflects_every_change_at_once(api: Api, conf_dir: Path) -> None:
    """The status list is cached per instance: it must still never show a stale state."""
    write_decl(conf_dir, declaration("fresh", demo_cmd(), health=TCP))
    await api.engine.reload("test")
    inst = api.engine.instances["fresh@cpu"]
    await inst.wait_state(State.RUNNING, timeout=10)
    first = (await api.get("/api/v1/models/status")).json()[0]
    await asyncio.sleep(0.05)
    second = (await api.get("/api/v1/models/status")).json()[0]
    assert second["uptime"] > first["uptime"] and second["pid"] == first["pid"] == inst.pid
    await inst.stop()
    after = (await api.get("/api/v1/models/status")).json()[0]
    assert after["state"] == "STOPPED" and after["pid"] is None and after["uptime"] is None
    await inst.start()
    await inst.wait_state(State.RUNNING, timeout=10)
    again = (await api.get("/api/v1/models/status")).json()[0]
    assert again["state"] == "RUNNING" and again["pid"] == inst.pid != first["pid"]
    (conf_dir / "fresh.toml").unlink()
    await api.engine.reload("test")
    assert (await api.get("/api/v1/models/status")).json() == []


async def test_sse_reconnect_with_last_id_misses_no_transition(api: Api, conf_dir: Path) -> None:
    """Transitions that happen while the client is away are replayed, in order, none twice."""
    write_decl(conf_dir, declaration("flip", ["sleep", "3600"]))
    await api.engine.reload("test")
    inst = api.engine.instances["flip@cpu"]
    await inst.wait_state(State.RUNNING, timeout=10)
    received: list[dict] = []

    async def read_until(resp, stop) -> None:
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                received.append(json.loads(line[6:]))
                if stop(received[-1]):
                    return

    async with api.client.stream("GET", "/api/v1/events?last_event_id=0") as resp:
        await read_until(resp, lambda e: e.get("to") == "RUNNING" and e.get("instance") == "flip@cpu")
    last = received[-1]["id"]
    for _ in range(3):  # while disconnected: stop/start, six transitions
        await inst.stop()
        await inst.start()
        await inst.wait_state(State.RUNNING, timeout=10)
    expected = [e.id for e in api.engine.bus.history if e.id > last and e.type == "transition"]
    assert len(expected) >= 9
    async with api.client.stream("GET", "/api/v1/events", headers={"Last-Event-ID": str(last)}) as resp:
        await read_until(resp, lambda e: e["id"] >= expected[-1])
    after = [e["id"] for e in received if e["id"] > last and e["type"] == "transition"]
    assert after == expected


async def test_logs_accept_an_encoded_instance_id(api: Api, conf_dir: Path) -> None:
    write_decl(conf_dir, declaration("enc", demo_cmd(), health=TCP))
    await api.engine.reload("test")
    await api.engine.instances["enc@cpu"].wait_state(State.RUNNING, timeout=10)
    r = await api.get("/api/v1/instances/enc%40cpu/logs")
    assert r.status_code == 200 and "listening on" in r.text
