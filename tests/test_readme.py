"""The README's two commands stay true: CI runs the test one, and the shipped demo serves."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest

from .conftest import PY, REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", quick, re.S)


def test_readme_starts_with_the_two_commands() -> None:
    serve, test = readme_commands()[:2]
    assert "pip install -e ." in serve and serve.endswith("model-supervisor serve")
    assert "pip install -e '.[test]'" in test and "pytest" in test


def test_ci_runs_the_readme_test_command() -> None:
    test = readme_commands()[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert test in ci.splitlines(), "the test command in .ci/run differs from the README's"


@pytest.mark.slow
def test_shipped_demo_serves(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
    proc = subprocess.Popen(
        [PY, "-m", "supervisor", "serve", "--state-dir", str(tmp_path / "state")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    try:
        while "demo@cpu: STARTING -> RUNNING" not in "".join(seen):
            seen.append(lines.get(timeout=20))
        body = urllib.request.urlopen("http://127.0.0.1:8100/health", timeout=5).read()
        assert b'"ready": true' in body
        req = urllib.request.Request(
            "http://127.0.0.1:8100/v1/predict", data=b'{"inputs": [1, 2.5]}', method="POST"
        )
        assert b'"outputs": [2, 5.0]' in urllib.request.urlopen(req, timeout=5).read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, "".join(seen)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
