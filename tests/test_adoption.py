"""The supervisor survives its own death: a restarted `serve` adopts what still runs, never
runs an instance twice, and leaves no marked process outside an instance (issue 10).

Everything here is real: `serve` processes, SIGKILLed at chosen moments, demo servers with
HTTP health checks, processes that ignore SIGTERM, and grandchildren inside and outside the
instance's session.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.adapters.marks import parse_environ
from supervisor.adapters.procscan import read_proc

from .conftest import alive, declaration, demo_cmd, free_range, sleep_cmd, write_decl
from .serve_helpers import Serve, kill_marked, marked_processes, wait_for

pytestmark = pytest.mark.slow  # real `serve` processes, SIGKILLed and started again

HTTP = {"type": "http", "path": "/health", "start_interval": 0.05, "interval": 0.5}
FAST = {"initial_delay": 0.0, "jitter": 0.0, "max_retries": 0, "min_uptime": 0.5}


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    conf, state = tmp_path / "conf.d", tmp_path / "state"
    conf.mkdir()
    yield conf, state
    kill_marked(state)  # after a failure; a passing test has left nothing


@pytest.fixture
def serves() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            os.killpg(s.proc.pid, signal.SIGKILL)
            s.proc.wait()


def the_mix(conf: Path, tmp_path: Path) -> dict[str, str]:
    """Write the instance mix of the issue; returns instance id -> the state it settles in."""
    write_decl(conf, declaration("quiet", sleep_cmd(), restart=FAST))
    write_decl(conf, declaration("web", demo_cmd(), health=HTTP, restart=FAST))
    write_decl(conf, declaration("slow", demo_cmd("--ready-after", "0.8"), health=HTTP, restart=FAST))
    write_decl(
        conf,
        declaration(
            "stubborn", demo_cmd("--ignore-sigterm"), health=HTTP, restart=FAST, stop={"timeout": 0.6}
        ),
    )
    write_decl(conf, declaration("family", demo_cmd("--spawn-grandchild"), health=HTTP, restart=FAST))
    write_decl(
        conf,
        declaration(
            "escapee", demo_cmd("--spawn-grandchild", "--grandchild-setsid"), health=HTTP, restart=FAST
        ),
    )
    return {f"{n}@cpu": "RUNNING" for n in ("quiet", "web", "slow", "stubborn", "family", "escapee")}


def check_invariants(state: Path, status: dict[str, dict]) -> None:
    """No instance has two runs; every marked process belongs to an instance's current run."""
    records = {p.stem: json.loads(p.read_text()) for p in (state / "run").glob("*.json")}
    tokens = {r["instance"]: r["token"] for r in records.values()}
    by_instance: dict[str, set[str]] = {}
    for pid, (token, instance) in marked_processes(state).items():
        by_instance.setdefault(instance, set()).add(token)
        assert tokens.get(instance) == token, (
            f"pid {pid} of {instance} (run {token}) belongs to no current run; current: {tokens}"
        )
    for instance, seen in by_instance.items():
        assert len(seen) == 1, f"{instance} has processes of {len(seen)} runs: {seen}"
    for iid, item in status.items():
        if item["state"] == "RUNNING":
            assert records[iid]["pid"] == item["pid"], (
                f"{iid}: API pid {item['pid']} != record {records[iid]}"
            )


MOMENTS = ["start-up", "running", "stop-all", "reload", "api-write", "running"]


@pytest.mark.timeout(900)  # about a minute on an idle machine; many on a loaded one
def test_supervisor_kill_rounds(dirs, serves, tmp_path: Path) -> None:
    """24 rounds: SIGKILL `serve` at a random moment, start it again, check the invariants."""
    conf, state = dirs
    wanted = the_mix(conf, tmp_path)
    ports = free_range()
    rng = random.Random(10)
    serves.append(Serve(conf, state, port_range=ports))
    before = serves[-1].wait_states(wanted)
    rounds = 24
    for n in range(rounds):
        current = serves[-1]
        moment = MOMENTS[n % len(MOMENTS)]
        kept: set[str] = set()  # instances whose pid must survive this round
        if moment == "start-up":
            time.sleep(rng.uniform(0.0, 0.5))
        elif moment == "running":
            before = current.wait_states(wanted)
            kept = set(wanted)
        elif moment == "stop-all":
            before = current.wait_states(wanted)
            os.kill(current.proc.pid, signal.SIGTERM)
            time.sleep(rng.uniform(0.05, 0.3))  # stubborn ignores SIGTERM for 0.6 s
            kept = {"stubborn@cpu"}
        elif moment == "reload":
            before = current.wait_states(wanted)
            write_decl(conf, declaration("web", demo_cmd("--name", f"web{n}"), health=HTTP, restart=FAST))
            time.sleep(rng.uniform(0.0, 0.15))
            kept = set(wanted) - {"web@cpu"}
        elif moment == "api-write":
            before = current.wait_states(wanted)
            try:
                current.post("/api/v1/models/quiet/disable", timeout=0.05)
            except OSError:
                pass  # killed while it writes: either outcome of the edit is fine
            kept = set(wanted) - {"quiet@cpu"}
        current.kill()
        if moment == "api-write":
            write_decl(
                conf, declaration("quiet", sleep_cmd(), restart=FAST)
            )  # enabled again for the next round
            kept.discard("quiet@cpu")
        serves.append(Serve(conf, state, port_range=ports))
        after = serves[-1].wait_states(wanted)
        check_invariants(state, after)
        still = {iid for iid in kept if before[iid]["pid"] is not None and alive(before[iid]["pid"])}
        for iid in still:
            assert after[iid]["pid"] == before[iid]["pid"], (
                f"round {n} ({moment}): {iid} was restarted ({before[iid]['pid']} -> {after[iid]['pid']})"
            )
            assert "adopt" in (after[iid]["reason"] or "") or after[iid]["restarts"] == 0
    final = serves[-1]
    assert final.terminate() == 0
    assert marked_processes(state) == {}, "processes of ours outlived the supervisor's stop"


def test_adopted_instance_keeps_pid_log_and_health_checks(dirs, serves) -> None:
    conf, state = dirs
    write_decl(conf, declaration("web", demo_cmd(), health=HTTP, restart=FAST))
    ports = free_range()
    first = Serve(conf, state, port_range=ports)
    serves.append(first)
    pid = first.wait_states({"web@cpu": "RUNNING"})["web@cpu"]["pid"]
    first.kill()
    second = Serve(conf, state, port_range=ports)
    serves.append(second)
    item = second.wait_states({"web@cpu": "RUNNING"})["web@cpu"]
    assert item["pid"] == pid and item["restarts"] == 0
    assert "adopted" in item["reason"]
    import urllib.request

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{second.port}/metrics", timeout=5).read().decode()
    assert any(
        line.startswith("model_supervisor_instance_adoptions_total{")
        and 'instance="web@cpu"' in line
        and line.endswith(" 1.0")
        for line in metrics.splitlines()
    ), metrics[:2000]
    # Health checks resumed against it: the demo logs each probe it answers, through the
    # descriptor it inherited from the first supervisor, into the same file.
    log = state / "logs" / "web@cpu.log"
    size = log.stat().st_size
    wait_for(lambda: log.stat().st_size > size, 30, "a health check of the adopted run in its log")
    # Its exit is noticed (a pidfd: it is not our child) and restarts it under its policy.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (second.status() or {}).get("web@cpu", {}).get("pid") not in (None, pid), 60)
    restarted = second.wait_states({"web@cpu": "RUNNING"})["web@cpu"]
    assert "unknown" in (restarted["last_exit"] or "") and restarted["restarts"] == 1
    assert second.terminate() == 0
    assert not alive(pid) and marked_processes(state) == {}


def test_second_serve_on_a_locked_state_dir_is_refused(dirs, serves) -> None:
    conf, state = dirs
    write_decl(conf, declaration("quiet", sleep_cmd()))
    ports = free_range()
    first = Serve(conf, state, port_range=ports)
    serves.append(first)
    first.wait_states({"quiet@cpu": "RUNNING"})
    second = Serve(conf, state, port_range=ports)
    serves.append(second)
    assert second.proc.wait(60) == 2
    assert f"in use by another supervisor (pid {first.proc.pid})" in second.output()
    assert len(marked_processes(state)) == 1  # the second one started nothing
    assert first.terminate() == 0


def test_keep_running_upgrade_costs_the_models_nothing(dirs, serves) -> None:
    conf, state = dirs
    wanted = {"web@cpu": "RUNNING", "quiet@cpu": "RUNNING", "escapee@cpu": "RUNNING"}
    write_decl(conf, declaration("web", demo_cmd(), health=HTTP, restart=FAST))
    write_decl(conf, declaration("quiet", sleep_cmd()))
    write_decl(
        conf, declaration("escapee", demo_cmd("--spawn-grandchild", "--grandchild-setsid"), health=HTTP)
    )
    ports = free_range()
    first = Serve(conf, state, "--keep-running", port_range=ports)
    serves.append(first)
    before = first.wait_states(wanted)
    processes = marked_processes(state)
    assert first.terminate() == 0
    assert "left running for the next supervisor" in first.output()
    assert marked_processes(state) == processes  # every process, grandchildren included, still there
    second = Serve(conf, state, port_range=ports)
    serves.append(second)
    after = second.wait_states(wanted)
    for iid in wanted:
        assert after[iid]["pid"] == before[iid]["pid"] and after[iid]["restarts"] == 0
    assert marked_processes(state) == processes
    log = state / "logs" / "web@cpu.log"
    size = log.stat().st_size
    wait_for(lambda: "adopted" in ((second.status() or {}).get("web@cpu", {}).get("reason") or ""), 30)
    health = second.get("/healthz")
    assert health["containment"] in ("cgroup", "mark+subreaper")
    # Health checks run against the adopted server (the demo logs each request it answers).
    wait_for(lambda: log.stat().st_size > size, 30, "health checks of the adopted server in its log")
    assert second.terminate() == 0
    assert marked_processes(state) == {}


def test_changed_declaration_replaces_the_old_run_stop_first(dirs, serves) -> None:
    conf, state = dirs
    port = free_range(1)[0]
    write_decl(conf, declaration("web", demo_cmd(), health=HTTP, port=port))
    ports = free_range()
    first = Serve(conf, state, port_range=ports)
    serves.append(first)
    old = first.wait_states({"web@cpu": "RUNNING"})["web@cpu"]["pid"]
    first.kill()
    write_decl(conf, declaration("web", demo_cmd("--name", "v2"), health=HTTP, port=port))
    second = Serve(conf, state, port_range=ports)
    serves.append(second)
    new = second.wait_states({"web@cpu": "RUNNING"})["web@cpu"]
    assert new["pid"] != old and not alive(old)
    assert new["restarts"] == 0  # the fixed port was free when it started: the old run went first
    assert "declaration changed while the supervisor was down" in second.output()
    assert second.terminate() == 0


def marked_stray(state: Path, token: str, release: Path | None = None):
    """A process that looks like an earlier supervisor's unrecorded run of quiet@cpu (its mark,
    no run record) and ignores SIGTERM. With `release`: it notes the SIGTERM it got (in
    `release` + ".term") and exits once the test creates `release`, so a test decides how long
    the sweep waits for it."""
    import subprocess

    from supervisor.adapters.marks import MARK_ENV, Mark, scope_of

    env = dict(os.environ, **{MARK_ENV: Mark(scope_of(state), token, "quiet@cpu").value()})
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    if release is not None:
        code = (
            "import os, signal, time\n"
            f"signal.signal(signal.SIGTERM, lambda *_: open({f'{release}.term'!r}, 'w').close())\n"
            f"while not os.path.exists({str(release)!r}): time.sleep(0.02)\n"
        )
    stray = subprocess.Popen(["python3", "-c", code], env=env, start_new_session=True)
    wait_for(lambda: parse_environ(open(f"/proc/{stray.pid}/environ", "rb").read()) is not None, 30)
    return stray


def test_unrecorded_leftover_is_stopped_and_logged(dirs, serves, tmp_path: Path) -> None:
    """A process with our mark and no run record (SIGKILL between spawn and record) is a
    leftover: stopped with TERM, then KILL, and logged with its command line."""
    conf, state = dirs
    write_decl(conf, declaration("quiet", sleep_cmd(), stop={"timeout": 1.0}))
    stray = marked_stray(state, "deadbeef0000")
    try:
        s = Serve(conf, state, port_range=free_range())
        serves.append(s)
        s.wait_states({"quiet@cpu": "RUNNING"})
        wait_for(lambda: stray.poll() is not None, 60, "the leftover to be stopped")
        assert stray.returncode == -signal.SIGKILL  # it ignored SIGTERM
        out = s.output()
        assert f"stopping leftover pid {stray.pid} of instance quiet@cpu" in out and "time.sleep(600)" in out
        assert s.terminate() == 0
    finally:
        if stray.poll() is None:
            stray.kill()
        stray.wait()


def test_setsid_grandchild_is_stopped_with_its_instance(dirs, serves, tmp_path: Path) -> None:
    """The grandchild left the session and its parent died: the subreaper (or its mark) still
    finds it when the instance stops."""
    conf, state = dirs
    pidfile = tmp_path / "gc.pid"
    write_decl(
        conf,
        declaration(
            "escapee",
            demo_cmd("--spawn-grandchild", "--grandchild-setsid", "--grandchild-pidfile", str(pidfile)),
            health=HTTP,
        ),
    )
    s = Serve(conf, state, port_range=free_range())
    serves.append(s)
    leader = s.wait_states({"escapee@cpu": "RUNNING"})["escapee@cpu"]["pid"]
    wait_for(pidfile.exists, 30)
    grandchild = int(pidfile.read_text())
    info = read_proc(grandchild)
    assert info is not None and info.sid != read_proc(leader).sid  # really outside the session
    s.post("/api/v1/models/escapee/disable")
    wait_for(lambda: not alive(grandchild), 30, "the setsid grandchild to be stopped with its instance")
    assert not alive(leader)
    assert s.terminate() == 0
    assert marked_processes(state) == {}


def test_a_run_started_while_the_sweep_runs_is_not_a_leftover(dirs, serves, tmp_path: Path) -> None:
    """The start-up sweep is slow when a leftover ignores SIGTERM; a model declared meanwhile
    starts at once and must survive the sweep (its run token is this supervisor's).

    The leftover outlives its SIGTERM until the test releases it (the stop timeout is far
    longer than any start-up), so the sweep is surely still waiting while `late` starts."""
    conf, state = dirs
    write_decl(conf, declaration("quiet", sleep_cmd(), stop={"timeout": 600.0}))
    release = tmp_path / "release-the-leftover"
    stray = marked_stray(state, "0123456789ab", release)
    try:
        s = Serve(conf, state, port_range=free_range())
        serves.append(s)
        wait_for(lambda: s.status() is not None, 60, "the API")
        wait_for(Path(f"{release}.term").exists, 60, "the sweep's SIGTERM to the leftover")
        write_decl(conf, declaration("late", sleep_cmd()))
        late = s.wait_states({"late@cpu": "RUNNING"}, timeout=60)["late@cpu"]
        assert stray.poll() is None, "the sweep should still be waiting out the leftover's stop timeout"
        assert s.status()["quiet@cpu"]["pid"] is None  # a fresh launch waits for the sweep
        release.touch()
        wait_for(lambda: stray.poll() is not None, 30, "the leftover to end")
        after = s.wait_states({"late@cpu": "RUNNING", "quiet@cpu": "RUNNING"})
        assert after["late@cpu"]["pid"] == late["pid"] and after["late@cpu"]["restarts"] == 0
        assert s.terminate() == 0
    finally:
        if stray.poll() is None:
            stray.kill()
        stray.wait()
