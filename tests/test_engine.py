"""The engine with real child processes: restarts, backoff, FATAL, health, stop, ports, logs."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from supervisor.config.settings import Settings
from supervisor.core.states import State
from supervisor.runtime.engine import Engine
from supervisor.wiring import build

from .conftest import FAST_RESTART, PY, alive, declaration, demo_cmd, free_port, wait_until, write_decl

pytestmark = pytest.mark.slow  # real child processes


def exit_cmd(code: int, after: float = 0.0) -> list[str]:
    return [PY, "-c", f"import sys, time; time.sleep({after}); print('bye', flush=True); sys.exit({code})"]


def transitions(inst, to: State | None = None):
    return [t for t in inst.history if to is None or t.to_state == to]


async def start_one(engine: Engine, doc: dict, conf_dir: Path):
    write_decl(conf_dir, doc)
    await engine.start()
    return engine.instances[f"{doc['name']}@cpu"]


async def test_crash_restarts_after_the_right_delays(engine: Engine, conf_dir: Path) -> None:
    restart = {"initial_delay": 0.2, "factor": 2.0, "max_delay": 0.6, "jitter": 0.0, "max_retries": 0}
    inst = await start_one(engine, declaration("crashy", exit_cmd(3), restart=restart), conf_dir)
    await inst.wait_for(lambda i: len(transitions(i, State.BACKOFF)) >= 4, timeout=20)
    history = list(inst.history)
    gaps = []
    for before, after in zip(history, history[1:], strict=False):
        if before.to_state == State.BACKOFF and after.to_state == State.STARTING:
            gaps.append((after.at - before.at).total_seconds())
    assert len(gaps) >= 3
    # The delays the policy chose (0.2, doubled, capped at 0.6), each waited out in full. How
    # much later than due a start comes is the machine's load, not the policy's: no upper bound.
    delays = [t.reason.split("restarting in ")[1].split(" s")[0] for t in transitions(inst, State.BACKOFF)]
    assert delays[:4] == ["0.20", "0.40", "0.60", "0.60"], delays
    for gap, expected in zip(gaps, [0.2, 0.4, 0.6, 0.6], strict=False):
        assert expected - 0.01 <= gap, (gaps, expected)
    backoff = transitions(inst, State.BACKOFF)[0]
    assert "exited unexpectedly (exit code 3)" in backoff.reason
    assert backoff.exit.code == 3
    assert any("bye" in line for line in backoff.log_tail)
    assert inst.restarts >= 3


async def test_crash_loop_goes_fatal_and_cooldown_retries_once(engine: Engine, conf_dir: Path) -> None:
    restart = {**FAST_RESTART, "max_retries": 2, "fatal_cooldown": 0.5}
    inst = await start_one(engine, declaration("loop", exit_cmd(1), restart=restart), conf_dir)
    await inst.wait_state(State.FATAL, timeout=10)
    assert len(transitions(inst, State.STARTING)) == 3  # first start + max_retries
    assert "gave up after 3 consecutive failures" in inst.history[-1].reason
    await inst.wait_for(lambda i: len(transitions(i, State.FATAL)) == 2, timeout=30)
    assert len(transitions(inst, State.STARTING)) == 4  # exactly one more try after the cooldown
    starting = transitions(inst, State.STARTING)[-1]
    assert "cooldown" in starting.reason
    # ... and not before the cooldown was over (timed by the transitions, not by when we looked).
    assert (starting.at - transitions(inst, State.FATAL)[0].at).total_seconds() >= 0.49


async def test_explicit_start_leaves_fatal(engine: Engine, conf_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "fixed"
    cmd = [
        PY,
        "-c",
        f"import os, sys, time; os.path.exists({str(marker)!r}) or sys.exit(2); time.sleep(3600)",
    ]
    inst = await start_one(
        engine, declaration("flaky", cmd, restart={**FAST_RESTART, "max_retries": 1}), conf_dir
    )
    await inst.wait_state(State.FATAL, timeout=10)
    marker.touch()
    await inst.start("operator start")
    await inst.wait_state(State.RUNNING, timeout=10)
    await asyncio.sleep(0.3)
    assert inst.state == State.RUNNING and inst.failures == 0


async def test_editing_the_declaration_leaves_fatal(engine: Engine, conf_dir: Path) -> None:
    doc = declaration(
        "edited", exit_cmd(1), restart={**FAST_RESTART, "max_retries": 1, "fatal_cooldown": 0.0}
    )
    inst = await start_one(engine, doc, conf_dir)
    await inst.wait_state(State.FATAL, timeout=10)
    write_decl(conf_dir, {**doc, "command": [PY, "-c", "import time; time.sleep(3600)"]})
    await engine.reload("test")
    await inst.wait_state(State.RUNNING, timeout=10)
    assert transitions(inst, State.STARTING)[-1].reason == "declaration changed"


@pytest.mark.parametrize(
    "policy,code,expected",
    [
        ("always", 0, State.BACKOFF),
        ("always", 1, State.BACKOFF),
        ("on-failure", 0, State.EXITED),
        ("on-failure", 1, State.BACKOFF),
        ("never", 0, State.EXITED),
        ("never", 1, State.EXITED),
    ],
)
async def test_restart_policy(
    engine: Engine, conf_dir: Path, policy: str, code: int, expected: State
) -> None:
    restart = {**FAST_RESTART, "initial_delay": 5.0, "policy": policy}
    inst = await start_one(engine, declaration("p", exit_cmd(code, 0.1), restart=restart), conf_dir)
    await inst.wait_state(State.BACKOFF, State.EXITED, timeout=10)
    assert inst.state == expected
    assert inst.last_exit.code == code


async def test_success_exit_codes(engine: Engine, conf_dir: Path) -> None:
    restart = {**FAST_RESTART, "policy": "on-failure", "success_exit_codes": [0, 75]}
    inst = await start_one(engine, declaration("codes", exit_cmd(75, 0.1), restart=restart), conf_dir)
    await inst.wait_state(State.BACKOFF, State.EXITED, timeout=10)
    assert inst.state == State.EXITED


async def test_term_ignoring_process_is_killed_after_stop_timeout(engine: Engine, conf_dir: Path) -> None:
    doc = declaration(
        "stubborn",
        demo_cmd("--ignore-sigterm"),
        health={"type": "tcp", "start_interval": 0.05},
        stop={"timeout": 0.5},
    )
    inst = await start_one(engine, doc, conf_dir)
    await inst.wait_state(State.RUNNING, timeout=10)
    pid = inst.pid
    began = time.monotonic()
    await inst.stop()
    took = time.monotonic() - began
    assert took >= 0.5, took  # the stop timeout was waited out before the SIGKILL
    assert inst.state == State.STOPPED and not alive(pid)
    assert inst.history[-1].exit.signal == 9
    assert inst.history[-1].reason == "stopped (killed by SIGKILL)"


@pytest.mark.parametrize("setsid", [False, True], ids=["same-group", "own-session"])
@pytest.mark.parametrize("ignore_term", [False, True], ids=["obeys-term", "ignores-term"])
async def test_no_grandchild_survives_stop(
    engine: Engine, conf_dir: Path, tmp_path: Path, setsid, ignore_term
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    extra = ["--spawn-grandchild", "--grandchild-pidfile", str(pidfile)]
    extra += ["--grandchild-setsid"] if setsid else []
    extra += ["--ignore-sigterm"] if ignore_term else []
    doc = declaration(
        "tree", demo_cmd(*extra), health={"type": "tcp", "start_interval": 0.05}, stop={"timeout": 0.5}
    )
    inst = await start_one(engine, doc, conf_dir)
    await inst.wait_state(State.RUNNING, timeout=10)
    await wait_until(pidfile.exists)
    grandchild = int(pidfile.read_text())
    assert alive(grandchild)
    await inst.stop()
    assert not alive(grandchild), "grandchild survived the stop"


async def test_workers_left_by_a_crash_are_stopped_before_the_restart(
    engine: Engine, conf_dir: Path, tmp_path: Path
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    doc = declaration(
        "leaky",
        demo_cmd("--spawn-grandchild", "--grandchild-pidfile", str(pidfile), "--exit-after", "0.5"),
        restart={**FAST_RESTART, "initial_delay": 5.0},
        stop={"timeout": 0.5},
    )
    inst = await start_one(engine, doc, conf_dir)
    await wait_until(pidfile.exists)
    grandchild = int(pidfile.read_text())
    await inst.wait_state(State.BACKOFF, timeout=10)
    assert not alive(grandchild), "the crashed run's worker still runs while we plan the restart"


async def test_health_gates_running(engine: Engine, conf_dir: Path) -> None:
    doc = declaration(
        "slow", demo_cmd("--ready-after", "1.0"), health={"type": "http", "start_interval": 0.1}
    )
    inst = await start_one(engine, doc, conf_dir)
    await inst.wait_state(State.RUNNING, timeout=30)
    # It stayed STARTING until its server was ready (1 s after its start, which comes after
    # the STARTING transition): read from the transitions, not from a look after a sleep.
    assert [t.to_state for t in inst.history] == [State.STARTING, State.RUNNING]
    starting, running = transitions(inst, State.STARTING)[0], transitions(inst, State.RUNNING)[0]
    assert (running.at - starting.at).total_seconds() >= 1.0
    assert running.reason == "ready: GET /health -> 200"


async def test_not_ready_within_start_timeout_is_a_failed_start(engine: Engine, conf_dir: Path) -> None:
    doc = declaration(
        "never-ready",
        demo_cmd("--ready-after", "100"),
        health={"type": "http", "start_interval": 0.1, "start_timeout": 0.8},
        restart={**FAST_RESTART, "initial_delay": 5.0},
    )
    inst = await start_one(engine, doc, conf_dir)
    await inst.wait_state(State.STARTING, timeout=5)
    await wait_until(lambda: inst.pid is not None)
    pid = inst.pid
    await inst.wait_state(State.BACKOFF, timeout=10)
    assert "not ready within start_timeout (0.8 s); last probe: GET /health -> 503" in inst.history[-1].reason
    assert [t.to_state for t in inst.history][-2:] == [State.STOPPING, State.BACKOFF]
    assert not alive(pid)


async def test_running_instance_that_stops_answering_is_restarted(engine: Engine, conf_dir: Path) -> None:
    doc = declaration(
        "flaky-health",
        demo_cmd("--unhealthy-after", "0.6"),
        health={"type": "http", "start_interval": 0.05, "interval": 0.1, "failure_threshold": 2},
        restart=FAST_RESTART,
    )
    inst = await start_one(engine, doc, conf_dir)
    await inst.wait_state(State.RUNNING, timeout=10)
    first_pid = inst.pid
    await inst.wait_for(lambda i: len(transitions(i, State.RUNNING)) >= 2, timeout=10)
    stopping = transitions(inst, State.STOPPING)[0]
    assert "stopped answering its health check (GET /health -> 500)" in stopping.reason
    assert inst.pid != first_pid and not alive(first_pid)


async def test_port_held_by_another_process(engine: Engine, conf_dir: Path) -> None:
    port = free_port()
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", port))
    holder.listen()
    try:
        doc = declaration(
            "blocked",
            demo_cmd(),
            port=port,
            health={"type": "tcp"},
            restart={**FAST_RESTART, "initial_delay": 5.0},
        )
        inst = await start_one(engine, doc, conf_dir)
        await inst.wait_state(State.BACKOFF, timeout=10)
        reason = inst.history[-1].reason
        import os

        assert f"port {port} is already in use by pid {os.getpid()}" in reason, reason
        assert inst.pid is None
        assert not inst.log_file.path.exists() or "starting" not in inst.log_file.path.read_text()
    finally:
        holder.close()
    await inst.start("port freed")
    await inst.wait_state(State.RUNNING, timeout=10)


async def test_log_goes_to_file_and_rotates(tmp_path: Path, conf_dir: Path, settings: Settings) -> None:
    settings = settings.model_copy(update={"log_max_bytes": 20_000, "log_backups": 4})
    engine = build(settings).engine
    try:
        doc = declaration(
            "chatty", demo_cmd("--spam", "2000"), health={"type": "tcp", "start_interval": 0.05}
        )
        inst = await start_one(engine, doc, conf_dir)
        await inst.wait_state(State.RUNNING, timeout=10)
        path = inst.log_file.path
        backups = [path.with_name(f"{path.name}.{n}") for n in (1, 2, 3, 4)]
        await wait_until(backups[0].exists, timeout=30)
        # The 2000 lines (236 kB) are written before the server listens (RUNNING), but the size
        # check runs every 0.2 s: the file may be past the limit until the next check rotates it.
        await wait_until(lambda: inst.log_file.size() < 20_000, timeout=30)
        assert inst.log_file.size() < 20_000
        # The first lines went to a backup (the newest, or an older one when checks fell in the
        # middle of the burst); no fifth one is kept.
        assert any("log line 00000000" in b.read_text() for b in backups if b.exists())
        assert not path.with_name(f"{path.name}.5").exists()
        # the child keeps writing at the (new) end of the truncated file: no NUL hole
        import urllib.request

        urllib.request.urlopen(f"http://127.0.0.1:{inst.spec.port}/health").read()
        await wait_until(lambda: "GET /health" in inst.log_file.path.read_text(errors="replace"))
        assert "\x00" not in inst.log_file.path.read_text(errors="replace")
    finally:
        await engine.shutdown()


async def test_environment_and_gpu_pinning(engine: Engine, conf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    code = (
        "import os, time; keys = ['CUDA_VISIBLE_DEVICES', 'NVIDIA_VISIBLE_DEVICES', 'CUDA_DEVICE_ORDER', "
        "'MODEL_SUPERVISOR_INSTANCE', 'MODEL_SUPERVISOR_PORT', 'GREETING'];"
        f"open({str(out)!r}, 'w').write(repr([os.environ.get(k) for k in keys])); time.sleep(3600)"
    )
    write_decl(
        conf_dir,
        declaration(
            "envy",
            [PY, "-c", code],
            gpus=[[1, 3]],
            port=free_port() - 1,  # a base: the instance listens on base + 1
            env={"GREETING": "hi {name}"},
        ),
    )
    await engine.start()
    inst = engine.instances["envy@gpu1-3"]
    await inst.wait_state(State.RUNNING, timeout=10)
    await wait_until(lambda: out.exists() and out.read_text())
    assert eval(out.read_text()) == [
        "1,3",
        "1,3",
        "PCI_BUS_ID",
        "envy@gpu1-3",
        str(inst.spec.port),
        "hi envy",
    ]


async def test_spec_change_replaces_only_that_instance(engine: Engine, conf_dir: Path) -> None:
    a = declaration("a", demo_cmd(), health={"type": "tcp", "start_interval": 0.05})
    b = declaration("b", demo_cmd(), health={"type": "tcp", "start_interval": 0.05})
    write_decl(conf_dir, a)
    write_decl(conf_dir, b)
    await engine.start()
    ia, ib = engine.instances["a@cpu"], engine.instances["b@cpu"]
    await ia.wait_state(State.RUNNING, timeout=10)
    await ib.wait_state(State.RUNNING, timeout=10)
    pid_a, pid_b = ia.pid, ib.pid
    write_decl(conf_dir, {**a, "command": demo_cmd("--name", "a2")})
    write_decl(conf_dir, {**b, "restart": {"max_retries": 9}})  # policy only: applied in place
    steps = await engine.reload("test")
    assert steps.replace == ["a@cpu"] and steps.update == ["b@cpu"]
    await ia.wait_for(lambda i: i.state == State.RUNNING and i.pid != pid_a, timeout=10)
    assert not alive(pid_a)
    assert ib.pid == pid_b and ib.state == State.RUNNING
    assert ib.spec.restart.max_retries == 9
    assert [t.to_state for t in ia.history][-4:] == [
        State.STOPPING,
        State.STOPPED,
        State.STARTING,
        State.RUNNING,
    ]


async def test_unchanged_reload_touches_nothing(engine: Engine, conf_dir: Path) -> None:
    path = write_decl(conf_dir, declaration("calm"))
    await engine.start()
    inst = engine.instances["calm@cpu"]
    await inst.wait_state(State.RUNNING, timeout=10)
    pid, count = inst.pid, len(inst.history)
    path.write_text("# just a comment\n" + path.read_text())
    steps = await engine.reload("test")
    assert steps.empty and inst.pid == pid and len(inst.history) == count


async def test_removed_declaration_stops_instance(engine: Engine, conf_dir: Path) -> None:
    path = write_decl(conf_dir, declaration("gone"))
    await engine.start()
    inst = engine.instances["gone@cpu"]
    await inst.wait_state(State.RUNNING, timeout=10)
    pid = inst.pid
    path.unlink()
    await engine.reload("test")
    await asyncio.wait_for(inst.finished, 10)
    assert "gone@cpu" not in engine.instances and not alive(pid)


async def test_disabled_declaration_is_known_but_not_running(engine: Engine, conf_dir: Path) -> None:
    doc = declaration("off", enabled=False)
    write_decl(conf_dir, doc)
    await engine.start()
    inst = engine.instances["off@cpu"]
    await asyncio.sleep(0.2)
    assert inst.state == State.STOPPED and inst.pid is None
    write_decl(conf_dir, {**doc, "enabled": True})
    await engine.reload("test")
    await inst.wait_state(State.RUNNING, timeout=10)
    write_decl(conf_dir, doc)
    await engine.reload("test")
    await inst.wait_state(State.STOPPED, timeout=10)


async def test_instances_stop_concurrently(engine: Engine, conf_dir: Path) -> None:
    for n in range(12):
        write_decl(
            conf_dir,
            declaration(
                f"s{n}",
                demo_cmd("--ignore-sigterm"),
                health={"type": "tcp", "start_interval": 0.05},
                stop={"timeout": 1.0},
            ),
        )
    await engine.start()
    for inst in engine.instances.values():
        await inst.wait_state(State.RUNNING, timeout=20)
    pids = [inst.pid for inst in engine.instances.values()]
    await engine.shutdown()
    assert not any(alive(p) for p in pids)
    # Concurrent: every stop began before the first one ended (each waits out its 1 s timeout,
    # so one at a time would put each STOPPING after the STOPPED before it).
    stopping = [transitions(i, State.STOPPING)[-1].at for i in engine.instances.values()]
    stopped = [transitions(i, State.STOPPED)[-1].at for i in engine.instances.values()]
    assert max(stopping) < min(stopped), "the stops ran one after another"
    assert all(t.exit.signal == 9 for i in engine.instances.values() for t in transitions(i, State.STOPPED))


async def test_state_dir_records_pid_and_start_time(
    engine: Engine, conf_dir: Path, settings: Settings
) -> None:
    import json

    inst = await start_one(engine, declaration("rec"), conf_dir)
    await inst.wait_state(State.RUNNING, timeout=10)
    record_file = settings.state_dir / "run" / "rec@cpu.json"
    await wait_until(record_file.exists)
    record = json.loads(record_file.read_text())
    assert (
        record["pid"] == inst.pid
        and record["starttime"] > 0
        and record["launch_hash"] == inst.spec.launch_hash
    )
    await inst.stop()
    assert not record_file.exists()


async def test_missing_executable_is_a_clear_failure(engine: Engine, conf_dir: Path, tmp_path: Path) -> None:
    # A program missing at load is a config error (tests/test_hostile_declarations.py); one that
    # disappears later (here: it deletes itself on its first run) is a clear failed start.
    program = tmp_path / "serve"
    program.write_text('#!/bin/sh\nrm -f "$0"\nexit 1\n')
    program.chmod(0o755)
    inst = await start_one(
        engine, declaration("typo", [str(program)], restart={**FAST_RESTART, "max_retries": 1}), conf_dir
    )
    await inst.wait_state(State.FATAL, timeout=10)
    assert f"could not start: command not found: '{program}'" in inst.history[-1].reason


async def test_removed_right_after_start_never_orphans_a_process(settings: Settings, conf_dir: Path) -> None:
    """Regression: a stop handled between the spawn and the actor seeing it left the child behind."""
    for attempt in range(15):
        engine = build(settings).engine
        write_decl(conf_dir, declaration("quick", ["sleep", "3600"]))
        await engine.start()
        await asyncio.sleep(attempt * 0.001)
        await engine.shutdown()
        inst = next(iter(engine.instances.values()))
        assert inst.state == State.STOPPED
        assert inst.pid is None


async def test_a_crashing_prestart_check_fails_the_start_instead_of_wedging_it(
    settings: Settings, conf_dir: Path
) -> None:
    async def broken(inst, spec) -> None:
        raise RuntimeError("plugin bug")

    engine = build(settings, prestart=[broken]).engine
    try:
        write_decl(conf_dir, declaration("wedge", restart={**FAST_RESTART, "initial_delay": 30.0}))
        await engine.start()
        inst = engine.instances["wedge@cpu"]
        await inst.wait_state(State.BACKOFF, timeout=10)
        assert "internal error while launching: RuntimeError: plugin bug" in inst.history[-1].reason
        await inst.stop()
        assert inst.state == State.STOPPED
    finally:
        await engine.shutdown()
