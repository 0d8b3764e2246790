"""API edits change only the values they change (issue 13): comments, layout and key order stay."""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path

import pytest

from supervisor.config.settings import Settings
from supervisor.core import tomledit

from .api_helpers import running_api
from .conftest import sleep_cmd

HAND_WRITTEN = """\
# Written by hand: every comment, the alignment and the key order must survive API edits.

name    = "handmade"      # the model's name
backend = "process"
description = 'single-quoted, on purpose'

gpus = [ 0 ,   2 ]        # the GPUs, odd spacing kept
command = [
    {cmd0},   # the interpreter
    {cmd1},
    {cmd2},
]

# Health check, with a comment above the table
[health]
type     = "none"         # nothing to probe

[restart]   # a comment on the header
policy = "always"
initial_delay = 0.0
"""


def _gpus_line_changed(before: str, after: str, gpus: list[int]) -> None:
    """Only the `gpus` line changed, its comment kept (tomlkit may respace inside the brackets)."""
    diff = _diff(before, after)
    assert len(diff) == 2 and diff[0].startswith("-gpus = [") and diff[1].startswith("+gpus = ["), diff
    assert diff[1].endswith("]        # the GPUs, odd spacing kept"), diff
    assert tomllib.loads(diff[1][1:])["gpus"] == gpus


def _diff(before: str, after: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


@pytest.mark.slow
async def test_start_stop_enable_disable_put_change_only_their_values(settings: Settings) -> None:
    cmd = sleep_cmd()
    text = HAND_WRITTEN.format(cmd0=f'"{cmd[0]}"', cmd1=f'"{cmd[1]}"', cmd2=f'"{cmd[2]}"')
    path = settings.conf_dir / "handmade.toml"
    path.write_text(text)
    async with running_api(settings) as api:
        assert api.engine.catalog.models["handmade"].decl.gpus == [0, 2]

        r = await api.post("/api/v1/models/start", json={"model_name": "handmade", "gpu_id": 5})
        assert r.status_code == 202, r.text
        after = path.read_text()
        _gpus_line_changed(text, after, [0, 2, 5])

        r = await api.post("/api/v1/models/stop", json={"model_name": "handmade", "gpu_id": 0})
        assert r.status_code == 200, r.text
        text, after = after, path.read_text()
        _gpus_line_changed(text, after, [2, 5])

        r = await api.post("/api/v1/models/handmade/disable")
        assert r.status_code == 200, r.text
        text, after = after, path.read_text()
        diff = _diff(text, after)
        assert diff == ["+enabled = false"], diff  # one new line, nothing else moved

        r = await api.post("/api/v1/models/handmade/enable")
        assert r.status_code == 202, r.text
        text, after = after, path.read_text()
        assert _diff(text, after) == ["-enabled = false"]  # back to the file as written

        # PUT of the whole declaration with one key changed: only that line differs.
        doc = tomllib.loads(after)
        doc["restart"]["initial_delay"] = 0.5
        r = await api.put("/api/v1/models/handmade", json=doc)
        assert r.status_code == 200, r.text
        text, after = after, path.read_text()
        assert _diff(text, after) == ["-initial_delay = 0.0", "+initial_delay = 0.5"]
        assert "# Health check, with a comment above the table" in after
        assert "[restart]   # a comment on the header" in after
        assert api.engine.catalog.models["handmade"].decl.restart.initial_delay == 0.5


@pytest.mark.slow
async def test_a_new_file_has_a_natural_key_order(settings: Settings) -> None:
    async with running_api(settings) as api:
        r = await api.post(
            "/api/v1/models/start",
            json={
                "model_name": "fresh",
                "gpu_id": 1,
                "model_type": "process",
                "config": {
                    "health": {"type": "none"},
                    "command": sleep_cmd(),
                    "description": "new",
                    "port": 9,
                },
            },
        )
        assert r.status_code == 202, r.text
        text = (settings.conf_dir / "fresh.toml").read_text()
    keys = [line.split("=")[0].strip() for line in text.splitlines() if line and not line.startswith("[")]
    assert keys[:6] == ["name", "backend", "description", "gpus", "port", "command"], text
    assert text.index("command =") < text.index("[health]")
    # `command` stays on one line, not exploded over many
    assert sum(1 for line in text.splitlines() if line.startswith("command = [")) == 1 and '",\n' not in text


def test_apply_is_a_no_op_for_an_unchanged_document() -> None:
    text = HAND_WRITTEN.format(cmd0='"a"', cmd1='"b"', cmd2='"c"')
    doc = tomledit.parse(text)
    assert tomledit.dumps(tomledit.apply(doc, tomllib.loads(text))) == text


def test_the_shipped_demo_survives_disable_and_enable() -> None:
    """conf.d/demo.toml must not show as modified after the README walk-through (stop, start)."""
    shipped = (Path(__file__).resolve().parent.parent / "conf.d" / "demo.toml").read_text()
    doc = tomledit.parse(shipped)
    data = tomledit.plain(doc)
    data["enabled"] = False
    disabled = tomledit.dumps(tomledit.apply(doc, data))
    assert _diff(shipped, disabled) == ["+enabled = false"]
    del data["enabled"]  # what enabling does: `enabled` defaults to true
    assert tomledit.dumps(tomledit.apply(doc, data)) == shipped
