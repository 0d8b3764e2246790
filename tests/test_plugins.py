"""Third-party backend kinds from the `model_supervisor.backends` entry-point group.

The example plugin in examples/plugin is made discoverable the way pip would: a .dist-info
directory with its entry_points.txt on sys.path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from supervisor.backends.registry import ENTRY_POINT_GROUP, Registry, builtin_kinds, default_registry
from supervisor.config.settings import Settings
from supervisor.core.states import State
from supervisor.wiring import build

from .conftest import REPO, write_decl

PLUGIN_SRC = REPO / "examples" / "plugin"


def install_fake_dist(site: Path, name: str, entry_points: str) -> None:
    dist = site / f"{name}-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_points}\n")


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    install_fake_dist(site, "msup_static_kind", "static = msup_static_kind:StaticKind")
    install_fake_dist(site, "msup_broken", "broken = msup_no_such_module:Kind")
    monkeypatch.syspath_prepend(str(PLUGIN_SRC))
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("msup_static_kind", None)


def test_entry_point_kind_is_registered_and_broken_one_reported(plugin_site: Path) -> None:
    registry = default_registry()
    assert "static" in registry and registry.get("static").name == "static"
    assert set(registry.names()) >= {k.name for k in builtin_kinds()}
    assert "broken" not in registry
    assert "ModuleNotFoundError" in registry.plugin_errors["broken"]


@pytest.mark.slow
async def test_plugin_kind_runs_under_the_engine(
    plugin_site: Path, settings: Settings, conf_dir: Path, tmp_path: Path
) -> None:
    site_dir = tmp_path / "www"
    site_dir.mkdir()
    (site_dir / "index.html").write_text("hello from a plugin")
    write_decl(
        conf_dir,
        {"name": "docs", "backend": "static", "directory": str(site_dir), "health": {"start_interval": 0.05}},
    )
    engine = build(settings, registry=default_registry()).engine
    try:
        await engine.start()
        inst = engine.instances["docs@cpu"]
        await inst.wait_state(State.RUNNING, timeout=15)
        import urllib.request

        assert (
            urllib.request.urlopen(f"http://127.0.0.1:{inst.spec.port}/", timeout=5).read()
            == b"hello from a plugin"
        )
    finally:
        await engine.shutdown()


def test_duplicate_kind_name_is_refused() -> None:
    registry = Registry(builtin_kinds())
    with pytest.raises(ValueError, match="already registered"):
        registry.register(builtin_kinds()[0])
