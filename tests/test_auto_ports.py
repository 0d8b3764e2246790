"""Automatic ports stay automatic (issue 10, item 5): a stranger on an instance's remembered
port moves it to another port of the range; a fixed port keeps backing off naming the holder;
assignments of declarations that are gone leave ports.json."""

from __future__ import annotations

import json
import socket

import pytest

from supervisor.config.settings import Settings
from supervisor.core.states import State
from supervisor.runtime.engine import Engine
from supervisor.wiring import build

from .conftest import FAST_RESTART, declaration, demo_cmd, free_port, wait_until, write_decl

pytestmark = pytest.mark.slow  # real processes on real ports

HTTP = {"type": "http", "path": "/health", "start_interval": 0.05}


def listener(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


async def test_auto_port_taken_by_a_stranger_moves_to_another(settings: Settings, conf_dir) -> None:
    write_decl(conf_dir, declaration("web", demo_cmd(), health=HTTP, restart=FAST_RESTART))
    first = build(settings).engine
    await first.start()
    inst = first.instances["web@cpu"]
    await inst.wait_state(State.RUNNING, timeout=20)
    old = inst.spec.port
    await first.shutdown()
    stranger = listener(old)  # while the supervisor was down, someone took the port
    try:
        second = build(settings).engine
        try:
            await second.start(watch=True)
            await wait_until(
                lambda: (
                    second.instances["web@cpu"].state == State.RUNNING
                    and second.instances["web@cpu"].spec.port != old
                ),
                timeout=20,
            )
            inst = second.instances["web@cpu"]
            assert any(f"automatic port {old} is held by" in t.reason for t in inst.history)
            saved = json.loads((settings.state_dir / "ports.json").read_text())
            assert saved["web@cpu"] == inst.spec.port != old
        finally:
            await second.shutdown()
    finally:
        stranger.close()


async def test_fixed_port_taken_backs_off_naming_the_holder(engine: Engine, conf_dir) -> None:
    port = free_port()
    stranger = listener(port)
    try:
        write_decl(
            conf_dir,
            declaration(
                "web", demo_cmd(), health=HTTP, port=port, restart={**FAST_RESTART, "initial_delay": 0.5}
            ),
        )
        await engine.start()
        inst = engine.instances["web@cpu"]
        await inst.wait_state(State.BACKOFF, timeout=10)
        assert f"port {port} is already in use by pid" in inst.history[-1].reason
        assert inst.spec.port == port
    finally:
        stranger.close()


async def test_assignments_of_removed_declarations_are_pruned(
    engine: Engine, conf_dir, settings: Settings
) -> None:
    path = write_decl(conf_dir, declaration("web", demo_cmd(), health=HTTP))
    write_decl(conf_dir, declaration("other", demo_cmd(), health=HTTP))
    await engine.start()
    ports = settings.state_dir / "ports.json"
    assert set(json.loads(ports.read_text())) == {"web@cpu", "other@cpu"}
    path.unlink()
    await engine.reload("test")
    await wait_until(lambda: set(json.loads(ports.read_text())) == {"other@cpu"}, timeout=10)
