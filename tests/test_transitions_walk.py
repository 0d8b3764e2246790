"""Walk the whole transition table with real processes: every allowed pair must be reached.

The table test (test_states) proves the table holds exactly the moves written out there
(`ALLOWED`); this one proves each of them is not dead code, by driving real instances through
scenarios that produce it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from supervisor.config.settings import Settings
from supervisor.core.states import State
from supervisor.wiring import build

from .conftest import FAST_RESTART, PY, declaration, demo_cmd, wait_until, write_decl
from .test_states import ALLOWED

pytestmark = pytest.mark.slow  # real child processes

S = State


def exit_cmd(code: int, after: float = 0.0) -> list[str]:
    return [PY, "-c", f"import sys, time; time.sleep({after}); sys.exit({code})"]


async def test_every_allowed_transition_is_reachable(settings: Settings, conf_dir: Path) -> None:
    blocker = asyncio.Event()

    async def hold_gated(inst, spec) -> None:
        if spec.model == "gated":
            await blocker.wait()

    engine = build(settings, prestart=[hold_gated]).engine
    one_retry = {**FAST_RESTART, "max_retries": 1, "fatal_cooldown": 0.0}
    docs = [
        declaration("plain"),
        declaration("crashy", exit_cmd(1, 0.05), restart=one_retry),
        declaration("oneshot", exit_cmd(0, 0.05), restart={**FAST_RESTART, "policy": "never"}),
        declaration(
            "slowpoke",
            demo_cmd("--ready-after", "100"),
            restart=one_retry,
            health={"type": "http", "start_interval": 0.05, "start_timeout": 0.4},
        ),
        declaration(
            "quitter",
            demo_cmd("--ready-after", "100", "--exit-after", "0.2"),
            restart=one_retry,
            health={"type": "http", "start_interval": 0.05},
        ),
        declaration("waiting", exit_cmd(1, 0.05), restart={**FAST_RESTART, "initial_delay": 30.0}),
        declaration("gated"),
        declaration(
            "sickly",
            demo_cmd("--unhealthy-after", "0.3"),
            restart={**FAST_RESTART, "policy": "never"},
            health={"type": "http", "start_interval": 0.05, "interval": 0.05, "failure_threshold": 1},
        ),
        declaration(
            "loading", demo_cmd("--ready-after", "100"), health={"type": "http", "start_interval": 0.05}
        ),
    ]
    for doc in docs:
        write_decl(conf_dir, doc)
    try:
        await engine.start()
        inst = {name.split("@")[0]: i for name, i in engine.instances.items()}

        await inst["plain"].wait_state(S.RUNNING, timeout=10)
        await inst["plain"].stop()  # RUNNING->STOPPING->STOPPED

        await inst["crashy"].wait_state(S.FATAL, timeout=10)  # RUNNING->BACKOFF->STARTING, RUNNING->FATAL
        await inst["crashy"].start()  # FATAL->STARTING
        await inst["crashy"].wait_for(
            lambda i: len([t for t in i.history if t.to_state == S.FATAL]) == 2, timeout=10
        )
        await inst["crashy"].stop()  # FATAL->STOPPED

        await inst["oneshot"].wait_state(S.EXITED, timeout=10)  # RUNNING->EXITED
        await inst["oneshot"].start()  # EXITED->STARTING
        await inst["oneshot"].wait_for(
            lambda i: len([t for t in i.history if t.to_state == S.EXITED]) == 2, timeout=10
        )
        await inst["oneshot"].stop()  # EXITED->STOPPED

        await inst["slowpoke"].wait_state(S.FATAL, timeout=15)  # STARTING->STOPPING->BACKOFF, STOPPING->FATAL
        await inst["quitter"].wait_state(S.FATAL, timeout=15)  # STARTING->BACKOFF, STARTING->FATAL

        await inst["waiting"].wait_state(S.BACKOFF, timeout=10)
        await inst["waiting"].stop()  # BACKOFF->STOPPED

        await inst["gated"].wait_state(S.STARTING, timeout=10)
        await inst["gated"].stop()  # STARTING->STOPPED (nothing spawned yet)
        assert inst["gated"].pid is None

        await inst["sickly"].wait_state(S.EXITED, timeout=10)  # STOPPING->EXITED (unhealthy, policy never)

        await wait_until(lambda: inst["loading"].pid is not None)
        await inst["loading"].stop()  # STARTING->STOPPING (process exists)
    finally:
        blocker.set()
        await engine.shutdown()

    seen = {(t.from_state, t.to_state) for i in inst.values() for t in i.history}
    assert seen <= ALLOWED, f"moves nobody expects: {sorted(seen - ALLOWED)}"
    assert ALLOWED - seen == set(), f"never reached: {sorted(ALLOWED - seen)}"
