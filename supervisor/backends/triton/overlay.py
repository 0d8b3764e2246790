"""The instance's own model repository: an overlay of the user's, built before each launch.

`TritonRepositoryOverlay` is the plan's prepare step (config.pbtxt is never written into the
user's repository: each model gets a directory in the instance's work dir holding the generated
config.pbtxt, see `pbtxt`, and symlinks to everything else of the original model directory) and
its live part: `apply` takes a changed model list or instance counts to the running server
(`model_control`), `check` counts the python backend's stubs (`stubs`) and reloads a model
whose stub died.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.backends.triton.model_control import LiveApplyError, repository_action, wait_unloaded
from supervisor.backends.triton.pbtxt import backend_of, render_config
from supervisor.backends.triton.stubs import count_stubs, sweep_shm

log = logging.getLogger(__name__)

TEMPLATE = "config.pbtxt.template"
CONFIG = "config.pbtxt"


@dataclass(frozen=True, slots=True)
class TritonRepositoryOverlay:
    """Builds `overlay`: for each model a directory with a generated config.pbtxt and symlinks
    to every other entry of `repository/<model>`. The user's repository is only read.

    Also the plan's live part: `apply` takes a changed model list or instance counts to the
    running server, `check` finds dead python-backend stubs and reloads their model."""

    repository: str
    overlay: str
    #: (model, instances per GPU). Not in the repr, hence not in the launch fingerprint:
    #: changes are applied live (the plan compares `live` objects by equality instead).
    models: tuple[tuple[str, int], ...] = field(repr=False)
    gpus: tuple[int, ...]  # as the server sees them; () = a CPU-only instance
    instance: str
    shm_prefix: str = ""  # the python backend's shm-region-prefix-name for this instance
    sweep_shm: bool = False  # remove unmapped /dev/shm/<shm_prefix>* leftovers (a local server)

    def run(self) -> None:
        built = self._render()
        if self.sweep_shm:
            removed = sweep_shm(self.shm_prefix)
            if removed:
                log.info(
                    "%s: removed %d python-backend shm region(s) a previous run left behind: %s",
                    self.instance,
                    len(removed),
                    ", ".join(removed),
                )
        self._write(built)

    def _render(self) -> list[tuple[list[Path], str]]:
        repository = Path(self.repository)
        if not repository.is_dir():
            raise ValueError(f"model_repository {repository} is not a directory")
        for model, _ in self.models:
            if not (repository / model).is_dir():
                present = sorted(p.name for p in repository.iterdir() if p.is_dir())
                raise ValueError(
                    f"model {model!r} has no directory in {repository} "
                    f"(it has: {', '.join(present) or 'nothing'})"
                )
        # Everything is read and rendered before anything is written: a bad template fails
        # the launch (or the live change) without leaving half an overlay.
        return [self._model_contents(repository / model, model, count) for model, count in self.models]

    def _write(self, built: list[tuple[list[Path], str]]) -> None:
        # Rebuilt in place rather than swapped for a new directory: a container adopted after
        # a supervisor restart has this very directory bind-mounted at /models.
        target = Path(self.overlay)
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            target.unlink()
        target.mkdir(parents=True, exist_ok=True)
        wanted = {model for model, _ in self.models}
        for entry in target.iterdir():
            if entry.name not in wanted:  # a model no longer listed
                _remove(entry)
        for (model, _), (links, config) in zip(self.models, built, strict=False):
            dest = target / model
            _remove(dest)  # stale entries (a removed version directory) go with it
            dest.mkdir()
            for entry in links:
                os.symlink(entry, dest / entry.name)
            (dest / CONFIG).write_text(config, encoding="utf-8")

    def _model_contents(self, source: Path, model: str, count: int) -> tuple[list[Path], str]:
        """The entries to link and the generated config.pbtxt. The template is
        config.pbtxt.template, else the model's own config.pbtxt (its instance_group is
        replaced all the same: host GPU ids or KIND_GPU must not pass through), else a config
        with only the name, which Triton's auto-complete fills in (python: from model.py)."""
        template = next((source / name for name in (TEMPLATE, CONFIG) if (source / name).is_file()), None)
        links = [entry for entry in sorted(source.iterdir()) if entry.name not in (TEMPLATE, CONFIG)]
        text = f'name: "{model}"\n' if template is None else template.read_text(encoding="utf-8")
        try:
            return links, render_config(text, count, self.gpus, self.instance)
        except ValueError as exc:
            raise ValueError(f"{template}: {exc}") from None

    # -- live: the running server follows the model list ---------------------------------
    def _lock(self) -> asyncio.Lock:
        # One change or heal at a time per server; keyed by loop too (each test has its own).
        key = (self.overlay, id(asyncio.get_running_loop()))
        return _LOCKS.setdefault(key, asyncio.Lock())

    async def apply(self, previous: object, port: int, timeout: float) -> str:
        old = dict(previous.models) if isinstance(previous, TritonRepositoryOverlay) else {}
        new = dict(self.models)
        removed = [m for m in old if m not in new]
        changed = [m for m, count in new.items() if old.get(m) != count]
        async with self._lock():
            built = await asyncio.to_thread(self._render)
            for model in removed:
                await repository_action(port, model, "unload", timeout)
            await asyncio.to_thread(self._write, built)
            for model in changed:  # instance_group only: Triton 2.51 adds/removes instances in place
                await repository_action(port, model, "load", timeout)
        done = [
            f"loaded {m} ({new[m]} per GPU)" if m not in old else f"{m}: {old[m]} -> {new[m]} per GPU"
            for m in changed
        ] + [f"unloaded {m}" for m in removed]
        return "; ".join(done) or "nothing to change"

    async def check(self, port: int, timeout: float) -> tuple[bool, str]:
        lock = self._lock()
        if lock.locked():
            return True, "a model change is being applied"
        async with lock:
            running, expected = await asyncio.to_thread(self._stub_counts)
            short = {m: (running.get(m, 0), want) for m, want in expected.items() if running.get(m, 0) < want}
            healed = []
            for model, (have, want) in short.items():
                what = f"model {model}: {have} of its {want} python backend stub(s) running"
                log.warning(
                    "%s: %s (a stub died; Triton still reports it ready); reloading it", self.instance, what
                )
                try:
                    await self._reload(port, model, timeout)
                except (LiveApplyError, OSError) as exc:
                    return False, f"{what}, and reloading it failed: {exc}"
                healed.append(f"{what}, reloaded it")
            return True, "; ".join(healed)

    def _stub_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(python backend stubs alive per model, how many each python model should have)."""
        running = count_stubs(self.shm_prefix)
        expected = {}
        for model, count in self.models:
            directory = Path(self.overlay) / model
            try:
                backend = backend_of((directory / CONFIG).read_text(encoding="utf-8"))
            except OSError:
                continue
            # auto-complete picks python for model.py
            python = backend == "python" if backend is not None else any(directory.glob("*/model.py"))
            if python:
                expected[model] = count * max(1, len(self.gpus))
        return running, expected

    async def _reload(self, port: int, model: str, timeout: float) -> None:
        # A plain load does not bring a dead stub back (Triton 2.51 keeps the unchanged
        # instances, dead one included): unload, wait until it is gone, load again.
        await repository_action(port, model, "unload", timeout)
        await wait_unloaded(port, model, timeout)
        if self.sweep_shm:
            await asyncio.to_thread(sweep_shm, self.shm_prefix)  # the dead stub's region
        await repository_action(port, model, "load", timeout)


_LOCKS: dict[tuple[str, int], asyncio.Lock] = {}


def _remove(path: Path) -> None:
    # rmtree unlinks symlinks without following them: the user's files are never touched.
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
