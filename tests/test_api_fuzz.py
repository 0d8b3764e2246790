"""schemathesis against /docs/openapi.json of a real `serve` on 127.0.0.1: no 5xx, no schema violation.

Bounded in examples and time. `DELETE /processes/{pid}` is fuzzed only with `serve` in its own
PID namespace (`unshare --pid --fork --mount-proc`, as root): there the pids it can name are
`serve` itself (pid 1, always refused) and the processes it started, so random pids with
force=true cannot touch this machine's processes. Without a PID namespace that operation is
left out (it has its own tests). The endless streams (/events, logs with follow) are not
fuzzed. The server runs with PATH=/nonexistent, so a fuzzed declaration can only run what it
names by absolute path.
"""

from __future__ import annotations

import functools
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

pytestmark = pytest.mark.slow  # a real `serve` process and a fuzzer

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
    ]
)
NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc"]
# follow=true streams a log until the client leaves: every such case would sit out the request timeout.
FIXED = """
[[operations]]
include-path = "/api/v1/instances/{instance_id}/logs"
parameters = { "query.follow" = "false" }
"""


def st_binary() -> str | None:
    candidate = Path(sys.executable).with_name("st")
    return str(candidate) if candidate.exists() else shutil.which("st")


@functools.cache
def pid_namespace() -> bool:
    """Can we run a command in a new PID namespace with its own /proc (root, unshare, no seccomp block)?"""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*NAMESPACE, "sh", "-c", "test $$ -eq 1"], capture_output=True, timeout=30)
    return probe.returncode == 0


def namespace_child(outer: subprocess.Popen, timeout: float = 20) -> int:
    """The host pid of `unshare --fork`'s child (pid 1 inside), to signal it directly."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()
        except FileNotFoundError:
            children = []
        if children:
            return int(children[0])
        assert time.monotonic() < deadline and outer.poll() is None, "unshare did not start its child"
        time.sleep(0.05)


@pytest.mark.timeout(600)
@pytest.mark.skipif(st_binary() is None, reason="schemathesis is not installed (pip install -e '.[test]')")
def test_schemathesis_finds_no_server_error_or_schema_violation(tmp_path: Path) -> None:
    conf, state = tmp_path / "conf.d", tmp_path / "state"
    conf.mkdir()
    write_decl(conf, declaration("demo", demo_cmd(), health={"type": "http", "start_interval": 0.05}))
    port = free_port()
    low, high = free_range(200)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
    env.update(
        PATH="/nonexistent", MODEL_SUPERVISOR_PORT_RANGE=f"{low}-{high}", MODEL_SUPERVISOR_GPU_SOURCE="none"
    )
    isolated = pid_namespace()
    prefix = [shutil.which("unshare"), *NAMESPACE[1:]] if isolated else []
    server = subprocess.Popen(
        [
            *prefix,
            PY,
            "-m",
            "supervisor",
            "serve",
            "--conf-dir",
            str(conf),
            "--state-dir",
            str(state),
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    serve_pid = namespace_child(server) if isolated else server.pid
    excluded = "^/api/v1/events" if isolated else "^/api/v1/(processes|events)"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "serve did not come up"
                time.sleep(0.1)
        config = tmp_path / "schemathesis.toml"
        config.write_text(FIXED)
        run = subprocess.run(
            [
                st_binary(),
                "--config-file",
                str(config),
                "run",
                f"http://127.0.0.1:{port}/docs/openapi.json",
                "--checks",
                CHECKS,
                "--exclude-path-regex",
                excluded,
                "--max-examples",
                "30",
                "--phases",
                "examples,coverage,fuzzing",
                "--workers",
                "1",
                "--request-timeout",
                "60",
                "--generation-database",
                "none",
                "--seed",
                "20261127",
                "--no-color",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=540,
        )
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert "passed" in run.stdout
    finally:
        os.kill(serve_pid, signal.SIGTERM)
        try:
            out, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            out, _ = server.communicate()
    assert server.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-5000:]
