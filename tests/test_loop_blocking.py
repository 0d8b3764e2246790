"""Nothing blocks the loop (issue 19): spawns and state writes run in threads.

With 100 declaration files dropped at once, every fork+exec, every run record and every write
of state/ happens off the event loop's thread. The loop-step figures (asyncio debug mode, no
step over 20 ms) live in bench/loop_bench.py: a wall-clock bound in a test fails on a busy
machine for reasons that are not ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from supervisor.config.settings import Settings
from supervisor.core.states import State
from supervisor.wiring import build

from .conftest import declaration, free_range, wait_until, write_decl

pytestmark = pytest.mark.slow

FILES = 100


async def test_a_hundred_files_spawn_and_record_off_the_loop(
    settings: Settings, conf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.get_ident()
    on_loop: list[str] = []
    real_popen_init = subprocess.Popen.__init__
    real_replace = os.replace

    def popen_init(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        if threading.get_ident() == loop_thread:
            on_loop.append(f"spawn of {args!r}")
        real_popen_init(self, args, *rest, **kwargs)

    def replace(src: Any, dst: Any, *rest: Any, **kwargs: Any) -> None:
        if threading.get_ident() == loop_thread and str(settings.state_dir) in str(dst):
            on_loop.append(f"write of {dst}")
        real_replace(src, dst, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen_init)
    monkeypatch.setattr(os, "replace", replace)
    settings = settings.model_copy(update={"port_range": free_range(FILES + 20)})
    sup = build(settings)
    engine = sup.engine
    await engine.start(watch=True)
    try:
        for i in range(FILES):
            # `{port}` in the command: each instance gets an automatic port (kept in ports.json).
            write_decl(
                conf_dir, declaration(f"m{i:03d}", ["sleep", "3600", "{port}"], health={"type": "none"})
            )
        await wait_until(
            lambda: sum(1 for i in engine.instances.values() if i.state == State.RUNNING) == FILES,
            timeout=120,
        )
        # Remove half: their automatic ports are forgotten (a write of ports.json).
        for i in range(0, FILES, 2):
            (conf_dir / f"m{i:03d}.toml").unlink()
        await wait_until(lambda: len(engine.instances) == FILES // 2 and not engine.removing, timeout=120)
        await wait_until(
            lambda: len(json.loads((settings.state_dir / "ports.json").read_text())) == FILES // 2,
            timeout=30,
        )
    finally:
        await engine.shutdown()
    assert on_loop == [], on_loop[:5]
    # The check can fail: the same spy sees a spawn made on the loop.
    subprocess.Popen(["true"]).wait()
    assert on_loop and on_loop[-1].startswith("spawn of")
