"""schemathesis against /docs/openapi.json of a real `serve` on 127.0.0.1: no 5xx, no schema violation.

Bounded in examples and time. DELETE /processes/{pid} is not fuzzed (random pids with
force=true would kill this machine's processes; it has its own tests) and neither are the
endless streams (/events). The server runs with PATH=/nonexistent, so a fuzzed declaration
can only run what it names by absolute path.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import PY, REPO, declaration, demo_cmd, free_port, free_range, write_decl

CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
])


def st_binary() -> str | None:
    candidate = Path(sys.executable).with_name("st")
    return str(candidate) if candidate.exists() else shutil.which("st")


@pytest.mark.timeout(300)
@pytest.mark.skipif(st_binary() is None, reason="schemathesis is not installed (pip install -e '.[test]')")
def test_schemathesis_finds_no_server_error_or_schema_violation(tmp_path: Path) -> None:
    conf, state = tmp_path / "conf.d", tmp_path / "state"
    conf.mkdir()
    write_decl(conf, declaration("demo", demo_cmd(), health={"type": "http", "start_interval": 0.05}))
    port = free_port()
    low, high = free_range(200)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
    env.update(PATH="/nonexistent", MODEL_SUPERVISOR_PORT_RANGE=f"{low}-{high}")
    server = subprocess.Popen(
        [PY, "-m", "supervisor", "serve", "--conf-dir", str(conf), "--state-dir", str(state), "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "serve did not come up"
                time.sleep(0.1)
        run = subprocess.run(
            [st_binary(), "run", f"http://127.0.0.1:{port}/docs/openapi.json", "--checks", CHECKS,
             "--exclude-path-regex", "^/api/v1/(processes|events)", "--max-examples", "30",
             "--phases", "examples,coverage,fuzzing", "--workers", "1", "--request-timeout", "60",
             "--generation-database", "none", "--seed", "20261127", "--no-color"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert "passed" in run.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            out, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            out, _ = server.communicate()
    assert server.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-5000:]
