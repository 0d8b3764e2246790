"""Issue 11, item 6: a full disk is reported, never half-applied.

A real full disk: a 256 KiB tmpfs mounted for the test (root only; CI runs as root), filled
up, holding the state dir or the conf dir of a real engine behind a real API on 127.0.0.1."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.config.settings import Settings
from supervisor.core.states import State

from .api_helpers import running_api
from .conftest import declaration, wait_until, write_decl

pytestmark = pytest.mark.slow  # real processes and servers

#: Listens on its {port}: an automatic port is assigned (and recorded in ports.json).
LISTENER = [sys.executable, "-c", "import sys, time; time.sleep(3600)", "{port}"]


class Disk:
    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.filler = mount / ".filler"

    def fill(self) -> None:
        """Write until the file system says ENOSPC (in shrinking chunks, so nothing is left)."""
        with open(self.filler, "ab", buffering=0) as f:
            for chunk in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        f.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
        with pytest.raises(OSError):
            (self.mount / ".check").write_bytes(b"\0" * 4096)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
        (self.mount / ".check").unlink(missing_ok=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full disk) needs root; CI runs as root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield Disk(mount)
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def ports_json(settings: Settings) -> dict[str, int]:
    path = settings.state_dir / "ports.json"
    return json.loads(path.read_text()) if path.exists() else {}


async def test_put_with_a_full_state_disk_is_507_and_changes_nothing(
    settings: Settings, conf_dir: Path, disk: Disk
) -> None:
    settings = settings.model_copy(update={"state_dir": disk.mount / "state"})
    async with running_api(settings) as api:
        before = ports_json(settings)
        disk.fill()
        r = await api.put("/api/v1/models/new", json={"backend": "process", "command": LISTENER})
        assert r.status_code == 507, r.text
        assert r.json()["detail"] == (
            f"no space left on device while writing {settings.state_dir}; nothing was changed"
        )
        assert not (conf_dir / "new.toml").exists()
        await api.engine.reload("test")  # nothing was written, so nothing appears later either
        assert "new@cpu" not in api.engine.instances
        assert ports_json(settings) == before

        health = (await api.get("/healthz")).json()
        assert health["status"] == "degraded", health
        assert health["state_dir"] == {
            "path": str(settings.state_dir),
            "writable": False,
            "reason": f"no space left on device while writing {settings.state_dir}",
        }
        assert health["degraded"] == [
            f"state dir: no space left on device while writing {settings.state_dir}"
        ]

        disk.free()  # recovers by itself: no restart, no request needed

        async def healthy() -> bool:
            return (await api.get("/api/v1/healthz")).json()["status"] == "ok"

        for _ in range(50):
            if await healthy():
                break
            await __import__("asyncio").sleep(0.1)
        assert await healthy()

        r = await api.put("/api/v1/models/new", json={"backend": "process", "command": LISTENER})
        assert r.status_code == 201, r.text
        inst = api.engine.instances["new@cpu"]
        await inst.wait_state(State.RUNNING, timeout=10)
        assert ports_json(settings)["new@cpu"] == inst.spec.port


async def test_put_with_a_full_conf_disk_keeps_the_old_file_and_instance(
    settings: Settings, tmp_path: Path, disk: Disk
) -> None:
    conf = disk.mount / "conf.d"
    conf.mkdir()
    path = write_decl(conf, declaration("m"))
    old_text = path.read_text()
    settings = settings.model_copy(update={"conf_dir": conf})
    async with running_api(settings) as api:
        inst = api.engine.instances["m@cpu"]
        await inst.wait_state(State.RUNNING, timeout=10)
        pid = inst.pid
        disk.fill()
        r = await api.put("/api/v1/models/m", json={"backend": "process", "command": LISTENER})
        assert r.status_code == 507, r.text
        assert r.json()["detail"] == f"no space left on device while writing {path}; nothing was changed"
        assert path.read_text() == old_text
        assert [p.name for p in conf.iterdir()] == ["m.toml"]  # no temp file left behind
        # The automatic port recorded for the new version was taken back.
        assert "m@cpu" not in ports_json(settings)
        await api.engine.reload("test")
        assert api.engine.instances["m@cpu"].pid == pid and inst.state == State.RUNNING
        disk.free()


async def test_a_start_with_a_full_state_disk_blames_the_disk_not_the_program(
    settings: Settings, conf_dir: Path, disk: Disk
) -> None:
    settings = settings.model_copy(update={"state_dir": disk.mount / "state"})
    async with running_api(settings) as api:
        disk.fill()
        write_decl(
            conf_dir, declaration("s", ["sleep", "3600"], restart={"max_retries": 0, "initial_delay": 0.0})
        )
        await api.engine.reload("test")
        inst = api.engine.instances["s@cpu"]
        await inst.wait_state(State.BACKOFF, State.FATAL, timeout=10)
        reason = next(t.reason for t in inst.history if t.to_state in (State.BACKOFF, State.FATAL))
        log = settings.state_dir / "logs" / "s@cpu.log"
        assert "cannot execute" not in reason, reason
        assert (
            f"cannot write the instance log: no space left on device while writing {log}" in reason
            or f"cannot open the instance log: no space left on device while opening {log}" in reason
        ), reason
        disk.free()


async def test_hand_dropped_file_on_a_full_state_disk_waits_for_its_port_to_be_recorded(
    settings: Settings, conf_dir: Path, disk: Disk
) -> None:
    """The issue: after space was freed, an auto port assignment was missing from ports.json."""
    settings = settings.model_copy(update={"state_dir": disk.mount / "state"})
    async with running_api(settings) as api:
        disk.fill()
        path = write_decl(conf_dir, declaration("auto", LISTENER))
        await api.engine.reload("test")
        assert "auto@cpu" not in api.engine.instances
        (err,) = api.engine.catalog.errors[str(path)]
        assert err.message == (
            "instance auto@cpu: cannot record its automatic port: no space left on device "
            f"while writing {settings.state_dir / 'ports.json'}"
        )
        assert not (settings.state_dir / ".ports.json.tmp").exists()
        disk.free()
        await api.engine.reload("periodic resync")
        inst = api.engine.instances["auto@cpu"]
        await inst.wait_state(State.RUNNING, timeout=10)
        assert ports_json(settings)["auto@cpu"] == inst.spec.port
        await wait_until(lambda: not api.engine.catalog.errors)
