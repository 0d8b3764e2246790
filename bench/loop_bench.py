#!/usr/bin/env python3
"""Event-loop steps while many declarations arrive: does anything block the supervisor's loop?

Builds the supervisor in this process (`supervisor.wiring.build`, the same graph `serve`
runs, without the HTTP server), runs its loop in asyncio debug mode and records every loop step
(callback or task step) slower than 5 ms, as asyncio's own "Executing ... took X seconds"
warnings report them. Then drops N declaration files into a watched conf.d/ at once (children
are `sleep`, health = none) and waits until all N are RUNNING; then stops them all.

Issue 19's target: with 100 files dropped, no loop step over 20 ms (before: 21 steps over 50 ms,
the slowest 111 ms, with every spawn on the loop). Prints JSON. Debug mode itself slows asyncio
down, so the figures are an upper bound for a normal `serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor.config.settings import load_settings  # noqa: E402
from supervisor.core.states import State  # noqa: E402
from supervisor.wiring import build  # noqa: E402

STEP = re.compile(r"Executing (?P<what>.*) took (?P<seconds>[0-9.]+) seconds")


class SlowSteps(logging.Handler):
    """Collects asyncio's debug-mode reports of slow loop steps."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = STEP.search(record.getMessage())
        if m:
            self.steps.append((float(m["seconds"]), m["what"][:160]))


def declaration(name: str) -> str:
    sleep = shutil.which("sleep") or "/bin/sleep"
    return f'name = "{name}"\nbackend = "process"\ngpus = "none"\ncommand = ["{sleep}", "3600"]\n\n[health]\ntype = "none"\n'


async def run(n: int, tmp: Path) -> dict[str, object]:
    conf, state = tmp / "conf.d", tmp / "state"
    conf.mkdir()
    settings = load_settings(conf_dir=conf, state_dir=state, gpu_source="none", cgroups="off")
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.005
    handler = SlowSteps()
    logging.getLogger("asyncio").addHandler(handler)
    sup = build(settings)
    await sup.gpus.start()
    await sup.engine.start(watch=True)
    began = time.perf_counter()
    staging = tmp / "staging"
    staging.mkdir()
    for i in range(n):
        (staging / f"m{i:03d}.toml").write_text(declaration(f"m{i:03d}"))
        os.replace(staging / f"m{i:03d}.toml", conf / f"m{i:03d}.toml")
    while sum(1 for inst in sup.engine.instances.values() if inst.state == State.RUNNING) < n:
        await asyncio.sleep(0.01)
    all_running = time.perf_counter() - began
    during = list(handler.steps)
    await sup.engine.shutdown()
    await sup.gpus.stop()
    logging.getLogger("asyncio").removeHandler(handler)
    slowest = sorted(during, reverse=True)[:5]
    return {
        "files": n,
        "all_running_s": round(all_running, 3),
        "steps_over_5ms": len(during),
        "steps_over_20ms": sum(1 for s, _ in during if s > 0.020),
        "steps_over_50ms": sum(1 for s, _ in during if s > 0.050),
        "max_step_ms": round(max((s for s, _ in during), default=0.0) * 1000, 1),
        "slowest": [{"ms": round(s * 1000, 1), "step": what} for s, what in slowest],
        "load_at_start": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="msup-loop-") as tmp:
        result = asyncio.run(run(args.files, Path(tmp)))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
