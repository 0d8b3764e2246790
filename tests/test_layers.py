"""Imports point down only (issue 19): a module may import its own layer and the layers below.

The layers, lowest first, as the folders show them. A failure names the importing file, the line
and the module it reached up to, so the fix is to hand the thing in from above (a parameter, a
Protocol in the lower layer) rather than to import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "supervisor"

#: Layer rank by module prefix; the longest prefix wins.
LAYERS: dict[str, int] = {
    "supervisor.core": 0,  # pure: models, states, backoff, placement, events, text edits
    "supervisor.backends": 3,  # the plugin API and the presets (adapters: HTTP, /proc, files)
    "supervisor.config": 2,  # parse, resolve, plan; settings
    "supervisor.adapters": 3,  # files, /proc, cgroups, signals, ports, GPUs, runners, probes
    "supervisor.cluster": 3,  # the Ray runner's side: driver, actors, node agents (an adapter)
    "supervisor.runtime": 4,  # instances, engine, adoption, controller, tracker, metrics
    "supervisor.api": 5,  # HTTP edge
    "supervisor.wiring": 6,  # the composition root: builds and connects everything
    "supervisor.serve": 6,  # runs it: signals, the API server, shutdown
    "supervisor.cli": 7,  # the command line (starts serve)
    "supervisor.__main__": 7,
    "supervisor": 8,  # the package itself (only __version__)
}


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of ours, at any depth (function-level too)."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import (write supervisor.<layer>...)")
            if node.module and node.module.split(".")[0] == "supervisor":
                if node.module == "supervisor":
                    found += [(node.lineno, f"supervisor.{a.name}") for a in node.names]
                else:
                    found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "supervisor"]
    return found


def upward_imports() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for line, target in imports_of(path):
            if target == "supervisor.__version__":
                continue
            if layer_of(target) > layer_of(me):
                out.append(
                    f"{path.relative_to(REPO)}:{line}: {me} (layer {layer_of(me)}) imports {target} "
                    f"(layer {layer_of(target)})"
                )
    return out


def test_every_module_has_a_layer() -> None:
    flat = [p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__", "serve", "wiring")]
    assert not flat, f"modules outside the layer folders: {flat}"


def test_imports_point_down_only() -> None:
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The check itself can fail: a core module importing the runtime is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from supervisor.runtime.engine import Engine\n")
    assert imports_of(bad) == [(2, "supervisor.runtime.engine")]
    assert layer_of("supervisor.runtime.engine") > layer_of("supervisor.core.states")
