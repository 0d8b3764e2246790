"""The backend presets (triton, comfyui, vllm, textgen) as users get them: declarations written
as TOML files, loaded and resolved the real way, and the exact plan each instance runs.

The servers themselves are not installed here, so the end-to-end tests run tiny stand-ins
(stdlib HTTP servers answering the preset's readiness path) through a real engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor.adapters.confd import read_dir
from supervisor.adapters.ports import PortAllocator
from supervisor.backends.base import ContainerLaunch, ProcessLaunch
from supervisor.backends.registry import default_registry
from supervisor.backends.triton import DEFAULT_IMAGE, TritonRepositoryOverlay, shm_prefix
from supervisor.config.declarations import Defaults
from supervisor.config.desired import Catalog, InstanceSpec, resolve
from supervisor.core.states import State
from supervisor.runtime.engine import Engine

from .conftest import PY, alive, wait_until

REGISTRY = default_registry(load_plugins=False)
AUTO_START = 30000  # first automatic port: extra ports (grpc, metrics, ui) come from here


def load(conf_dir: Path, work_root: Path) -> Catalog:
    # The plans' shape is under test here, and the servers are not installed: the checks of
    # this machine (programs, checkouts) are left out; tests/test_hostile_declarations.py has them.
    parsed = read_dir(conf_dir, REGISTRY, Defaults(), host_checks=False)
    ports = PortAllocator(AUTO_START, AUTO_START + 999, is_free=lambda _p: True)
    return resolve(parsed, Catalog(), ports.assign, work_root)


def instances(tmp_path: Path, text: str) -> dict[str, InstanceSpec]:
    """Load one declaration (which must be valid) and return its instances by id."""
    conf = tmp_path / "conf.d"
    conf.mkdir(exist_ok=True)
    (conf / "decl.toml").write_text(textwrap.dedent(text))
    catalog = load(conf, tmp_path / "work")
    assert not catalog.errors, catalog.errors
    return catalog.instances


def errors(tmp_path: Path, text: str) -> list[tuple[str | None, str]]:
    conf = tmp_path / "conf.d"
    conf.mkdir(exist_ok=True)
    path = conf / "bad.toml"
    path.write_text(textwrap.dedent(text))
    catalog = load(conf, tmp_path / "work")
    return [(e.key, e.message) for e in catalog.errors.get(str(path), [])]


def env_of(plan: ProcessLaunch | ContainerLaunch) -> dict[str, str]:
    return dict(plan.env)


def gpu_env(visible: str) -> dict[str, str]:
    return {
        "CUDA_VISIBLE_DEVICES": visible,
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "NVIDIA_VISIBLE_DEVICES": visible or "void",
    }


def assert_env(plan: ProcessLaunch, expected: dict[str, str]) -> None:
    env = env_of(plan)
    assert {k: env.get(k) for k in expected} == expected


# --- triton ---------------------------------------------------------------------------------


def triton_head(repository: str, instance: str, overlay: str, exit_timeout: int = 25) -> tuple[str, ...]:
    """How every triton argv starts: the overlay, explicit mode loading all of it (it holds
    exactly the listed models, so the argv does not change with them), the instance's own shm
    prefix and an exit timeout below stop.timeout (30 - 5)."""
    return (
        f"--model-repository={repository}",
        "--model-control-mode=explicit",
        "--load-model=*",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix(instance, overlay)}",
        f"--exit-timeout-secs={exit_timeout}",
    )


def test_triton_docker_single_gpu_exact_container(tmp_path: Path) -> None:
    (inst,) = instances(
        tmp_path,
        """
        name = "MAM"
        backend = "triton"
        gpus = [3]
        port = 9000
        model_repository = "repo"
    """,
    ).values()
    repo = str((tmp_path / "conf.d" / "repo").resolve())
    overlay = str(tmp_path / "work" / "MAM@gpu3" / "model_repository")
    grpc, metrics = dict(inst.extra_ports)["grpc"], dict(inst.extra_ports)["metrics"]
    assert inst.port == 9003 and {grpc, metrics} == {AUTO_START, AUTO_START + 1}
    step = TritonRepositoryOverlay(
        repository=repo,
        overlay=overlay,
        models=(("MAM", 1),),
        gpus=(0,),
        instance="MAM@gpu3",
        shm_prefix=shm_prefix("MAM@gpu3", overlay),
    )
    assert inst.launch == ContainerLaunch(
        image=DEFAULT_IMAGE,
        command=("tritonserver", *triton_head("/models", "MAM@gpu3", overlay)),
        env=(
            ("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
            ("MODEL_SUPERVISOR_INSTANCE", "MAM@gpu3"),
            ("MODEL_SUPERVISOR_PORT", "9003"),
            ("NVIDIA_VISIBLE_DEVICES", "3"),
        ),
        gpus=(3,),
        network="bridge",
        # weakness 15: published on 127.0.0.1 only
        ports=(("127.0.0.1", 9003, 8000), ("127.0.0.1", grpc, 8001), ("127.0.0.1", metrics, 8002)),
        volumes=((repo, repo, "ro"), (overlay, "/models", "ro")),
        shm_size="2g",
        prepare=(step,),
        live=step,  # the model list is applied to the running server
    )
    assert (inst.health.type, inst.health.path) == ("http", "/v2/health/ready")  # weakness 29
    # issue 12: ready goes false while a model loads through the repository API
    assert inst.health.live_path == "/v2/health/live"
    assert inst.uses_port


def test_triton_docker_tensor_parallel_gpus_are_renumbered_for_the_server(tmp_path: Path) -> None:
    (inst,) = instances(
        tmp_path,
        """
        name = "MAM"
        backend = "triton"
        gpus = [[2, 3]]
        model_repository = "/srv/triton"
        models = ["MAM", "FastFitAll"]
        instances_per_gpu = {MAM = 8}
        bind_address = "0.0.0.0"
        shm_size = "8g"
        ipc = "host"
        user = "1000:1000"
        pull = "never"
        image = "registry.local/triton:{name}"
        volumes = ["cache:/cache", "/data:/data:ro"]
        ulimits = {memlock = -1, stack = 67108864}
        extra_args = ["--log-verbose=1", "--id={instance}"]
    """,
    ).values()
    plan = inst.launch
    assert isinstance(plan, ContainerLaunch)
    assert plan.image == "registry.local/triton:MAM"
    overlay = str(tmp_path / "work" / "MAM@gpu2-3" / "model_repository")
    assert plan.command == (
        "tritonserver",
        *triton_head("/models", "MAM@gpu2-3", overlay),
        "--log-verbose=1",
        "--id=MAM@gpu2-3",
    )
    assert plan.gpus == (2, 3)  # the device request: host GPUs
    (step,) = plan.prepare
    assert step.gpus == (0, 1)  # config.pbtxt: the same GPUs as the container numbers them
    assert step.models == (("MAM", 8), ("FastFitAll", 1))
    assert env_of(plan)["NVIDIA_VISIBLE_DEVICES"] == "2,3" and "CUDA_VISIBLE_DEVICES" not in env_of(plan)
    assert [p[0] for p in plan.ports] == ["0.0.0.0"] * 3
    assert plan.volumes[:2] == (
        (str(tmp_path / "conf.d" / "cache"), "/cache", "rw"),
        ("/data", "/data", "ro"),
    )
    assert plan.volumes[2] == ("/srv/triton", "/srv/triton", "ro")
    assert (plan.shm_size, plan.ipc_mode, plan.user, plan.pull) == ("8g", "host", "1000:1000", "never")
    assert plan.ulimits == (("memlock", -1, -1), ("stack", 67108864, 67108864))


def test_triton_docker_host_network_binds_the_ports_itself(tmp_path: Path) -> None:
    (inst,) = instances(
        tmp_path,
        """
        name = "MAM"
        backend = "triton"
        gpus = [0]
        port = 9000
        network = "host"
        model_repository = "/srv/triton"
    """,
    ).values()
    grpc, metrics = dict(inst.extra_ports)["grpc"], dict(inst.extra_ports)["metrics"]
    assert inst.launch.ports == ()
    assert inst.launch.network == "host"
    overlay = str(tmp_path / "work" / "MAM@gpu0" / "model_repository")
    assert inst.launch.command == (
        "tritonserver",
        *triton_head("/models", "MAM@gpu0", overlay),
        "--http-port=9000",
        f"--grpc-port={grpc}",
        f"--metrics-port={metrics}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
    )


def test_triton_process_mode(tmp_path: Path) -> None:
    found = instances(
        tmp_path,
        """
        name = "MAM"
        backend = "triton"
        mode = "process"
        tritonserver = "/opt/tritonserver/bin/tritonserver"
        gpus = [[0, 1], [4]]
        port = 9000
        model_repository = "repo"
        instances_per_gpu = 2
    """,
    )
    tp, single = found["MAM@gpu0-1"], found["MAM@gpu4"]
    overlay = str(tmp_path / "work" / "MAM@gpu0-1" / "model_repository")
    grpc, metrics = dict(tp.extra_ports)["grpc"], dict(tp.extra_ports)["metrics"]
    assert tp.launch.argv == (
        "/opt/tritonserver/bin/tritonserver",
        *triton_head(overlay, "MAM@gpu0-1", overlay),
        "--http-port=9000",
        f"--grpc-port={grpc}",
        f"--metrics-port={metrics}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
    )
    assert tp.launch.cwd is None
    assert_env(tp.launch, gpu_env("0,1"))
    # CUDA_VISIBLE_DEVICES=0,1 renumbers them 0..1 for the server: config.pbtxt says 0, 1
    assert tp.launch.prepare[0].gpus == (0, 1) and tp.launch.prepare[0].models == (("MAM", 2),)
    assert_env(single.launch, gpu_env("4"))
    assert single.port == 9004 and single.launch.prepare[0].gpus == (0,)
    assert single.launch.prepare[0].overlay == str(tmp_path / "work" / "MAM@gpu4" / "model_repository")


def test_triton_cpu_only_instance(tmp_path: Path) -> None:
    (inst,) = instances(
        tmp_path,
        """
        name = "cpu-model"
        backend = "triton"
        mode = "process"
        model_repository = "/srv/triton"
    """,
    ).values()
    assert inst.id == "cpu-model@cpu" and inst.port == AUTO_START
    assert inst.launch.argv[0] == "tritonserver"
    assert_env(inst.launch, gpu_env(""))
    assert inst.launch.prepare[0].gpus == ()


@pytest.mark.parametrize(
    "text,key,words",
    [
        ('name = "m"\nbackend = "triton"\n', "model_repository", "required key is missing"),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\nmodels = ["ok", "../x"]\n',
            "models[1]",
            "not a valid model name",
        ),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\nmodels = ["a", "a"]\n',
            "models",
            "listed twice",
        ),
        ('name = "m"\nbackend = "triton"\nmodel_repository = "r"\nmodels = []\n', "models", "at least 1"),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\nextra_args = ["-v", "--http-port=1"]\n',
            "extra_args[1]",
            "--http-port is set by the supervisor",
        ),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\nextra_args = ["--load-model", "x"]\n',
            "extra_args[0]",
            "--load-model is set by the supervisor (from models)",
        ),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\ninstances_per_gpu = {other = 2}\n',
            "instances_per_gpu",
            "'other' is not one of the models loaded (m)",
        ),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\ninstances_per_gpu = 0\n',
            "instances_per_gpu",
            "must be a number of instances (>= 1) or a table of them by model, e.g. {MAM = 8, FastFitAll = 1}; got 0",
        ),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\ninstances_per_gpu = {m = 1.5}\n',
            "instances_per_gpu",
            "got 1.5 for 'm'",
        ),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\ninstances_per_gpu = {"a/b" = 1}\n',
            "instances_per_gpu",
            "'a/b' is not a valid model name",
        ),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\nmode = "process"\nimage = "x"\n',
            "image",
            'image applies to mode = "docker" only',
        ),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\ntritonserver = "/bin/t"\n',
            "tritonserver",
            'tritonserver applies to mode = "process" only',
        ),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\nbind_address = "10.1.2.3"\n',
            "bind_address",
            "checks readiness on 127.0.0.1",
        ),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\nshm_size = "2 GB"\n',
            "shm_size",
            "not a size",
        ),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\nvolumes = ["a:b"]\n',
            "volumes",
            "container path must be absolute",
        ),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\nulimits = {bogus = 1}\n',
            "ulimits",
            "unknown ulimit",
        ),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "/r"\nvolumes = ["/a:/a", "/x:/models"]\n',
            "volumes[1]",
            "'/x:/models' collides with the model repository mounts",
        ),
        ('name = "m"\nbackend = "triton"\nmodel_repository = "r"\nnetwork = "none"\n', "network", ""),
        (
            'name = "m"\nbackend = "triton"\nmodel_repository = "r"\nextra_args = ["{nope}"]\n',
            "extra_args[0]",
            "unknown placeholder {nope}",
        ),
    ],
    ids=[
        "missing-repository",
        "bad-model-name",
        "duplicate-model",
        "no-models",
        "owned-port-flag",
        "owned-load-model",
        "instances-of-unknown-model",
        "zero-instances",
        "fractional-instances",
        "bad-name-in-instances",
        "docker-key-in-process-mode",
        "process-key-in-docker-mode",
        "unreachable-bind-address",
        "bad-shm-size",
        "bad-volume",
        "bad-ulimit",
        "volume-on-models",
        "no-network",
        "unknown-placeholder",
    ],
)
def test_triton_validation_errors_name_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    found = errors(tmp_path, text)
    assert any(k == key and words in message for k, message in found), found


# --- triton: the overlay repository, built for real -----------------------------------------

TEMPLATE = """\
name: "MAM"
backend: "python"
max_batch_size: 8
instance_group [
  {
    count: 2  # whatever the template said
    kind: KIND_GPU
    gpus: [ 0 ]
  }
]
input [ { name: "IMAGE" data_type: TYPE_UINT8 dims: [ -1 ] } ]
"""

GENERATED = """\
name: "MAM"
backend: "python"
max_batch_size: 8
input [ { name: "IMAGE" data_type: TYPE_UINT8 dims: [ -1 ] } ]

# instance_group generated by model-supervisor for MAM@gpu2-3
instance_group [
  {
    count: 8
    kind: KIND_GPU
    gpus: [ 0, 1 ]
  }
]
"""


def make_repository(root: Path) -> Path:
    repo = root / "repo"
    (repo / "MAM" / "1").mkdir(parents=True)
    (repo / "MAM" / "1" / "model.py").write_text("# the model\n")
    (repo / "MAM" / "2").mkdir()
    (repo / "MAM" / "labels.txt").write_text("cat\ndog\n")
    (repo / "MAM" / "config.pbtxt.template").write_text(TEMPLATE)
    (repo / "MAM" / "config.pbtxt").write_text("# an old generated file, ignored when a template exists\n")
    (repo / "FastFitAll" / "1").mkdir(parents=True)
    (repo / "FastFitAll" / "config.pbtxt").write_text('name: "FastFitAll"\nbackend: "onnxruntime"\n')
    (repo / "Other" / "1").mkdir(parents=True)
    return repo


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under `root` with its kind, mtime and content (or link target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            out[str(path.relative_to(root))] = ("link", os.readlink(path))
        elif path.is_dir():
            out[str(path.relative_to(root))] = ("dir", st.st_mtime_ns)
        else:
            out[str(path.relative_to(root))] = ("file", st.st_mtime_ns, path.read_bytes())
    return out


def layout(root: Path) -> dict[str, tuple]:
    """`tree` without the times: what a rebuild must reproduce exactly."""
    return {k: (v[0], v[-1]) if v[0] != "dir" else ("dir",) for k, v in tree(root).items()}


def overlay_step(tmp_path: Path, models: str = '["MAM", "FastFitAll"]') -> TritonRepositoryOverlay:
    (inst,) = instances(
        tmp_path,
        f"""
        name = "MAM"
        backend = "triton"
        gpus = [[2, 3]]
        model_repository = "../repo"
        models = {models}
        instances_per_gpu = {{MAM = 8}}
    """,
    ).values()
    (step,) = inst.launch.prepare
    return step


def test_triton_overlay_repository(tmp_path: Path) -> None:
    repo = make_repository(tmp_path)
    before = tree(repo)
    step = overlay_step(tmp_path)
    step.run()
    overlay = Path(step.overlay)
    assert overlay == tmp_path / "work" / "MAM@gpu2-3" / "model_repository"
    assert sorted(p.name for p in overlay.iterdir()) == ["FastFitAll", "MAM"]  # only the listed models
    mam = overlay / "MAM"
    assert sorted(p.name for p in mam.iterdir()) == ["1", "2", "config.pbtxt", "labels.txt"]
    config = mam / "config.pbtxt"
    assert not config.is_symlink() and config.read_text() == GENERATED
    assert config.read_text().count("instance_group [") == 1  # weakness 26: no duplicate block
    for name in ("1", "2", "labels.txt"):
        assert (mam / name).is_symlink() and os.readlink(mam / name) == str(repo / "MAM" / name)
    assert (mam / "1" / "model.py").read_text() == "# the model\n"
    # no template: the model's own config.pbtxt is the template (issue 12: instances_per_gpu
    # applies to most real repositories, which have no .template)
    fast = overlay / "FastFitAll"
    assert sorted(p.name for p in fast.iterdir()) == ["1", "config.pbtxt"]
    assert not (fast / "config.pbtxt").is_symlink()
    assert (fast / "config.pbtxt").read_text() == (
        'name: "FastFitAll"\nbackend: "onnxruntime"\n\n# instance_group generated by model-supervisor for MAM@gpu2-3\n'
        "instance_group [\n  {\n    count: 1\n    kind: KIND_GPU\n    gpus: [ 0, 1 ]\n  }\n]\n"
    )
    assert tree(repo) == before  # the user's repository is untouched


def test_triton_overlay_rebuild_is_idempotent_and_drops_stale_entries(tmp_path: Path) -> None:
    repo = make_repository(tmp_path)
    step = overlay_step(tmp_path)
    step.run()
    overlay = Path(step.overlay)
    first = layout(overlay)
    step.run()
    assert layout(overlay) == first
    assert (overlay / "MAM" / "config.pbtxt").read_text() == GENERATED
    # a version directory removed from the repository and a model no longer listed disappear
    (repo / "MAM" / "2").rmdir()
    overlay_step(tmp_path, '["MAM"]').run()
    assert sorted(p.name for p in overlay.iterdir()) == ["MAM"]
    assert sorted(p.name for p in (overlay / "MAM").iterdir()) == ["1", "config.pbtxt", "labels.txt"]


def test_triton_overlay_missing_model_fails_the_launch(tmp_path: Path) -> None:
    repo = make_repository(tmp_path)
    before = tree(repo)
    step = overlay_step(tmp_path, '["MAM", "Ghost"]')
    with pytest.raises(
        ValueError, match=r"model 'Ghost' has no directory in .*repo \(it has: FastFitAll, MAM, Other\)"
    ):
        step.run()
    assert not Path(step.overlay).exists()
    assert tree(repo) == before


def test_triton_overlay_missing_repository(tmp_path: Path) -> None:
    step = overlay_step(tmp_path)
    with pytest.raises(ValueError, match="model_repository .* is not a directory"):
        step.run()


def test_triton_overlay_cpu_instance_and_bad_template(tmp_path: Path) -> None:
    repo = make_repository(tmp_path)
    step = TritonRepositoryOverlay(str(repo), str(tmp_path / "ov"), (("MAM", 3),), (), "MAM@cpu")
    step.run()
    text = (tmp_path / "ov" / "MAM" / "config.pbtxt").read_text()
    assert text.endswith("instance_group [\n  {\n    count: 3\n    kind: KIND_CPU\n  }\n]\n")
    (repo / "MAM" / "config.pbtxt.template").write_text('name: "MAM"\ninstance_group [ { count: 1 }\n')
    with pytest.raises(ValueError, match="config.pbtxt.template: cannot read the instance_group on line 2"):
        step.run()
    assert (tmp_path / "ov" / "MAM" / "config.pbtxt").read_text() == text  # nothing half-written


def test_triton_overlay_plain_config_with_host_gpus_and_no_config(tmp_path: Path) -> None:
    """Issue 12: a plain config.pbtxt's instance_group (host GPU ids, KIND_GPU on a CPU-only
    instance) never passes through, and a model without any config still gets its count."""
    repo = tmp_path / "repo"
    (repo / "plain" / "1").mkdir(parents=True)
    (repo / "plain" / "config.pbtxt").write_text(
        'name: "plain"\nbackend: "python"\ninstance_group [ { count: 4 kind: KIND_GPU gpus: [ 5, 7 ] } ]\n'
    )
    (repo / "bare" / "1").mkdir(parents=True)
    (repo / "bare" / "1" / "model.py").write_text("# python, found by Triton's auto-complete\n")
    step = TritonRepositoryOverlay(str(repo), str(tmp_path / "ov"), (("plain", 2), ("bare", 3)), (), "m@cpu")
    step.run()
    plain = (tmp_path / "ov" / "plain" / "config.pbtxt").read_text()
    assert "gpus" not in plain and "KIND_GPU" not in plain and "count: 4" not in plain
    assert plain.endswith("instance_group [\n  {\n    count: 2\n    kind: KIND_CPU\n  }\n]\n")
    bare = (tmp_path / "ov" / "bare" / "config.pbtxt").read_text()
    assert bare.startswith('name: "bare"\n') and "count: 3\n    kind: KIND_CPU" in bare
    assert step._stub_counts()[1] == {"plain": 2, "bare": 3}  # both are python models: stubs expected
    assert (repo / "plain" / "config.pbtxt").read_text().count("count: 4") == 1  # the user's file untouched


def test_triton_model_list_is_live_not_part_of_the_launch(tmp_path: Path) -> None:
    """Models and instances_per_gpu change the plan's live part only: the running server
    takes them through its repository API; GPUs, flags or the image still replace it."""
    base = """
        name = "MAM"
        backend = "triton"
        mode = "process"
        tritonserver = "/opt/tritonserver/bin/tritonserver"
        model_repository = "/srv/triton"
    """
    (tmp_path / "a").mkdir()
    (one,) = instances(tmp_path / "a", base).values()
    (two,) = instances(
        tmp_path / "a", base + 'models = ["MAM", "Other"]\ninstances_per_gpu = {MAM = 3}\n'
    ).values()
    (flag,) = instances(tmp_path / "a", base + 'extra_args = ["--log-verbose=1"]\n').values()
    assert one.launch_hash == two.launch_hash and one.launch.live != two.launch.live
    assert two.launch.live.models == (("MAM", 3), ("Other", 1))
    assert flag.launch_hash != one.launch_hash
    from supervisor.config.plan import plan

    assert plan({one.id: two}, {one.id: one}).update == [one.id]


def test_triton_environment_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/old")
    (inst,) = instances(
        tmp_path,
        """
        name = "m"
        backend = "triton"
        mode = "process"
        model_repository = "/srv/triton"
        backend_directory = "backends"
        python_env = "/opt/venv"
        library_path = ["/opt/libs", "more"]
        [stop]
        timeout = 3
    """,
    ).values()
    env = env_of(inst.launch)
    assert env["PATH"] == "/opt/venv/bin:/usr/bin:/bin"
    assert env["LD_LIBRARY_PATH"] == f"/opt/libs:{tmp_path / 'conf.d' / 'more'}:/opt/old"
    assert f"--backend-directory={tmp_path / 'conf.d' / 'backends'}" in inst.launch.argv
    assert "--exit-timeout-secs=1" in inst.launch.argv  # stop.timeout 3: at least 1


# --- comfyui --------------------------------------------------------------------------------


def comfy_state_args(work: Path) -> tuple[str, ...]:
    """What keeps instances of one checkout apart: temp (ComfyUI appends "temp"), user, database."""
    return (
        "--temp-directory",
        str(work),
        "--user-directory",
        str(work / "user"),
        "--database-url",
        f"sqlite:///{work / 'user' / 'comfyui.db'}",
    )


def test_comfyui_single_gpu(tmp_path: Path) -> None:
    (inst,) = instances(
        tmp_path,
        """
        name = "faces"
        backend = "comfyui"
        gpus = [1]
        port = 9100
        comfyui_path = "/opt/ComfyUI"
        python = "/opt/ComfyUI/venv/bin/python"
    """,
    ).values()
    work = (tmp_path / "work" / inst.id).resolve()
    assert inst.launch.argv == (
        "/opt/ComfyUI/venv/bin/python",
        "main.py",
        "--listen",
        "127.0.0.1",
        "--port",
        "9101",
        *comfy_state_args(work),
    )
    assert inst.launch.cwd == "/opt/ComfyUI"
    assert_env(inst.launch, {**gpu_env("1"), "MODEL_SUPERVISOR_PORT": "9101"})
    assert (inst.health.type, inst.health.path) == ("http", "/system_stats")


def test_comfyui_relative_paths_cpu_only_and_placeholders(tmp_path: Path) -> None:
    (inst,) = instances(
        tmp_path,
        """
        name = "faces"
        backend = "comfyui"
        port = 9100
        comfyui_path = "../ComfyUI"
        python = "venv/bin/python"
        listen = "0.0.0.0"
        extra_args = ["--output-directory", "{here}/out/{instance}", "--preview-size={port}"]
    """,
    ).values()
    conf = tmp_path / "conf.d"
    assert inst.launch.argv == (
        str(conf / "venv" / "bin" / "python"),
        "main.py",
        "--listen",
        "0.0.0.0",
        "--port",
        "9100",
        "--cpu",
        *comfy_state_args((tmp_path / "work" / "faces@cpu").resolve()),
        "--output-directory",
        f"{conf}/out/faces@cpu",
        "--preview-size=9100",
    )
    assert inst.launch.cwd == str(tmp_path / "ComfyUI")
    assert_env(inst.launch, gpu_env(""))


def test_comfyui_default_interpreter_is_python3_from_path(tmp_path: Path) -> None:
    (inst,) = instances(
        tmp_path,
        """
        name = "faces"
        backend = "comfyui"
        gpus = [[0, 1]]
        comfyui_path = "/opt/ComfyUI"
    """,
    ).values()
    assert inst.launch.argv[:2] == ("python3", "main.py") and "--cpu" not in inst.launch.argv
    assert_env(inst.launch, gpu_env("0,1"))


@pytest.mark.parametrize(
    "text,key,words",
    [
        ('name = "m"\nbackend = "comfyui"\n', "comfyui_path", "required key is missing"),
        (
            'name = "m"\nbackend = "comfyui"\ncomfyui_path = "c"\nextra_args = ["--lowvram", "--port", "1"]\n',
            "extra_args[1]",
            "--port is set by the supervisor",
        ),
        (
            'name = "m"\nbackend = "comfyui"\ncomfyui_path = "c"\nextra_args = ["--cuda-device=1"]\n',
            "extra_args[0]",
            "--cuda-device is set by the supervisor (from gpus)",
        ),
        (
            'name = "m"\nbackend = "comfyui"\ncomfyui_path = "c"\nlisten = "10.0.0.1"\n',
            "listen",
            "checks readiness on 127.0.0.1",
        ),
        (
            'name = "m"\nbackend = "comfyui"\ncomfyui_path = "c"\nlisten = "localhost"\n',
            "listen",
            "not an IP address",
        ),
        ('name = "m"\nbackend = "comfyui"\ncomfyui_path = "c"\npython = ""\n', "python", "at least 1"),
        # Abbreviations ComfyUI's argparse accepts (issue 12: these exposed it on every interface).
        (
            'name = "m"\nbackend = "comfyui"\ncomfyui_path = "c"\nextra_args = ["--list", "0.0.0.0"]\n',
            "extra_args[0]",
            "'--list' sets --listen (an abbreviation of --listen",
        ),
        (
            'name = "m"\nbackend = "comfyui"\ncomfyui_path = "c"\nextra_args = ["--lowvram", "--po", "9999"]\n',
            "extra_args[1]",
            "--port is set by the supervisor (from port)",
        ),
        (
            'name = "m"\nbackend = "comfyui"\ncomfyui_path = "c"\nextra_args = ["--cuda-dev", "1"]\n',
            "extra_args[0]",
            "--cuda-device is set by the supervisor (from gpus)",
        ),
        (
            'name = "m"\nbackend = "comfyui"\ncomfyui_path = "c"\nextra_args = ["--listen"]\n',
            "extra_args[0]",
            "--listen is set by the supervisor (from listen)",
        ),
    ],
    ids=[
        "missing-path",
        "owned-port",
        "owned-cuda-device",
        "unreachable-listen",
        "listen-not-ip",
        "empty-python",
        "abbrev-listen",
        "abbrev-port",
        "abbrev-cuda-device",
        "bare-listen",
    ],
)
def test_comfyui_validation_errors_name_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    found = errors(tmp_path, text)
    assert any(k == key and words in message for k, message in found), found


# --- vllm -----------------------------------------------------------------------------------


def test_vllm_single_gpu(tmp_path: Path) -> None:
    (inst,) = instances(
        tmp_path,
        """
        name = "qwen"
        backend = "vllm"
        gpus = [0]
        port = 9200
        model = "Qwen/Qwen2.5-7B-Instruct"
    """,
    ).values()
    assert inst.launch.argv == (
        "vllm",
        "serve",
        "Qwen/Qwen2.5-7B-Instruct",
        "--host",
        "127.0.0.1",
        "--port",
        "9200",
        "--tensor-parallel-size",
        "1",
    )
    assert inst.launch.cwd is None
    assert_env(inst.launch, gpu_env("0"))
    assert (inst.health.type, inst.health.path) == ("http", "/health")


def test_vllm_tensor_parallel_follows_the_instance_gpus(tmp_path: Path) -> None:
    found = instances(
        tmp_path,
        """
        name = "llama"
        backend = "vllm"
        gpus = [[0, 1], [2, 3, 4, 5]]
        port = 9200
        model = "./weights/llama"
        vllm = "/opt/vllm/bin/vllm"
        host = "0.0.0.0"
        served_model_name = "{name}"
        extra_args = ["--max-model-len", "8192", "--download-dir={here}/hf"]
    """,
    )
    conf = tmp_path / "conf.d"
    a, b = found["llama@gpu0-1"], found["llama@gpu2-3-4-5"]
    assert a.launch.argv == (
        "/opt/vllm/bin/vllm",
        "serve",
        str(conf / "weights" / "llama"),
        "--host",
        "0.0.0.0",
        "--port",
        "9200",
        "--tensor-parallel-size",
        "2",
        "--served-model-name",
        "llama",
        "--max-model-len",
        "8192",
        f"--download-dir={conf}/hf",
    )
    assert_env(a.launch, gpu_env("0,1"))
    assert b.launch.argv[5:9] == ("--port", "9202", "--tensor-parallel-size", "4")
    assert_env(b.launch, gpu_env("2,3,4,5"))


def test_vllm_cpu_only_has_no_tensor_parallel_flag(tmp_path: Path) -> None:
    (inst,) = instances(
        tmp_path,
        """
        name = "tiny"
        backend = "vllm"
        model = "facebook/opt-125m"
        env = { VLLM_CPU_KVCACHE_SPACE = "4" }
    """,
    ).values()
    assert inst.launch.argv == (
        "vllm",
        "serve",
        "facebook/opt-125m",
        "--host",
        "127.0.0.1",
        "--port",
        str(AUTO_START),
    )
    assert_env(inst.launch, {**gpu_env(""), "VLLM_CPU_KVCACHE_SPACE": "4"})


@pytest.mark.parametrize(
    "text,key,words",
    [
        ('name = "m"\nbackend = "vllm"\n', "model", "required key is missing"),
        (
            'name = "m"\nbackend = "vllm"\nmodel = "x"\nextra_args = ["--tensor-parallel-size=2"]\n',
            "extra_args[0]",
            "--tensor-parallel-size is set by the supervisor (from gpus",
        ),
        (
            'name = "m"\nbackend = "vllm"\nmodel = "x"\nextra_args = ["--dtype", "half", "-tp", "2"]\n',
            "extra_args[2]",
            "'-tp' sets --tensor-parallel-size (-tp is --tensor-parallel-size): --tensor-parallel-size is set by the supervisor",
        ),
        (
            'name = "m"\nbackend = "vllm"\nmodel = "x"\nextra_args = ["--tensor_parallel_size", "2"]\n',
            "extra_args[0]",
            "--tensor-parallel-size is set by the supervisor",
        ),
        (
            'name = "m"\nbackend = "vllm"\nmodel = "x"\nextra_args = ["--port", "1"]\n',
            "extra_args[0]",
            "--port is set by the supervisor (from port)",
        ),
        (
            'name = "m"\nbackend = "vllm"\nmodel = "x"\nhost = "192.168.1.2"\n',
            "host",
            "checks readiness on 127.0.0.1",
        ),
        (
            'name = "m"\nbackend = "vllm"\nmodel = "x"\nserved_model_name = "{oops}"\n',
            "served_model_name",
            "unknown placeholder {oops}",
        ),
        # Abbreviations vllm's argparse accepts (issue 12).
        (
            'name = "m"\nbackend = "vllm"\nmodel = "x"\nextra_args = ["--hos", "0.0.0.0"]\n',
            "extra_args[0]",
            "--host is set by the supervisor (from host)",
        ),
        (
            'name = "m"\nbackend = "vllm"\nmodel = "x"\nextra_args = ["--por=9999"]\n',
            "extra_args[0]",
            "--port is set by the supervisor (from port)",
        ),
        (
            'name = "m"\nbackend = "vllm"\nmodel = "x"\nextra_args = ["--dtype", "half", "--tensor-parallel", "4"]\n',
            "extra_args[2]",
            "--tensor-parallel-size is set by the supervisor",
        ),
        (
            'name = "m"\nbackend = "vllm"\nmodel = "x"\nextra_args = ["-t", "4"]\n',
            "extra_args[0]",
            "--tensor-parallel-size is set by the supervisor",
        ),
        (
            'name = "m"\nbackend = "vllm"\nmodel = "x"\nextra_args = ["--uds=/tmp/s"]\n',
            "extra_args[0]",
            "a unix socket replaces host and port",
        ),
        (
            'name = "m"\nbackend = "vllm"\nmodel = "x"\nextra_args = ["--config", "c.yaml"]\n',
            "extra_args[0]",
            "its file may set the flags above",
        ),
    ],
    ids=[
        "missing-model",
        "owned-tp",
        "owned-tp-short",
        "owned-tp-underscore",
        "owned-port",
        "abbrev-host",
        "abbrev-port",
        "abbrev-tp",
        "short-prefix-tp",
        "uds",
        "config-file",
        "unreachable-host",
        "unknown-placeholder",
    ],
)
def test_vllm_validation_errors_name_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    found = errors(tmp_path, text)
    assert any(k == key and words in message for k, message in found), found


# --- textgen --------------------------------------------------------------------------------


def test_textgen_api_only(tmp_path: Path) -> None:
    (inst,) = instances(
        tmp_path,
        """
        name = "chat"
        backend = "textgen"
        gpus = [[0, 1]]
        port = 9300
        textgen_path = "/opt/text-generation-webui"
        model = "Qwen2.5-7B-Instruct-Q4_K_M.gguf"
        extra_args = ["--ctx-size", "8192"]
    """,
    ).values()
    assert inst.launch.argv == (
        "python3",
        "server.py",
        "--api",
        "--api-port",
        "9300",
        "--nowebui",
        "--model",
        "Qwen2.5-7B-Instruct-Q4_K_M.gguf",
        "--ctx-size",
        "8192",
    )
    assert inst.launch.cwd == "/opt/text-generation-webui"
    assert_env(inst.launch, {**gpu_env("0,1"), "OPENEDAI_PORT": "9300"})
    assert (inst.health.type, inst.health.path) == ("http", "/v1/models")
    assert inst.extra_ports == ()


def test_textgen_with_web_ui_gets_a_second_port(tmp_path: Path) -> None:
    (inst,) = instances(
        tmp_path,
        """
        name = "chat"
        backend = "textgen"
        textgen_path = "tgw"
        python = "{python}"
        webui = true
        listen = true
        extra_args = ["--api-key", "secret-{name}"]
    """,
    ).values()
    ui = dict(inst.extra_ports)["ui"]
    assert {inst.port, ui} == {AUTO_START, AUTO_START + 1}
    assert inst.launch.argv == (
        sys.executable,
        "server.py",
        "--api",
        "--api-port",
        str(inst.port),
        "--listen-port",
        str(ui),
        "--listen",
        "--api-key",
        "secret-chat",
    )
    assert inst.launch.cwd == str(tmp_path / "conf.d" / "tgw")
    assert_env(inst.launch, gpu_env(""))
    # every API route wants the key: the probes send it, and it stays out of repr (logs)
    assert (inst.health.type, inst.health.headers) == ("http", (("Authorization", "Bearer secret-chat"),))
    assert "secret" not in repr(inst.health)


@pytest.mark.parametrize(
    "text,key,words",
    [
        ('name = "m"\nbackend = "textgen"\n', "textgen_path", "required key is missing"),
        (
            'name = "m"\nbackend = "textgen"\ntextgen_path = "t"\nextra_args = ["--api-port", "5000"]\n',
            "extra_args[0]",
            "--api-port is set by the supervisor (from port)",
        ),
        (
            'name = "m"\nbackend = "textgen"\ntextgen_path = "t"\nextra_args = ["--listen-host=0.0.0.0"]\n',
            "extra_args[0]",
            "--listen-host is set by the supervisor (from listen)",
        ),
        (
            'name = "m"\nbackend = "textgen"\ntextgen_path = "t"\nextra_args = ["--model", "x"]\n',
            "extra_args[0]",
            "--model is set by the supervisor (from model)",
        ),
        ('name = "m"\nbackend = "textgen"\ntextgen_path = "t"\nwebui = "yes"\n', "webui", "valid boolean"),
    ],
    ids=["missing-path", "owned-api-port", "owned-listen-host", "owned-model", "webui-not-bool"],
)
def test_textgen_validation_errors_name_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    found = errors(tmp_path, text)
    assert any(k == key and words in message for k, message in found), found


# --- end to end: stand-ins for the real servers, run by a real engine ------------------------

FAKE_SERVER = """
import json, os, signal, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = sys.argv[1:]


def value(flag):  # `--flag value` or `--flag=value`
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise SystemExit(f"no {flag} in {args}")


port = int(value(os.environ["FAKE_PORT_FLAG"]))
host = value(os.environ["FAKE_HOST_FLAG"]) if os.environ.get("FAKE_HOST_FLAG") else "127.0.0.1"
keys = ["CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "MODEL_SUPERVISOR_INSTANCE", "OPENEDAI_PORT"]
record = {"argv": sys.argv, "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in keys}}
repository = [a.split("=", 1)[1] for a in args if a.startswith("--model-repository=")]
if repository:  # the triton stand-in reports what the overlay holds when it starts
    record["overlay"] = sorted(
        os.path.join(d, f)[len(repository[0]) + 1:] for d, _, fs in os.walk(repository[0], followlinks=True) for f in fs)
with open(os.environ["FAKE_RECORD"] + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(os.environ["FAKE_RECORD"] + ".tmp", os.environ["FAKE_RECORD"])


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == os.environ["FAKE_READY_PATH"]
        body = json.dumps({"ok": ok}).encode()
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *a):
        print(fmt % a, flush=True)


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
ThreadingHTTPServer((host, port), Handler).serve_forever(poll_interval=0.1)
"""


def write_program(path: Path) -> Path:
    """The stand-in as an executable script (a shebang line to this interpreter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{PY}\n{FAKE_SERVER}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_env(record: Path, port_flag: str, ready_path: str, host_flag: str | None = None) -> str:
    env = {"FAKE_RECORD": str(record), "FAKE_PORT_FLAG": port_flag, "FAKE_READY_PATH": ready_path}
    if host_flag:
        env["FAKE_HOST_FLAG"] = host_flag
    return "env = { " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in env.items()) + " }"


FAST = """
[health]
start_interval = 0.1
[restart]
initial_delay = 0.0
jitter = 0.0
"""


async def run_until_running(engine: Engine, conf_dir: Path, text: str, iid: str) -> dict:
    (conf_dir / "decl.toml").write_text(textwrap.dedent(text) + FAST)
    await engine.start()
    inst = engine.instances[iid]
    try:
        await inst.wait_state(State.RUNNING, timeout=20)
    except TimeoutError:
        raise AssertionError(f"{iid} never ran: {[(t.to_state, t.reason) for t in inst.history]}") from None
    pid = inst.pid
    assert pid is not None and alive(pid)
    record_path = Path(dict(inst.spec.launch.env)["FAKE_RECORD"])
    await wait_until(record_path.exists)
    record = json.loads(record_path.read_text())
    record["port"] = inst.spec.port
    await inst.stop("test over")
    assert inst.state == State.STOPPED and not alive(pid)
    return record


@pytest.mark.slow
async def test_comfyui_runs_under_the_engine(engine: Engine, conf_dir: Path, tmp_path: Path) -> None:
    comfy = tmp_path / "ComfyUI"
    write_program(comfy / "main.py")
    record = await run_until_running(
        engine,
        conf_dir,
        f"""
        name = "faces"
        backend = "comfyui"
        gpus = [[1, 3]]
        comfyui_path = "{comfy}"
        python = "{{python}}"
        {fake_env(tmp_path / "record.json", "--port", "/system_stats", "--listen")}
    """,
        "faces@gpu1-3",
    )
    assert record["argv"][:5] == ["main.py", "--listen", "127.0.0.1", "--port", str(record["port"])]
    user_dir = Path(record["argv"][record["argv"].index("--user-directory") + 1])
    assert user_dir.is_dir() and user_dir.name == "user"  # made by the prepare step before the start
    assert record["cwd"] == str(comfy)
    assert (
        record["env"]["CUDA_VISIBLE_DEVICES"] == "1,3" and record["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    )


@pytest.mark.slow
async def test_vllm_runs_under_the_engine(engine: Engine, conf_dir: Path, tmp_path: Path) -> None:
    vllm = write_program(tmp_path / "bin" / "vllm")
    record = await run_until_running(
        engine,
        conf_dir,
        f"""
        name = "qwen"
        backend = "vllm"
        gpus = [[0, 1]]
        model = "Qwen/Qwen2.5-0.5B"
        vllm = "{vllm}"
        {fake_env(tmp_path / "record.json", "--port", "/health", "--host")}
    """,
        "qwen@gpu0-1",
    )
    assert record["argv"] == [
        str(vllm),
        "serve",
        "Qwen/Qwen2.5-0.5B",
        "--host",
        "127.0.0.1",
        "--port",
        str(record["port"]),
        "--tensor-parallel-size",
        "2",
    ]
    assert record["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"


@pytest.mark.slow
async def test_textgen_runs_under_the_engine(engine: Engine, conf_dir: Path, tmp_path: Path) -> None:
    tgw = tmp_path / "text-generation-webui"
    write_program(tgw / "server.py")
    record = await run_until_running(
        engine,
        conf_dir,
        f"""
        name = "chat"
        backend = "textgen"
        gpus = [2]
        textgen_path = "{tgw}"
        python = "{{python}}"
        {fake_env(tmp_path / "record.json", "--api-port", "/v1/models")}
    """,
        "chat@gpu2",
    )
    assert record["argv"] == ["server.py", "--api", "--api-port", str(record["port"]), "--nowebui"]
    assert record["cwd"] == str(tgw)
    assert record["env"]["CUDA_VISIBLE_DEVICES"] == "2" and record["env"]["OPENEDAI_PORT"] == str(
        record["port"]
    )


@pytest.mark.slow
async def test_triton_process_mode_runs_with_its_overlay(
    engine: Engine, conf_dir: Path, tmp_path: Path
) -> None:
    repo = make_repository(tmp_path)
    before = tree(repo)
    server = write_program(tmp_path / "bin" / "tritonserver")
    record = await run_until_running(
        engine,
        conf_dir,
        f"""
        name = "MAM"
        backend = "triton"
        mode = "process"
        tritonserver = "{server}"
        gpus = [[2, 3]]
        model_repository = "{repo}"
        instances_per_gpu = 8
        {fake_env(tmp_path / "record.json", "--http-port", "/v2/health/ready", "--http-address")}
    """,
        "MAM@gpu2-3",
    )
    # the prepare step ran before the launch: the server found the generated config
    assert record["overlay"] == ["MAM/1/model.py", "MAM/config.pbtxt", "MAM/labels.txt"]
    overlay = tmp_path / "state" / "work" / "MAM@gpu2-3" / "model_repository"
    assert (overlay / "MAM" / "config.pbtxt").read_text() == GENERATED
    assert record["env"]["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert tree(repo) == before


async def test_triton_missing_model_directory_is_a_config_error(
    engine: Engine, conf_dir: Path, tmp_path: Path
) -> None:
    repo = make_repository(tmp_path)
    (conf_dir / "decl.toml").write_text(
        textwrap.dedent(f"""
        name = "Ghost"
        backend = "triton"
        mode = "process"
        tritonserver = "/nonexistent/tritonserver"
        model_repository = "{repo}"
    """)
        + FAST
    )
    await engine.start()
    # Checked before anything starts (issue 11); the launch step's own check
    # (test_triton_overlay_missing_model_fails_the_launch) covers a directory removed later.
    assert "Ghost@cpu" not in engine.instances
    messages = {e["key"]: e["message"] for e in engine.config_errors()}
    assert messages["model_repository"] == f"{repo} has no directory for model(s) Ghost"
    assert messages["tritonserver"] == "program '/nonexistent/tritonserver' does not exist"


def test_comfyui_instances_of_one_checkout_keep_their_own_state(tmp_path: Path) -> None:
    found = instances(
        tmp_path,
        """
        name = "faces"
        backend = "comfyui"
        gpus = [0, 1]
        comfyui_path = "/opt/ComfyUI"
        share_input_output = false
    """,
    )
    seen: set[str] = set()
    for inst in found.values():
        work = (tmp_path / "work" / inst.id).resolve()
        argv = inst.launch.argv
        assert argv[argv.index("--temp-directory") + 1] == str(work)
        assert argv[argv.index("--database-url") + 1] == f"sqlite:///{work}/user/comfyui.db"
        assert argv[argv.index("--input-directory") + 1] == str(work / "input")
        assert argv[argv.index("--output-directory") + 1] == str(work / "output")
        seen |= {
            argv[argv.index(flag) + 1] for flag in ("--temp-directory", "--user-directory", "--database-url")
        }
        # --user-directory must exist when ComfyUI starts: the prepare step makes the directories.
        (step,) = inst.launch.prepare
        step.run()
        assert (work / "user").is_dir() and (work / "input").is_dir() and (work / "output").is_dir()
    assert len(seen) == 6  # nothing shared between the two instances


def test_comfyui_state_flags_in_extra_args_are_the_users(tmp_path: Path) -> None:
    (inst,) = instances(
        tmp_path,
        """
        name = "faces"
        backend = "comfyui"
        comfyui_path = "/opt/ComfyUI"
        extra_args = ["--temp-dir", "/big/tmp", "--database-url=sqlite:///:memory:"]
    """,
    ).values()
    argv = inst.launch.argv
    assert argv.count("--temp-directory") == 0 and "--database-url" not in argv  # only the user's spelling
    assert argv[-3:] == ("--temp-dir", "/big/tmp", "--database-url=sqlite:///:memory:")
    assert "--user-directory" in argv


def test_comfyui_tls_flags_switch_the_probe_to_https(tmp_path: Path) -> None:
    (inst,) = instances(
        tmp_path,
        """
        name = "faces"
        backend = "comfyui"
        comfyui_path = "/opt/ComfyUI"
        extra_args = ["--tls-key=/k.pem", "--tls-certfile", "/c.pem"]
    """,
    ).values()
    assert (inst.health.type, inst.health.path) == ("https", "/system_stats")
    (half,) = instances(
        tmp_path,
        """
        name = "faces"
        backend = "comfyui"
        comfyui_path = "/opt/ComfyUI"
        extra_args = ["--tls-keyfile=/k.pem"]
    """,
    ).values()
    assert half.health.type == "http"  # ComfyUI serves HTTPS only with both files


# --- owned flags against the servers' own option lists ---------------------------------------


def _owned_and_syntax():
    from supervisor.backends import comfyui, textgen, vllm
    from supervisor.backends.parser_options import COMFYUI, TEXTGEN, VLLM

    return [
        ("comfyui", comfyui.OWNED_FLAGS, COMFYUI),
        ("vllm", vllm.OWNED_FLAGS, VLLM),
        ("textgen", textgen.OWNED_FLAGS, TEXTGEN),
    ]


@pytest.mark.parametrize(
    "preset,owned,syntax", _owned_and_syntax(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_owned_flag_is_an_option_of_the_real_parser(preset: str, owned: dict, syntax) -> None:
    # A flag the server does not know would guard nothing (and an abbreviation of the real
    # one would pass); the list records the commit it was taken from.
    assert syntax.source and any(c.isdigit() for c in syntax.source)
    missing = sorted(set(owned) - syntax.long_options)
    assert not missing, f"{preset}: {missing} are not options of {syntax.source}"


@pytest.mark.parametrize(
    "preset,owned,syntax", _owned_and_syntax(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_flags_the_preset_passes_are_owned(preset: str, owned: dict, syntax, tmp_path: Path) -> None:
    """Each flag in a preset's own argv that decides where it listens or which GPUs it uses is
    refused when repeated in extra_args, in its shortest accepted abbreviation too."""
    from supervisor.backends.flags import owned_flag_errors

    for flag in owned:
        others = [o for o in syntax.all_option_strings() if o != flag]
        # (a flag that is a prefix of another, like --model of --model-impl, has no abbreviation)
        shortest = next(
            (flag[:n] for n in range(3, len(flag)) if not any(o.startswith(flag[:n]) for o in others)), flag
        )
        assert owned_flag_errors([shortest, "1"], owned, syntax), (preset, shortest)


def test_textgen_drops_inherited_openedai_listen_variables_unless_declared(tmp_path: Path) -> None:
    (inst,) = instances(
        tmp_path,
        """
        name = "chat"
        backend = "textgen"
        textgen_path = "/opt/tg"
        env = {OPENEDAI_ENABLE_IPV6 = "1"}
    """,
    ).values()
    assert set(inst.launch.unset_env) == {"OPENEDAI_CERT_PATH", "OPENEDAI_KEY_PATH", "OPENEDAI_DISABLE_IPV4"}
    assert env_of(inst.launch)["OPENEDAI_ENABLE_IPV6"] == "1"
    import re

    (pattern,) = inst.launch.fail_patterns
    assert re.search(pattern, "12:00:01 WARNING Port 5000 is already in use. Using port 41234 instead.")


@pytest.mark.parametrize(
    "args,index",
    [
        (["--api-p", "5001"], 0),
        (["--verbose", "--listen-h=0.0.0.0"], 1),
        (["--api-disable"], 0),
        (["--nowe"], 0),
    ],
)
def test_textgen_abbreviated_owned_flags_are_refused(tmp_path: Path, args: list[str], index: int) -> None:
    found = errors(
        tmp_path, f'name = "m"\nbackend = "textgen"\ntextgen_path = "t"\nextra_args = {json.dumps(args)}\n'
    )
    assert any(k == f"extra_args[{index}]" and "is set by the supervisor" in m for k, m in found), found


@pytest.mark.slow
async def test_unset_env_reaches_the_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner removes `unset_env` from what the child inherits (a real child process)."""
    from supervisor.adapters.logfiles import LogFile
    from supervisor.adapters.runners.process import ProcessRunner

    monkeypatch.setenv("OPENEDAI_DISABLE_IPV4", "1")
    monkeypatch.setenv("KEEP_ME", "yes")
    out = tmp_path / "env.json"
    plan = ProcessLaunch(
        argv=(
            sys.executable,
            "-c",
            f"import json, os; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))",
        ),
        unset_env=("OPENEDAI_DISABLE_IPV4",),
    )
    runner = ProcessRunner()
    handle = await runner.launch(plan, LogFile(tmp_path / "log"), "t@cpu")
    await wait_until(lambda: out.exists() and out.stat().st_size > 0)
    seen = json.loads(out.read_text())
    assert "OPENEDAI_DISABLE_IPV4" not in seen and seen["KEEP_ME"] == "yes"
    del handle


# --- env: ${VAR} from the supervisor's environment -------------------------------------------


def test_env_extends_inherited_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("ODD", "a{b}c")
    (inst,) = instances(
        tmp_path,
        """
        name = "m"
        backend = "process"
        command = ["true"]
        env = {PATH = "/opt/tb/bin:${PATH}", PRICE = "$$5 on {port}", RAW = "${ODD}", PLAIN = "$HOME"}
    """,
    ).values()
    env = env_of(inst.launch)
    assert env["PATH"] == "/opt/tb/bin:/usr/bin:/bin"
    assert env["PRICE"] == f"$5 on {inst.port}"
    assert env["RAW"] == "a{b}c"  # the variable's braces are not placeholders
    assert env["PLAIN"] == "$HOME"  # only ${NAME} expands


def test_env_unset_variable_is_a_load_error_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    found = errors(
        tmp_path,
        'name = "m"\nbackend = "vllm"\nmodel = "x"\nenv = {LD_LIBRARY_PATH = "/x:${NOPE_NOT_SET}"}\n',
    )
    assert (
        "env.LD_LIBRARY_PATH",
        "${NOPE_NOT_SET} is not set in the supervisor's environment (write $$ for a literal $)",
    ) in found


def test_env_change_of_the_supervisor_changes_the_launch_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = 'name = "m"\nbackend = "process"\ncommand = ["true"]\nenv = {P = "${SUPERVISOR_X}"}\n'
    monkeypatch.setenv("SUPERVISOR_X", "1")
    (a,) = instances(tmp_path, text).values()
    monkeypatch.setenv("SUPERVISOR_X", "2")
    (b,) = instances(tmp_path, text).values()
    assert a.launch_hash != b.launch_hash


# --- textgen: user_data/CMD_FLAGS.txt (issue 12) ---------------------------------------------
# A stand-in that reads CMD_FLAGS.txt the way text-generation-webui's modules/shared.py does
# (at 1dcde41d: prepended to the command line) and, like its verify_api_key, answers 401 to any
# request without `Authorization: Bearer <--api-key>`.
FAKE_TEXTGEN = r"""
import os, shlex, signal, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

flags = []
if os.path.exists("user_data/CMD_FLAGS.txt"):
    with open("user_data/CMD_FLAGS.txt", encoding="utf-8") as f:
        kept = [l.strip().rstrip("\\").strip() for l in f if l.strip().rstrip("\\").strip() and not l.strip().startswith("#")]
    flags = shlex.split(" ".join(kept))
args = flags + sys.argv[1:]
key = ""
for i, arg in enumerate(args):
    if arg == "--api-key":
        key = args[i + 1]
port = int(args[args.index("--api-port") + 1])
print(f"OpenAI API key:\n\n{key}\n", flush=True)  # the real server logs it too


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = not key or self.headers.get("Authorization") == f"Bearer {key}"
        self.send_response(200 if ok and self.path == "/v1/models" else 401 if not ok else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, fmt, *a):
        print(fmt % a, flush=True)


signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever(poll_interval=0.1)
"""


def textgen_checkout(root: Path, cmd_flags: str | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "server.py").write_text(FAKE_TEXTGEN)
    if cmd_flags is not None:
        (root / "user_data").mkdir(exist_ok=True)
        (root / "user_data" / "CMD_FLAGS.txt").write_text(cmd_flags)
    return root


def textgen_decl(tgw: Path, extra: str = "") -> str:
    return f'name = "chat"\nbackend = "textgen"\ntextgen_path = "{tgw}"\npython = "{{python}}"\n{extra}'


def test_cmd_flags_are_split_like_text_generation_webui_does() -> None:
    from supervisor.backends.textgen import split_cmd_flags

    text = (
        "# Only used by the one-click installer.\r\n"
        "# Example: --listen --api\r\n"
        "\n"
        "--api-key 'two words' \\\n"
        "   --ctx-size 8192\\\n"
        "  # --model not-this-one\n"
        '--chat-template-file "a b.jinja"\n'
    )
    assert split_cmd_flags(text) == [
        "--api-key",
        "two words",
        "--ctx-size",
        "8192",
        "--chat-template-file",
        "a b.jinja",
    ]
    assert split_cmd_flags("# nothing\n\n") == []
    with pytest.raises(ValueError):
        split_cmd_flags("--api-key 'unclosed\n")


def test_user_data_dir_is_found_like_modules_paths_does(tmp_path: Path) -> None:
    from supervisor.backends.textgen import user_data_dir

    tgw = tmp_path / "tgw"
    tgw.mkdir()
    assert user_data_dir(tgw, ["--api"]) == tgw / "user_data"
    assert user_data_dir(tgw, ["--user-data-dir", "/srv/ud"]) == Path("/srv/ud")
    assert user_data_dir(tgw, ["--user-data-dir=rel"]) == tgw / "rel"
    assert user_data_dir(tgw, ["--user-data", "/srv/ud"]) == tgw / "user_data"  # pre-parsed: no abbreviations
    assert user_data_dir(tgw, ["--portable"]) == tgw / "user_data"  # no ../user_data
    (tmp_path / "user_data").mkdir()
    assert user_data_dir(tgw, ["--portable"]) == tmp_path / "user_data"


@pytest.mark.parametrize(
    "flags,words",
    [
        ("--listen-port 7000\n", "item 0: '--listen-port' sets --listen-port"),
        (
            "--ctx-size 4096\n--api-p=5001\n",
            "item 2: '--api-p=5001' sets --api-port (an abbreviation of --api-port",
        ),
        ("--listen\n", "'--listen' sets --listen"),
        ("--api-key 'unclosed\n", "cannot be split into flags (No closing quotation)"),
        ("-- --model x\n", "has a bare '--'"),
    ],
    ids=["listen-port", "abbreviated-api-port", "listen", "unclosed-quote", "double-dash"],
)
def test_owned_flags_in_cmd_flags_are_load_errors_naming_the_file(
    tmp_path: Path, flags: str, words: str
) -> None:
    import tomllib

    from supervisor.config.declarations import parse_declaration, preflight

    tgw = textgen_checkout(tmp_path / "tgw", flags)
    spec = parse_declaration(tomllib.loads(textgen_decl(tgw)), tmp_path / "decl.toml", REGISTRY, Defaults())
    problems = [(e.key, e.message) for e in preflight(spec)]
    path = tgw / "user_data" / "CMD_FLAGS.txt"
    assert any(
        key == "textgen_path" and message.startswith(str(path)) and words in message
        for key, message in problems
    ), problems


def test_cmd_flags_that_is_a_fifo_is_an_error_not_a_hang(tmp_path: Path) -> None:
    from supervisor.backends.textgen import CmdFlagsError, read_cmd_flags

    tgw = textgen_checkout(tmp_path / "tgw", None)
    (tgw / "user_data").mkdir()
    fifo = tgw / "user_data" / "CMD_FLAGS.txt"
    os.mkfifo(fifo)
    with pytest.raises(CmdFlagsError, match="CMD_FLAGS.txt is not a regular file"):
        read_cmd_flags(fifo)
    assert read_cmd_flags(tgw / "nothing.txt") is None


def test_api_key_from_cmd_flags_or_extra_args_becomes_the_probe_header(tmp_path: Path) -> None:
    tgw = textgen_checkout(tmp_path / "tgw", "--api-key from-file\n")
    (inst,) = instances(tmp_path, textgen_decl(tgw)).values()
    assert inst.health.headers == (("Authorization", "Bearer from-file"),)
    assert "from-file" not in repr(inst.health) and "from-file" not in repr(inst.launch.prepare)
    assert "from-file" not in json.dumps(inst.describe())  # the API's status shows describe()
    # the command line comes after the file's flags: its --api-key wins
    (inst,) = instances(tmp_path, textgen_decl(tgw, 'extra_args = ["--api-k=from-args"]\n')).values()
    assert inst.health.headers == (("Authorization", "Bearer from-args"),)
    (tgw / "user_data" / "CMD_FLAGS.txt").write_text("--ctx-size 4096\n")
    (inst,) = instances(tmp_path, textgen_decl(tgw)).values()
    assert inst.health.headers == ()


def serve_fake(tgw: Path, conf_dir: Path, extra: str = "", interval: float = 10.0) -> None:
    fast = FAST.replace("[health]\n", f"[health]\ninterval = {interval}\n")
    (conf_dir / "decl.toml").write_text(textgen_decl(tgw, extra) + fast)


@pytest.mark.slow
async def test_api_key_in_cmd_flags_is_sent_by_readiness_and_liveness(
    engine: Engine, conf_dir: Path, tmp_path: Path
) -> None:
    tgw = textgen_checkout(tmp_path / "tgw", "# the user's own flags\n--api-key s3cret-key\n")
    serve_fake(tgw, conf_dir, interval=0.2)
    await engine.start()
    inst = engine.instances["chat@cpu"]
    try:
        await inst.wait_state(State.RUNNING, timeout=20)
    except TimeoutError:
        raise AssertionError(f"never ran: {[(t.to_state, t.reason) for t in inst.history]}") from None
    pid = inst.pid
    await asyncio.sleep(1.0)  # several liveness probes, each of which would get 401 without the key
    assert inst.state == State.RUNNING and inst.pid == pid
    assert "s3cret-key" not in json.dumps(engine.status(), default=str)
    # the same server without the header answers 401: the probe is what sends it
    from supervisor.adapters.health import probe

    bare = dataclasses.replace(inst.spec.health, headers=())
    result = await probe(bare, inst.spec.port)
    assert not result.ok and "401" in result.detail and "s3cret" not in result.detail
    await inst.stop("test over")


@pytest.mark.slow
async def test_cmd_flags_is_checked_again_at_each_start(
    engine: Engine, conf_dir: Path, tmp_path: Path
) -> None:
    tgw = textgen_checkout(tmp_path / "tgw", "--api-key one\n")
    serve_fake(tgw, conf_dir)
    await engine.start()
    inst = engine.instances["chat@cpu"]
    await inst.wait_state(State.RUNNING, timeout=20)
    flags = tgw / "user_data" / "CMD_FLAGS.txt"

    flags.write_text("--api-key one\n--api-port 5000\n")  # an owned flag added behind our back
    await inst.restart("test")
    await wait_until(lambda: inst.state in (State.BACKOFF, State.FATAL), timeout=20)
    assert f"{flags} item 2: '--api-port' sets --api-port" in (inst.history[-1].reason or "")

    flags.write_text("--api-key two\n")  # another key: the probes would send a stale one
    await inst.restart("test")
    await wait_until(
        lambda: "changed since the model's declaration was loaded" in (inst.history[-1].reason or ""),
        timeout=20,
    )
    assert inst.state in (State.BACKOFF, State.FATAL)

    os.utime(conf_dir / "decl.toml", ns=(0, 0))  # the remedy the reason names: the declaration read again
    await engine.reload("CMD_FLAGS.txt edited")
    await inst.wait_state(State.RUNNING, timeout=20)
    assert inst.spec.health.headers == (("Authorization", "Bearer two"),)
    await inst.stop("test over")


@pytest.mark.slow
async def test_taken_textgen_ports_fail_the_start_naming_port_and_holder(
    engine: Engine, conf_dir: Path, tmp_path: Path
) -> None:
    """The preflight in instance.py covers textgen's API port ({port}) and its UI port (an
    extra port): text-generation-webui would silently move to another port instead."""
    import socket
    import subprocess

    tgw = textgen_checkout(tmp_path / "tgw", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        api_port = s.getsockname()[1]
    holder = subprocess.Popen(
        [
            PY,
            "-c",
            "import socket, sys, time\ns = socket.socket()\n"
            "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); print('up', flush=True)\n"
            "time.sleep(60)",
            str(api_port),
            "port-holder",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"up\n"
        serve_fake(tgw, conf_dir, f"port = {api_port}\nwebui = true\n")
        await engine.start()
        inst = engine.instances["chat@cpu"]
        await wait_until(lambda: inst.state in (State.BACKOFF, State.FATAL), timeout=20)
        reason = inst.history[-1].reason or ""
        assert (
            f"port {api_port} is already in use by pid {holder.pid}" in reason and "port-holder" in reason
        ), reason
    finally:
        holder.kill()
        holder.wait()
    await inst.stop("free the api port")
    ui_port = dict(inst.spec.extra_ports)["ui"]
    holder = subprocess.Popen(
        [
            PY,
            "-c",
            "import socket, sys, time\ns = socket.socket()\n"
            "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); print('up', flush=True)\n"
            "time.sleep(60)",
            str(ui_port),
            "ui-holder",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"up\n"
        await inst.start("test")
        # An automatic port may be traded for another one (instance.py), but the failed start
        # names the port and its holder first.
        await wait_until(
            lambda: any(f"port {ui_port} is" in (t.reason or "") for t in inst.history), timeout=20
        )
        reason = next(t.reason for t in inst.history if f"port {ui_port} is" in (t.reason or ""))
        assert f"pid {holder.pid}" in reason and "ui-holder" in reason, reason
    finally:
        holder.kill()
        holder.wait()
        await inst.stop("test over")
