"""Failure reasons carry what the server itself said (issue 12, item 6), and a start whose log
says it failed is a failed start even while the process lives on (textgen's port switch)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from supervisor.core.states import State
from supervisor.runtime.engine import Engine

from .conftest import FAST_RESTART, PY, declaration, write_decl

pytestmark = pytest.mark.slow  # real child processes


async def test_failed_start_reason_carries_the_servers_error_line(engine: Engine, conf_dir: Path) -> None:
    script = (
        "import sys; print('loading config', flush=True); "
        "print('error: creating server: Invalid argument - --model-repository must be specified', flush=True); "
        "print('shutting down', flush=True); sys.exit(1)"
    )
    write_decl(
        conf_dir,
        declaration(
            "triton-ish",
            [PY, "-c", script],
            health={"type": "tcp"},
            port="auto",
            restart={**FAST_RESTART, "initial_delay": 5.0},
        ),
    )
    await engine.start()
    inst = engine.instances["triton-ish@cpu"]
    await inst.wait_state(State.BACKOFF, timeout=15)
    reason = inst.history[-1].reason
    assert reason.startswith(
        "could not start: exited before becoming ready (exit code 1)"
    ) or reason.startswith("exited before becoming ready (exit code 1)"), reason
    assert "error: creating server: Invalid argument - --model-repository must be specified" in reason
    assert inst.last_error and "--model-repository must be specified" in inst.last_error


async def test_argparse_error_is_the_reason(engine: Engine, conf_dir: Path) -> None:
    script = (
        "import argparse; p = argparse.ArgumentParser(prog='main.py'); p.add_argument('--port'); "
        "p.parse_args(['--bogus'])"
    )
    write_decl(
        conf_dir,
        declaration(
            "comfy-ish",
            [PY, "-c", script],
            restart={**FAST_RESTART, "initial_delay": 5.0},
            health={"type": "tcp", "start_timeout": 10},
            port="auto",
        ),
    )
    await engine.start()
    inst = engine.instances["comfy-ish@cpu"]
    await inst.wait_state(State.BACKOFF, timeout=15)
    assert "main.py: error: unrecognized arguments: --bogus" in inst.history[-1].reason


async def test_textgen_port_switch_in_its_log_fails_the_start(engine: Engine, conf_dir: Path) -> None:
    """text-generation-webui moves to another port when its own is taken and says so only in
    its log; the supervisor would probe the wrong port for the whole start_timeout."""
    checkout = conf_dir.parent / "tgw"
    checkout.mkdir()
    (checkout / "server.py").write_text(
        "import sys, time\n"
        "port = sys.argv[sys.argv.index('--api-port') + 1]\n"
        "print(f'Port {port} is already in use. Using port 65001 instead', flush=True)\n"
        "time.sleep(600)\n"
    )
    (conf_dir / "chat.toml").write_text(
        f'name = "chat"\nbackend = "textgen"\ntextgen_path = "{checkout}"\npython = "{sys.executable}"\n'
        "[restart]\ninitial_delay = 5.0\njitter = 0.0\n[health]\nstart_timeout = 120\nstart_interval = 0.05\n"
    )
    await engine.start()
    inst = engine.instances["chat@cpu"]
    await inst.wait_state(State.BACKOFF, timeout=20)
    reason = inst.history[-1].reason
    assert "its log says" in reason and "is already in use. Using port 65001 instead" in reason, reason
    assert inst.pid is None  # the process that lived on was stopped
