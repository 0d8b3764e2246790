"""`model-supervisor serve` as a real process: signals, shutdown, nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import PY, REPO, alive, declaration, demo_cmd, free_range, wait_for, write_decl


def records(state: Path) -> dict[str, dict]:
    out = {}
    for path in (state / "run").glob("*.json"):
        try:
            out[path.stem] = json.loads(path.read_text())
        except ValueError:
            pass
    return out


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    procs: list[subprocess.Popen] = []

    def start(conf: Path, state: Path, *extra: str) -> subprocess.Popen:
        low, high = free_range()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
        env["MODEL_SUPERVISOR_PORT_RANGE"] = f"{low}-{high}"
        proc = subprocess.Popen(
            [PY, "-m", "supervisor", "serve", "--conf-dir", str(conf), "--state-dir", str(state), *extra],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_sigterm_stops_every_child_and_exits_zero(serve, tmp_path: Path) -> None:
    conf, state = tmp_path / "conf.d", tmp_path / "state"
    conf.mkdir()
    pidfile = tmp_path / "grandchild.pid"
    tcp = {"type": "tcp", "start_interval": 0.05}
    write_decl(conf, declaration("web", demo_cmd(), health=tcp))
    write_decl(
        conf,
        declaration(
            "stubborn",
            demo_cmd(
                "--ignore-sigterm",
                "--spawn-grandchild",
                "--grandchild-setsid",
                "--grandchild-pidfile",
                str(pidfile),
            ),
            health=tcp,
            stop={"timeout": 1.0},
        ),
    )
    write_decl(conf, declaration("sleeper", stop={"timeout": 0.5}))
    proc = serve(conf, state)
    wait_for(lambda: len(records(state)) == 3 and pidfile.exists(), 60)
    pids = [r["pid"] for r in records(state).values()] + [int(pidfile.read_text())]
    assert all(alive(p) for p in pids)
    proc.send_signal(signal.SIGTERM)
    # The stops run at once (the longest timeout is 1 s); how long that takes is measured in
    # bench/core_bench.py (stop_all_100_ms, term_ignoring_stop_ms), not asserted here.
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert not [p for p in pids if alive(p)], output
    assert "stopping every instance" in output
    assert records(state) == {}


@pytest.mark.slow
def test_sigint_and_sighup(serve, tmp_path: Path) -> None:
    conf, state = tmp_path / "conf.d", tmp_path / "state"
    conf.mkdir()
    write_decl(conf, declaration("first"))
    proc = serve(conf, state)
    wait_for(lambda: set(records(state)) == {"first@cpu"}, 60)
    write_decl(conf, declaration("second"))
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: set(records(state)) == {"first@cpu", "second@cpu"}, 60)
    pids = [r["pid"] for r in records(state).values()]
    proc.send_signal(signal.SIGINT)  # serve handles it itself, even when started with it ignored
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "received SIGHUP" in output
    assert not any(alive(p) for p in pids)


@pytest.mark.slow
def test_missing_conf_dir_is_a_clear_error(serve, tmp_path: Path) -> None:
    proc = serve(tmp_path / "nope", tmp_path / "state")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"declaration directory {tmp_path / 'nope'} does not exist" in output


@pytest.mark.slow
def test_bad_settings_are_a_clear_error(serve, tmp_path: Path) -> None:
    settings = tmp_path / "settings.toml"
    settings.write_text('port_range = "30000-20000"\n[restart]\nmax_retries = -1\n')
    proc = serve(tmp_path, tmp_path / "state", "--settings", str(settings))
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "restart.max_retries" in output and "greater than or equal to 0" in output


def test_settings_sources_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.config.settings import load_settings

    for key in list(os.environ):
        if key.startswith("MODEL_SUPERVISOR_"):
            monkeypatch.delenv(key)
    file = tmp_path / "s.toml"
    file.write_text('port = 7000\nhost = "127.0.0.2"\n[restart]\nmax_retries = 7\ninitial_delay = 3\n')
    monkeypatch.setenv("MODEL_SUPERVISOR_PORT", "7100")
    monkeypatch.setenv("MODEL_SUPERVISOR_RESTART__MAX_RETRIES", "8")
    s = load_settings(file, host="127.0.0.3")
    assert (s.port, s.host, s.restart.max_retries, s.restart.initial_delay) == (7100, "127.0.0.3", 8, 3.0)
    assert s.defaults().restart.max_retries == 8
    monkeypatch.setenv("MODEL_SUPERVISOR_SETTINGS_FILE", str(file))
    monkeypatch.delenv("MODEL_SUPERVISOR_PORT")
    assert load_settings().port == 7000
