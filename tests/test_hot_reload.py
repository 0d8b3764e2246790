"""Hot reload of conf.d/: real files in a temp dir, the real watcher, real processes."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import tomli_w

from supervisor.adapters.watcher import ConfWatcher
from supervisor.config.settings import Settings
from supervisor.core.events import Event, EventBus
from supervisor.core.states import State
from supervisor.runtime.engine import Engine
from supervisor.wiring import build

from .conftest import FAST_RESTART, PY, alive, declaration, demo_cmd, wait_until, write_decl

SLEEP = ["sleep", "3600"]


async def next_event(
    bus: EventBus, predicate: Callable[[Event], bool], since: int = 0, timeout: float = 10
) -> Event:
    async def find() -> Event:
        async for event in bus.subscribe(since):
            if predicate(event):
                return event
        raise AssertionError("unreachable")

    return await asyncio.wait_for(find(), timeout)


def last_id(bus: EventBus) -> int:
    return bus.history[-1].id if bus.history else 0


def became(iid: str, state: State) -> Callable[[Event], bool]:
    return lambda e: e.type == "transition" and e.data["instance"] == iid and e.data["to"] == state.value


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[Engine]:
    """An engine following conf.d/ with its watcher, already watching."""
    engine = build(settings).engine
    try:
        await engine.start(watch=True)
        await asyncio.wait_for(engine.watcher.active.wait(), 10)
        await wait_until(lambda: engine.watcher._reasons == [] and not engine.watcher._dirty.is_set())
        yield engine
    finally:
        await asyncio.wait_for(engine.shutdown(), 60)


async def running(engine: Engine, iid: str, since: int = 0, timeout: float = 10):
    await next_event(engine.bus, became(iid, State.RUNNING), since, timeout)
    return engine.instances[iid]


@pytest.mark.slow
async def test_new_file_by_atomic_replace_starts_it(live: Engine, conf_dir: Path) -> None:
    mark = last_id(live.bus)
    write_decl(conf_dir, declaration("fresh", SLEEP))
    inst = await running(live, "fresh@cpu", mark)
    assert alive(inst.pid)


@pytest.mark.slow
async def test_in_place_edit_replaces_the_instance(live: Engine, conf_dir: Path) -> None:
    path = write_decl(conf_dir, declaration("edit", SLEEP))
    inst = await running(live, "edit@cpu")
    old = inst.pid
    mark = last_id(live.bus)
    with open(path, "w") as f:  # in place: same inode, a `modified` event
        f.write(tomli_w.dumps(declaration("edit", ["sleep", "3601"])))
    await next_event(live.bus, became("edit@cpu", State.RUNNING), mark)
    assert inst.pid != old and not alive(old)
    assert inst.spec.launch.argv == ("sleep", "3601")


@pytest.mark.slow
async def test_deleted_file_stops_it(live: Engine, conf_dir: Path) -> None:
    path = write_decl(conf_dir, declaration("doomed", SLEEP))
    inst = await running(live, "doomed@cpu")
    pid = inst.pid
    path.unlink()
    await asyncio.wait_for(inst.finished, 10)
    assert not alive(pid) and "doomed@cpu" not in live.instances


@pytest.mark.slow
async def test_editor_save_patterns_apply_final_content_only(live: Engine, conf_dir: Path) -> None:
    path = write_decl(conf_dir, declaration("vim", SLEEP))
    inst = await running(live, "vim@cpu")
    mark = last_id(live.bus)
    # vim: swap file, the 4913 probe, rename to backup, write anew, drop the backup
    (conf_dir / ".vim.toml.swp").write_bytes(b"\x00garbage")
    (conf_dir / "4913").write_text("")
    (conf_dir / "4913").unlink()
    os.rename(path, conf_dir / "vim.toml~")
    path.write_text(tomli_w.dumps(declaration("vim", ["sleep", "3602"])))
    (conf_dir / "vim.toml~").unlink()
    # emacs: lock file (a dangling symlink) and autosave
    os.symlink("root@host.1234", conf_dir / ".#vim.toml")
    (conf_dir / "#vim.toml#").write_text("name = broken")
    # something atomic-writing a temp file next to it
    (conf_dir / "vim.toml.tmp").write_text("not toml [")
    await next_event(live.bus, became("vim@cpu", State.RUNNING), mark)
    assert inst.spec.launch.argv == ("sleep", "3602")
    await asyncio.sleep(0.3)
    assert live.config_errors() == []
    assert list(live.instances) == ["vim@cpu"]


@pytest.mark.slow
async def test_two_hundred_files_at_once(live: Engine, conf_dir: Path, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    for n in range(200):
        (staging / f"m{n:03d}.toml").write_text(tomli_w.dumps(declaration(f"m{n:03d}", SLEEP)))
    reloads = live.watcher.reloads
    for path in sorted(staging.iterdir()):
        os.replace(path, conf_dir / path.name)
    await wait_until(lambda: len(live.instances) == 200, timeout=20)
    for inst in list(live.instances.values()):
        await inst.wait_state(State.RUNNING, timeout=30)
    await asyncio.sleep(0.3)
    assert live.watcher.reloads - reloads == 1, "the burst was not coalesced into one reconcile"
    assert live.config_errors() == []


@pytest.mark.slow
async def test_rapid_edits_final_content_wins(live: Engine, conf_dir: Path) -> None:
    for version in range(15):
        write_decl(conf_dir, declaration("rapid", SLEEP, env={"VERSION": str(version)}))
        await asyncio.sleep(0.01)
    await wait_until(lambda: "rapid@cpu" in live.instances)
    inst = live.instances["rapid@cpu"]
    await inst.wait_for(
        lambda i: i.state == State.RUNNING and dict(i.running_spec.launch.env)["VERSION"] == "14", timeout=15
    )
    await asyncio.sleep(0.3)
    assert inst.state == State.RUNNING and dict(inst.running_spec.launch.env)["VERSION"] == "14"


@pytest.mark.slow
async def test_broken_edit_keeps_running_then_fix_applies(live: Engine, conf_dir: Path) -> None:
    path = write_decl(conf_dir, declaration("steady", SLEEP))
    inst = await running(live, "steady@cpu")
    pid = inst.pid
    mark = last_id(live.bus)
    path.write_text(
        'name = "steady"\nbackend = "process"\ncommand = ["sleep", "3601"]\n[restart]\nmax_retries = "x"\n'
    )
    event = await next_event(live.bus, lambda e: e.type == "config_error", mark)
    assert event.data["file"] == str(path)
    (error,) = live.config_errors()
    assert error["key"] == "restart.max_retries" and error["file"] == str(path)
    await asyncio.sleep(0.3)
    assert inst.pid == pid and inst.state == State.RUNNING  # the last good version keeps running
    mark = last_id(live.bus)
    write_decl(conf_dir, declaration("steady", ["sleep", "3601"]))
    await next_event(live.bus, became("steady@cpu", State.RUNNING), mark)
    assert live.config_errors() == [] and inst.pid != pid


async def test_broken_error_logged_once_per_change(
    live: Engine, conf_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = conf_dir / "bad.toml"
    path.write_text("name = \n")
    await wait_until(lambda: live.config_errors())
    live.request_reload("again")
    live.request_reload("and again")
    await asyncio.sleep(0.3)
    assert (
        len([r for r in caplog.records if "config error" in r.getMessage() and "bad.toml" in r.getMessage()])
        == 1
    )


async def test_broken_from_the_start_declares_nothing(settings: Settings, conf_dir: Path) -> None:
    (conf_dir / "bad.toml").write_text('name = "bad"\nbackend = "process"\n')
    engine = build(settings).engine
    try:
        await engine.start(watch=True)
        assert engine.instances == {}
        assert engine.config_errors() == [
            {
                "file": str(conf_dir / "bad.toml"),
                "key": "command",
                "line": None,
                "message": "required key is missing",
            }
        ]
    finally:
        await engine.shutdown()


@pytest.mark.slow
async def test_rename_with_same_content_restarts_nothing(live: Engine, conf_dir: Path) -> None:
    path = write_decl(conf_dir, declaration("moved", SLEEP))
    inst = await running(live, "moved@cpu")
    pid, transitions = inst.pid, len(inst.history)
    os.rename(path, conf_dir / "renamed.toml")
    await wait_until(lambda: str(inst.spec.source).endswith("renamed.toml"))
    path2 = conf_dir / "renamed.toml"
    os.utime(path2)  # touched without change
    path2.write_text("# only a comment\n" + path2.read_text())
    await asyncio.sleep(0.4)
    assert inst.pid == pid and len(inst.history) == transitions and live.instances["moved@cpu"] is inst


@pytest.mark.slow
async def test_removed_while_in_backoff_or_starting(live: Engine, conf_dir: Path) -> None:
    backoff = write_decl(
        conf_dir,
        declaration(
            "waiting", [PY, "-c", "import sys; sys.exit(1)"], restart={**FAST_RESTART, "initial_delay": 30.0}
        ),
    )
    starting = write_decl(
        conf_dir,
        declaration(
            "loading", demo_cmd("--ready-after", "100"), health={"type": "http", "start_interval": 0.05}
        ),
    )
    await wait_until(lambda: "waiting@cpu" in live.instances and "loading@cpu" in live.instances)
    waiting, loading = live.instances["waiting@cpu"], live.instances["loading@cpu"]
    await waiting.wait_state(State.BACKOFF, timeout=10)
    await wait_until(lambda: loading.pid is not None)
    pid = loading.pid
    backoff.unlink()
    starting.unlink()
    await asyncio.wait_for(asyncio.gather(waiting.finished, loading.finished), 10)
    assert waiting.state == loading.state == State.STOPPED
    assert not alive(pid)


@pytest.mark.slow
async def test_readded_during_stop_no_duplicate_no_loss(live: Engine, conf_dir: Path) -> None:
    doc = declaration(
        "phoenix",
        demo_cmd("--ignore-sigterm"),
        health={"type": "tcp", "start_interval": 0.05},
        stop={"timeout": 1.0},
    )
    path = write_decl(conf_dir, doc)
    old = await running(live, "phoenix@cpu")
    old_pid = old.pid
    path.unlink()
    await old.wait_state(State.STOPPING, timeout=10)
    mark = last_id(live.bus)
    write_decl(conf_dir, doc)
    await wait_until(lambda: live.instances.get("phoenix@cpu") not in (None, old))
    new = live.instances["phoenix@cpu"]
    await next_event(live.bus, became("phoenix@cpu", State.RUNNING), mark, timeout=15)
    starting = [t for t in new.history if t.to_state == State.STARTING][0]
    stopped = [t for t in old.history if t.to_state == State.STOPPED][0]
    assert not alive(old_pid) and alive(new.pid)
    assert old.state == State.STOPPED and new.state == State.RUNNING
    assert new.pid != old_pid
    # the new process was spawned only after the old one was gone (same port)
    assert any("starting phoenix@cpu" in line for line in new.log_file.tail(50))
    assert stopped.at <= new.history[-1].at and starting.at <= new.history[-1].at


@pytest.mark.slow
async def test_duplicate_name_second_file_rejected_then_takes_over(live: Engine, conf_dir: Path) -> None:
    a = write_decl(conf_dir, declaration("twin", SLEEP), "a.toml")
    inst = await running(live, "twin@cpu")
    b = write_decl(conf_dir, declaration("twin", ["sleep", "3603"]), "b.toml")
    await wait_until(lambda: live.config_errors())
    (error,) = live.config_errors()
    assert error["file"] == str(b) and str(a) in error["message"]
    mark = last_id(live.bus)
    a.unlink()
    await next_event(live.bus, became("twin@cpu", State.RUNNING), mark)
    assert live.config_errors() == [] and live.instances["twin@cpu"].spec.launch.argv == ("sleep", "3603")
    assert inst is live.instances["twin@cpu"]


@pytest.mark.slow
async def test_conf_dir_deleted_and_restored(live: Engine, conf_dir: Path, tmp_path: Path) -> None:
    write_decl(conf_dir, declaration("survivor", SLEEP))
    inst = await running(live, "survivor@cpu")
    pid = inst.pid
    backup = tmp_path / "backup"
    shutil.copytree(conf_dir, backup)
    shutil.rmtree(conf_dir)
    await asyncio.sleep(1.5)
    assert inst.pid == pid and inst.state == State.RUNNING  # keep running what runs
    write_decl(backup, declaration("newcomer", SLEEP))
    mark = last_id(live.bus)
    os.rename(backup, conf_dir)
    await next_event(live.bus, became("newcomer@cpu", State.RUNNING), mark, timeout=10)
    assert inst.pid == pid
    mark = last_id(live.bus)
    write_decl(conf_dir, declaration("later", SLEEP))  # watching resumed on the new directory
    await next_event(live.bus, became("later@cpu", State.RUNNING), mark, timeout=5)


# -- the watcher alone, with a recording reload --------------------------------------------
@asynccontextmanager
async def recording_watcher(
    directory: Path, resync_interval: float
) -> AsyncIterator[tuple[ConfWatcher, list[str]]]:
    """A real watcher on `directory` whose reloads are only recorded (their reasons)."""
    calls: list[str] = []

    async def record(reason: str) -> None:
        calls.append(reason)

    watcher = ConfWatcher(directory, record, resync_interval=resync_interval)
    task = asyncio.create_task(watcher.run())
    try:
        yield watcher, calls
    finally:
        watcher.stop()
        await asyncio.wait_for(task, 5)


async def test_watcher_coalesces_bursts_and_takes_requests(tmp_path: Path) -> None:
    async with recording_watcher(tmp_path, resync_interval=3600) as (watcher, calls):
        await asyncio.wait_for(watcher.active.wait(), 5)
        await wait_until(lambda: calls == ["watch started"], timeout=3)
        for n in range(30):
            (tmp_path / f"f{n}.toml").write_text("x")
        (tmp_path / "ignored.txt").write_text("x")
        await wait_until(lambda: len(calls) == 2)
        await asyncio.sleep(0.3)
        assert calls[1:] == ["conf.d changed"]
        watcher.request("SIGHUP")
        await wait_until(lambda: len(calls) == 3)
        assert calls[2] == "SIGHUP"


async def test_watcher_periodic_resync(tmp_path: Path) -> None:
    async with recording_watcher(tmp_path, resync_interval=1.0) as (_watcher, calls):
        await wait_until(lambda: len([c for c in calls if "periodic resync" in c]) >= 2, timeout=5)


async def test_watcher_ignores_non_declarations(tmp_path: Path) -> None:
    async with recording_watcher(tmp_path, resync_interval=3600) as (watcher, calls):
        await asyncio.wait_for(watcher.active.wait(), 5)
        await wait_until(lambda: calls == ["watch started"])
        for name in (".hidden.toml", "x.toml.tmp", "x.toml~", "4913", ".x.toml.swp", "notes.txt", "#x.toml#"):
            (tmp_path / name).write_text("junk")
        await asyncio.sleep(0.5)
        assert calls == ["watch started"]


@pytest.mark.slow
async def test_resync_of_an_unchanged_directory_parses_nothing(
    live: Engine, conf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic safety-net resync costs a stat per file, not a parse (idle CPU)."""
    from supervisor.adapters import confd

    path = write_decl(conf_dir, declaration("cached", SLEEP))
    await running(live, "cached@cpu")
    parsed: list[str] = []
    real = confd.read_file
    monkeypatch.setattr(confd, "read_file", lambda p, *a: parsed.append(p.name) or real(p, *a))
    steps = await live.reload("resync")
    assert parsed == [] and steps.empty
    path.write_text(path.read_text() + "\n# touched\n")
    await live.reload("resync")
    assert parsed == ["cached.toml"]
