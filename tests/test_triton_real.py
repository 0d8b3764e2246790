"""The triton preset against a real tritonserver (2.51, from the nvidia-pytriton wheel), on CPU.

`.ci/run` installs the wheel into its own venv and points MODEL_SUPERVISOR_TEST_TRITON at it
(MODEL_SUPERVISOR_TEST_REQUIRE_TRITON=1 there: nothing skips in CI). Locally the tests use
`.ci-venvs/triton` if it exists and skip otherwise. One server runs through a real engine in
process mode with python-backend models the test writes (issue 12): RUNNING, inference over
HTTP, a model added and instances_per_gpu changed with the server's pid unchanged, a killed
stub detected and healed, the killed server restarted, a stop leaving no process and no
/dev/shm region of ours.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import httpx
import pytest

from supervisor.backends import triton
from supervisor.core.states import State
from supervisor.runtime.engine import Engine

from .conftest import REPO, alive, wait_until
from .test_presets import errors

# Read at import: the `settings` fixture clears MODEL_SUPERVISOR_* from the environment.
VENV = Path(os.environ.get("MODEL_SUPERVISOR_TEST_TRITON") or REPO / ".ci-venvs" / "triton")
REQUIRED = os.environ.get("MODEL_SUPERVISOR_TEST_REQUIRE_TRITON") == "1"
SITE = next(iter(sorted(VENV.glob("lib/python3.*/site-packages"))), None)
BINARY = SITE / "pytriton" / "tritonserver" / "bin" / "tritonserver" if SITE else None

if BINARY is None or not BINARY.is_file():
    reason = f"no nvidia-pytriton venv at {VENV} (set MODEL_SUPERVISOR_TEST_TRITON; .ci/run installs one)"
    if REQUIRED:
        raise RuntimeError(reason)  # CI: a missing server is a failure, not a skip
    pytest.skip(reason, allow_module_level=True)

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]  # a real tritonserver

MODEL_PY = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
{complete}
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", (x + {add}).astype(np.float32))]))
        return out
"""

#: add_two has no config.pbtxt at all: Triton's auto-complete asks the model for its I/O.
AUTO_COMPLETE = """
    @staticmethod
    def auto_complete_config(config):
        config.add_input({"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]})
        config.add_output({"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]})
        return config
"""

#: The repository's own config, as most real ones are: a plain config.pbtxt (no template),
#: with an instance_group for a GPU this CPU-only instance does not have.
ADD_ONE_CONFIG = """\
name: "add_one"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { count: 2 kind: KIND_GPU gpus: [ 3 ] } ]
"""


def backend_directory(root: Path) -> Path:
    """python/ with the backend library, its utils and the stub for the venv's Python
    (TRITON_FACTS.md: pytriton copies the stub in at run time; we do it here)."""
    python = SITE.parent.name.removeprefix("python")  # "3.11"
    source = SITE / "pytriton" / "tritonserver"
    target = root / "backends" / "python"
    target.mkdir(parents=True)
    for path in (
        source / "backends" / "python" / "libtriton_python.so",
        source / "backends" / "python" / "triton_python_backend_utils.py",
        source / "python_backend_stubs" / python / triton.STUB,
    ):
        shutil.copy2(path, target / path.name)
    return root / "backends"


def repository(root: Path) -> Path:
    repo = root / "repo"
    for name, add in (("add_one", 1), ("add_two", 2)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.py").write_text(
            MODEL_PY.format(add=add, complete=AUTO_COMPLETE if name == "add_two" else "")
        )
    (repo / "add_one" / "config.pbtxt").write_text(ADD_ONE_CONFIG)  # add_two: no config at all
    return repo


def declaration(root: Path, models: list[str], per_gpu: str) -> str:
    return textwrap.dedent(f"""
        name = "add_one"
        backend = "triton"
        mode = "process"
        tritonserver = "{BINARY}"
        model_repository = "{repository(root) if not (root / "repo").exists() else root / "repo"}"
        models = {json.dumps(models)}
        instances_per_gpu = {per_gpu}
        backend_directory = "{root / "backends"}"
        python_env = "{VENV}"
        library_path = ["{SITE / "nvidia_pytriton.libs"}"]
        [health]
        start_interval = 0.2
        interval = 0.5
        failure_threshold = 2
        [stop]
        timeout = 10
        [restart]
        initial_delay = 0.0
        jitter = 0.0
        min_uptime = 1.0
    """)


async def infer(port: int, model: str, values: list[float]) -> list[float]:
    body = {"inputs": [{"name": "INPUT0", "shape": [len(values)], "datatype": "FP32", "data": values}]}
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(f"http://127.0.0.1:{port}/v2/models/{model}/infer", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["outputs"][0]["data"]


def model_ready(port: int, model: str) -> bool:
    return httpx.get(f"http://127.0.0.1:{port}/v2/models/{model}/ready", timeout=5).status_code == 200


def stubs(prefix: str) -> dict[int, str]:
    """Live stubs of this instance: pid -> model."""
    return {
        pid: Path(argv[1]).parent.parent.name
        for pid, argv in triton._cmdlines()
        if len(argv) > 2 and os.path.basename(argv[0]) == triton.STUB and argv[2].startswith(prefix)
    }


def regions(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


async def test_real_triton_live_changes_stub_heal_restart_and_clean_stop(
    engine: Engine, conf_dir: Path, tmp_path: Path
) -> None:
    backend_directory(tmp_path)
    decl = conf_dir / "add_one.toml"
    decl.write_text(declaration(tmp_path, ["add_one"], "1"))
    await engine.start()
    inst = engine.instances["add_one@cpu"]
    try:
        await inst.wait_state(State.RUNNING, timeout=60)
    except TimeoutError:
        raise AssertionError(
            f"never ran: {[(t.to_state, t.reason) for t in inst.history]}\n{inst.log_file.tail(30)}"
        ) from None
    port, pid = inst.spec.port, inst.pid
    prefix = inst.spec.launch.live.shm_prefix
    argv = inst.spec.launch.argv
    assert f"--backend-config=python,shm-region-prefix-name={prefix}" in argv
    assert "--exit-timeout-secs=5" in argv  # stop.timeout 10 - 5
    assert inst.spec.health.path == "/v2/health/ready" and inst.spec.health.live_path == "/v2/health/live"
    # the plain config.pbtxt was the template: its KIND_GPU instance_group is replaced
    overlay = Path(inst.spec.launch.live.overlay)
    config = (overlay / "add_one" / "config.pbtxt").read_text()
    assert "KIND_GPU" not in config and "count: 1\n    kind: KIND_CPU" in config, config
    assert await infer(port, "add_one", [1, 2, 3]) == [2, 3, 4]
    assert sorted(stubs(prefix).values()) == ["add_one"]
    history = len(inst.history)

    # a model added and instances_per_gpu changed: applied to the running server, no restart
    decl.write_text(declaration(tmp_path, ["add_one", "add_two"], "{add_one = 2}"))
    await engine.reload("test")
    await wait_until(lambda: sorted(stubs(prefix).values()) == ["add_one", "add_one", "add_two"], timeout=30)
    await wait_until(lambda: model_ready(port, "add_two"), timeout=30)
    assert await infer(port, "add_two", [1]) == [3]
    assert await infer(port, "add_one", [1]) == [2]
    assert inst.pid == pid and inst.state == State.RUNNING and len(inst.history) == history
    assert not inst.snapshot()["pending_replace"]
    await wait_until(lambda: "GET /v2/health/live -> 200" in (inst.last_probe or ""), timeout=10)  # liveness

    # a killed stub: Triton still says ready; the liveness check notices and reloads the model
    victim = next(p for p, m in stubs(prefix).items() if m == "add_one")
    os.kill(victim, signal.SIGKILL)
    await wait_until(
        lambda: victim not in stubs(prefix) and list(stubs(prefix).values()).count("add_one") == 2, timeout=40
    )
    await wait_until(lambda: model_ready(port, "add_one"), timeout=30)
    for _ in range(4):  # both instances answer again (round robin would hit a dead one)
        assert await infer(port, "add_one", [5]) == [6]
    assert inst.pid == pid and inst.state == State.RUNNING
    await wait_until(lambda: all(n in _mapped(prefix) for n in regions(prefix)), timeout=10)

    # the server killed: restarted, and the dead run's shm regions are gone before the new one
    os.kill(pid, signal.SIGKILL)
    await inst.wait_for(lambda i: i.state == State.RUNNING and i.pid not in (None, pid), timeout=60)
    mapped = _mapped(prefix)
    assert regions(prefix) and all(n in mapped for n in regions(prefix)), (regions(prefix), mapped)
    assert await infer(inst.spec.port, "add_two", [0]) == [2]

    # a stop leaves nothing of ours: no server, no stub, no /dev/shm region
    new_pid = inst.pid
    await inst.stop("test over")
    assert inst.state == State.STOPPED and not alive(new_pid)
    await wait_until(lambda: not stubs(prefix), timeout=10)
    assert regions(prefix) == []


async def test_real_triton_change_it_refuses_restarts_the_instance(
    engine: Engine, conf_dir: Path, tmp_path: Path
) -> None:
    """A model Triton cannot load: the live change fails with Triton's error, and the instance
    is restarted with the new declaration instead of running on half-changed."""
    backend_directory(tmp_path)
    repository(tmp_path)
    (tmp_path / "repo" / "broken" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "broken" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('no weights here')\n"
    )
    decl = conf_dir / "add_one.toml"
    decl.write_text(declaration(tmp_path, ["add_one"], "1"))
    await engine.start()
    inst = engine.instances["add_one@cpu"]
    await inst.wait_state(State.RUNNING, timeout=60)
    pid = inst.pid
    decl.write_text(declaration(tmp_path, ["add_one", "broken"], "1"))
    await engine.reload("test")
    await inst.wait_for(
        lambda i: any("could not be applied in place" in t.reason for t in i.history), timeout=30
    )
    reason = next(t.reason for t in inst.history if "could not be applied in place" in t.reason)
    assert "load broken: HTTP 400" in reason and "no weights here" in reason, reason
    await wait_until(lambda: not alive(pid), timeout=20)
    prefix = inst.spec.launch.live.shm_prefix
    await inst.stop("test over")
    # A server that exits on its own (exit-on-error here) can leave regions: the plan's
    # after-exit step removes them as soon as the run is over, not at the next start.
    assert regions(prefix) == []


def _mapped(prefix: str) -> set[str]:
    names = set()
    for pid, argv in triton._cmdlines():
        if any(prefix in a for a in argv):
            try:
                for line in Path(f"/proc/{pid}/maps").read_text(errors="replace").splitlines():
                    if f"/dev/shm/{prefix}" in line:
                        names.add(line.split("/dev/shm/", 1)[1].split()[0])
            except OSError:
                continue
    return names


def test_recorded_option_list_is_the_real_servers() -> None:
    """TRITON_SYNTAX is what this very binary's getopt_long knows (its --help), and every owned
    flag is one of them."""
    out = subprocess.run([str(BINARY), "--help"], capture_output=True, text=True, timeout=30)
    options = {line.split()[0] for line in (out.stdout + out.stderr).splitlines() if line.startswith("  --")}
    assert options == set(triton.TRITON_SYNTAX.long_options)
    assert set(triton.OWNED_FLAGS) <= options


@pytest.mark.parametrize(
    "arg,words",
    [
        ("--http-p=18010", "sets --http-port (an abbreviation"),
        ("--model-rep=/x", "sets --model-repository"),
        ("--exit-t=100", "sets --exit-timeout-secs"),
        ("--backend-dir=/opt", "sets --backend-directory"),
        ("--allow-h=false", "switches HTTP off"),
        ("--allow-http=OFF", "switches HTTP off"),
        ("--backend-c=python,shm-region-prefix-name=x", "shm-region-prefix-name"),
    ],
)
def test_abbreviated_owned_flags_are_refused(tmp_path: Path, arg: str, words: str) -> None:
    found = errors(
        tmp_path,
        f'name = "m"\nbackend = "triton"\nmodel_repository = "r"\n'
        f'extra_args = ["--log-verbose=1", "{arg}"]\n',
    )
    assert any(k == "extra_args[1]" and words in message and arg in message for k, message in found), found


@pytest.mark.parametrize(
    "args", [["--allow-http=true"], ["--allow-grpc=false"], ["--backend-config=python,x=1"], ["--http"]]
)  # ambiguous: the server itself rejects it
def test_harmless_or_ambiguous_flags_pass(tmp_path: Path, args: list[str]) -> None:
    assert (
        errors(
            tmp_path,
            f'name = "m"\nbackend = "triton"\nmodel_repository = "r"\nextra_args = {json.dumps(args)}\n',
        )
        == []
    )
