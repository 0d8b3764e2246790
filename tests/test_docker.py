"""The docker backend against a real Docker engine, with a local busybox image.

The engine in CI runs with --bridge=none, so containers use host networking on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.adapters.runners.docker import LABEL_SCOPE, container_name, scope_of
from supervisor.config.settings import Settings
from supervisor.core.states import State
from supervisor.runtime.engine import Engine
from supervisor.wiring import build

from .conftest import PY, REPO, declaration, free_port, free_range, wait_until, write_decl
from .docker_helpers import IMAGE, containers_of, docker_client, ensure_image

pytestmark = [pytest.mark.docker, pytest.mark.slow]  # a real Docker engine


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    c = docker_client()
    ensure_image(c)
    yield c


@pytest.fixture(autouse=True)
def no_leftover_containers(client: Any, settings: Settings) -> Iterator[None]:
    scope = scope_of(settings.state_dir)
    yield
    leftovers = client.containers.list(all=True, filters={"label": [f"{LABEL_SCOPE}={scope}"]})
    for c in leftovers:
        c.remove(force=True)
    assert not leftovers, f"test left containers behind: {[c.name for c in leftovers]}"


def httpd(port: str = "{port}", before: str = "") -> list[str]:
    script = f"{before}exec httpd -f -p 127.0.0.1:{port} -h /www"
    return ["sh", "-c", script]


def docker_decl(name: str, command: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    doc = {
        "name": name,
        "backend": "docker",
        "image": IMAGE,
        "network": "host",
        "command": command or httpd(),
        "health": {"type": "http", "path": "/v2/health/ready", "start_interval": 0.05},
    }
    doc.update(extra)
    return doc


async def test_container_runs_and_logs_go_to_the_instance_log(
    engine: Engine, conf_dir: Path, client: Any
) -> None:
    write_decl(conf_dir, docker_decl("web", httpd(before="echo hello-from-container; ")))
    await engine.start()
    inst = engine.instances["web@cpu"]
    await inst.wait_state(State.RUNNING, timeout=30)
    body = urllib.request.urlopen(f"http://127.0.0.1:{inst.spec.port}/v2/health/ready", timeout=5).read()
    assert body == b"ready\n"
    (container,) = containers_of(client, "web@cpu")
    assert container.status == "running" and container.labels["io.model-supervisor.spec-hash"]
    assert inst.pid == container.attrs["State"]["Pid"]
    await wait_until(lambda: "hello-from-container" in inst.log_file.path.read_text())
    await inst.stop()
    assert containers_of(client, "web@cpu") == []  # removed, its name free


async def test_docker_kill_is_noticed_and_restarted_with_backoff(
    engine: Engine, conf_dir: Path, client: Any
) -> None:
    write_decl(conf_dir, docker_decl("killed", restart={"initial_delay": 0.3, "jitter": 0.0}))
    await engine.start()
    inst = engine.instances["killed@cpu"]
    await inst.wait_state(State.RUNNING, timeout=30)
    (container,) = containers_of(client, "killed@cpu")
    container.kill()
    await inst.wait_state(State.BACKOFF, timeout=30)  # how soon: bench/docker_bench.py
    assert "killed by SIGKILL" in inst.history[-1].reason
    await inst.wait_for(lambda i: i.state == State.RUNNING and i.restarts == 1, timeout=30)
    backoff, starting = [t for t in inst.history if t.to_state in (State.BACKOFF, State.STARTING)][-2:]
    assert (starting.at - backoff.at).total_seconds() >= 0.29
    await wait_until(lambda: len(containers_of(client, "killed@cpu")) == 1)  # the dead one is removed
    (again,) = containers_of(client, "killed@cpu")
    assert again.id != container.id and inst.pid == again.attrs["State"]["Pid"]


async def test_stop_uses_the_stop_timeout(engine: Engine, conf_dir: Path, client: Any) -> None:
    # the shell ignores TERM (tini forwards it); the daemon SIGKILLs it after the timeout
    write_decl(
        conf_dir,
        docker_decl(
            "stubborn",
            ["sh", "-c", "trap '' TERM; httpd -p 127.0.0.1:{port} -h /www; while true; do sleep 1; done"],
            stop={"timeout": 1.0},
        ),
    )
    await engine.start()
    inst = engine.instances["stubborn@cpu"]
    await inst.wait_state(State.RUNNING, timeout=30)
    began = time.monotonic()
    await inst.stop()
    took = time.monotonic() - began
    assert took >= 0.9, took  # the stop timeout was waited out before the kill
    assert containers_of(client, "stubborn@cpu") == []


async def test_bad_image_is_reported_and_leaves_nothing(engine: Engine, conf_dir: Path, client: Any) -> None:
    write_decl(
        conf_dir,
        docker_decl("ghost", image="local/does-not-exist:1", pull="never", restart={"initial_delay": 30.0}),
    )
    write_decl(conf_dir, docker_decl("noexec", ["/bin/no-such-program"], restart={"initial_delay": 30.0}))
    await engine.start()
    ghost, noexec = engine.instances["ghost@cpu"], engine.instances["noexec@cpu"]
    await ghost.wait_state(State.BACKOFF, timeout=30)
    await noexec.wait_state(State.BACKOFF, timeout=30)
    assert "image local/does-not-exist:1 is not present locally" in ghost.history[-1].reason
    failure = noexec.history[-1]
    assert "exit code 127" in failure.reason
    assert any("no-such-program" in line for line in failure.log_tail), failure.log_tail
    assert containers_of(client, "ghost@cpu") == []
    await wait_until(lambda: containers_of(client, "noexec@cpu") == [])  # the dead one is removed


async def test_gpu_request_without_nvidia_runtime_fails_cleanly(
    engine: Engine, conf_dir: Path, client: Any
) -> None:
    info = client.info()
    if "nvidia" in (info.get("Runtimes") or {}):
        pytest.skip("this engine has the NVIDIA runtime; the failure path cannot be provoked")
    write_decl(conf_dir, docker_decl("gpu", gpus=[0], restart={"initial_delay": 30.0}))
    await engine.start()
    inst = engine.instances["gpu@gpu0"]
    await inst.wait_state(State.BACKOFF, timeout=30)
    assert "container failed to start" in inst.history[-1].reason and "gpu" in inst.history[-1].reason
    assert containers_of(client, "gpu@gpu0") == []  # removed so the name is free


async def test_no_daemon_fails_clearly_and_processes_still_run(
    settings: Settings, conf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{conf_dir.parent}/no-docker.sock")
    write_decl(conf_dir, docker_decl("needs-docker", restart={"initial_delay": 30.0}))
    write_decl(conf_dir, declaration("plain", ["sleep", "3600"]))
    engine = build(settings).engine
    try:
        await engine.start()
        await engine.instances["plain@cpu"].wait_state(State.RUNNING, timeout=10)
        docker_inst = engine.instances["needs-docker@cpu"]
        await docker_inst.wait_state(State.BACKOFF, timeout=30)
        missing = f"no Docker daemon at unix://{conf_dir.parent}/no-docker.sock"
        assert missing in docker_inst.history[-1].reason
        assert engine.runners["docker"].unavailable_reason() == missing
    finally:
        await engine.shutdown()


async def test_declaration_change_replaces_the_container(engine: Engine, conf_dir: Path, client: Any) -> None:
    write_decl(conf_dir, docker_decl("edited"))
    await engine.start()
    inst = engine.instances["edited@cpu"]
    await inst.wait_state(State.RUNNING, timeout=30)
    (first,) = containers_of(client, "edited@cpu")
    write_decl(conf_dir, docker_decl("edited", env={"VERSION": "2"}))
    await engine.reload("test")
    await inst.wait_for(
        lambda i: (
            i.state == State.RUNNING and len([t for t in i.history if t.to_state == State.RUNNING]) == 2
        ),
        timeout=30,
    )
    (second,) = containers_of(client, "edited@cpu")
    assert second.id != first.id and "VERSION=2" in second.attrs["Config"]["Env"]


# -- a supervisor restart finds its container again ---------------------------------------------
def _serve(conf: Path, state: Path, port: int, low: int, high: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
    env.update(MODEL_SUPERVISOR_PORT=str(port), MODEL_SUPERVISOR_PORT_RANGE=f"{low}-{high}")
    return subprocess.Popen(
        [PY, "-m", "supervisor", "serve", "--conf-dir", str(conf), "--state-dir", str(state)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_running(port: int, instance: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            items = json.loads(
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/models/status", timeout=2).read()
            )
            found = [i for i in items if i["instance_id"] == instance and i["state"] == "RUNNING"]
            if found:
                return found[0]
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{instance} never RUNNING"
        time.sleep(0.1)


def test_supervisor_restart_adopts_the_running_container(
    tmp_path: Path, settings: Settings, client: Any
) -> None:
    conf, state = settings.conf_dir, settings.state_dir
    write_decl(conf, docker_decl("triton-like"))
    port = free_port()
    low, high = free_range()
    first = _serve(conf, state, port, low, high)
    second = None
    try:
        _wait_running(port, "triton-like@cpu")
        (container,) = containers_of(client, "triton-like@cpu")
        first.send_signal(signal.SIGKILL)  # a crash: nothing gets stopped
        first.wait(timeout=10)
        container.reload()
        assert container.status == "running"
        second = _serve(conf, state, port, low, high)
        item = _wait_running(port, "triton-like@cpu")
        containers = containers_of(client, "triton-like@cpu")
        assert [c.id for c in containers] == [container.id], "a second container was started"
        assert item["pid"] == container.attrs["State"]["Pid"]
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 0, out
        assert "adopted running container" in out
        assert containers_of(client, "triton-like@cpu") == []
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for c in containers_of(client, "triton-like@cpu"):
            c.remove(force=True)


def test_container_of_a_declaration_removed_while_down_is_removed(
    tmp_path: Path, settings: Settings, client: Any
) -> None:
    """SIGKILL the supervisor, delete the declaration, start it again: the container goes."""
    conf, state = settings.conf_dir, settings.state_dir
    path = write_decl(conf, docker_decl("gone-while-down"))
    write_decl(conf, declaration("keeper"))
    port = free_port()
    low, high = free_range()
    first = _serve(conf, state, port, low, high)
    second = None
    try:
        _wait_running(port, "gone-while-down@cpu")
        (container,) = containers_of(client, "gone-while-down@cpu")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        path.unlink()
        second = _serve(conf, state, port, low, high)
        _wait_running(port, "keeper@cpu")
        deadline = time.monotonic() + 30
        while containers_of(client, "gone-while-down@cpu") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert containers_of(client, "gone-while-down@cpu") == [], "the container outlived its declaration"
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 0 and "removed leftover container" in out, out
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for c in containers_of(client, "gone-while-down@cpu"):
            c.remove(force=True)


def test_container_names_are_scoped(settings: Settings) -> None:
    assert (
        container_name(scope_of(settings.state_dir), "m@gpu0-1")
        == f"msup-{scope_of(settings.state_dir)}-m.gpu0-1"
    )


async def test_healthz_reports_docker_availability(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, conf_dir: Path
) -> None:
    from .api_helpers import running_api

    async with running_api(settings) as api:
        await wait_until(
            lambda: (
                api.engine.runners["docker"]._reason is None
                and not any(
                    t.get_name() == "docker runner check" and not t.done() for t in api.engine._background
                )
            )
        )
        assert (await api.get("/healthz")).json()["runners"] == {"process": None, "docker": None}
    monkeypatch.setenv("DOCKER_HOST", f"unix://{conf_dir.parent}/no-docker.sock")
    async with running_api(settings) as api:
        await wait_until(lambda: api.engine.runners["docker"].unavailable_reason() is not None)
        runners = (await api.get("/healthz")).json()["runners"]
        assert (
            runners["process"] is None
            and runners["docker"] == f"no Docker daemon at unix://{conf_dir.parent}/no-docker.sock"
        )
