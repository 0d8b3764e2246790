"""Every invalid-declaration case gets an error naming file, key (or line) and reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.adapters.confd import read_dir
from supervisor.adapters.ports import PortAllocator
from supervisor.backends.registry import default_registry
from supervisor.config.declarations import ModelSpec
from supervisor.config.desired import Catalog, resolve

from .conftest import REPO, declaration, write_decl

REGISTRY = default_registry(load_plugins=False)


def load(conf_dir: Path, previous: Catalog | None = None) -> Catalog:
    from supervisor.config.declarations import Defaults

    parsed = read_dir(conf_dir, REGISTRY, Defaults())
    ports = PortAllocator(30000, 30999, is_free=lambda _p: True)
    return resolve(parsed, previous or Catalog(), ports.assign)


def errors_of(catalog: Catalog, file: Path) -> list[str]:
    return [str(e) for e in catalog.errors.get(str(file), [])]


def write_text(conf_dir: Path, name: str, text: str) -> Path:
    path = conf_dir / name
    path.write_text(text)
    return path


CASES = [
    # (description, toml text, expected key, expected words in the message)
    ("unknown key", 'name="m"\nbackend="process"\ncommand=["x"]\ncomand=["y"]\n', "comand", "unknown key"),
    (
        "unknown key in a table",
        'name="m"\nbackend="process"\ncommand=["x"]\n[restart]\npolicy="always"\nretries=3\n',
        "restart.retries",
        "unknown key",
    ),
    (
        "wrong type",
        'name="m"\nbackend="process"\ncommand=["x"]\n[restart]\nmax_retries="3"\n',
        "restart.max_retries",
        "valid integer",
    ),
    (
        "command as a shell string",
        'name="m"\nbackend="process"\ncommand="python -m x"\n',
        "command",
        "valid list",
    ),
    ("empty command", 'name="m"\nbackend="process"\ncommand=[]\n', "command", "at least 1"),
    ("bad name", 'name="../etc"\nbackend="process"\ncommand=["x"]\n', "name", "not a valid model name"),
    (
        "name too long",
        f'name="{"a" * 65}"\nbackend="process"\ncommand=["x"]\n',
        "name",
        "not a valid model name",
    ),
    ("missing name", 'backend="process"\ncommand=["x"]\n', "name", "required key is missing"),
    ("missing backend", 'name="m"\ncommand=["x"]\n', "backend", "required key is missing"),
    ("unknown backend", 'name="m"\nbackend="tensorflow"\n', "backend", "unknown backend 'tensorflow'"),
    (
        "negative retries",
        'name="m"\nbackend="process"\ncommand=["x"]\n[restart]\nmax_retries=-1\n',
        "restart.max_retries",
        "greater than or equal to 0",
    ),
    (
        "bad policy",
        'name="m"\nbackend="process"\ncommand=["x"]\n[restart]\npolicy="sometimes"\n',
        "restart.policy",
        "'always', 'on-failure' or 'never'",
    ),
    ("port out of range", 'name="m"\nbackend="process"\ncommand=["x"]\nport=70000\n', "port", "got 70000"),
    (
        "gpu listed twice",
        'name="m"\nbackend="process"\ncommand=["x"]\ngpus=[0,[1,0]]\n',
        "gpus",
        "GPU 0 is listed more than once",
    ),
    (
        "negative gpu",
        'name="m"\nbackend="process"\ncommand=["x"]\ngpus=[-1]\n',
        "gpus",
        "-1 is not a GPU index",
    ),
    ("gpus as a string", 'name="m"\nbackend="process"\ncommand=["x"]\ngpus="all"\n', "gpus", "got 'all'"),
    (
        "reserved env",
        'name="m"\nbackend="process"\ncommand=["x"]\nenv={CUDA_VISIBLE_DEVICES="1"}\n',
        "env",
        "set by the supervisor",
    ),
    (
        "env value not a string",
        'name="m"\nbackend="process"\ncommand=["x"]\nenv={THREADS=4}\n',
        "env.THREADS",
        "valid string",
    ),
    (
        "unknown placeholder",
        'name="m"\nbackend="process"\ncommand=["x", "--port", "{prot}"]\n',
        "command[2]",
        "unknown placeholder {prot}",
    ),
    (
        "bad stop signal",
        'name="m"\nbackend="process"\ncommand=["x"]\n[stop]\nsignal="SIGFOO"\n',
        "stop.signal",
        "unknown or unusable stop signal",
    ),
    (
        "http path",
        'name="m"\nbackend="process"\ncommand=["x"]\n[health]\ntype="http"\npath="health"\n',
        "health.path",
        "must start with '/'",
    ),
    (
        "cap below initial",
        'name="m"\nbackend="process"\ncommand=["x"]\n[restart]\ninitial_delay=10.0\nmax_delay=1.0\n',
        "restart",
        "max_delay (1.0) is smaller than initial_delay (10.0)",
    ),
]


@pytest.mark.parametrize("what,text,key,words", CASES, ids=[c[0] for c in CASES])
def test_invalid_declaration_names_file_key_and_reason(conf_dir: Path, what, text, key, words) -> None:
    bad = write_text(conf_dir, "bad.toml", text)
    good = write_decl(conf_dir, declaration("good"))
    catalog = load(conf_dir)
    errors = errors_of(catalog, bad)
    assert errors, f"{what}: no error reported"
    assert any(f"{bad}: {key}: " in e and words in e for e in errors), errors
    # a broken file never stops the others from loading
    assert "good" in catalog.models and not errors_of(catalog, good)


def test_toml_syntax_error_names_the_line(conf_dir: Path) -> None:
    bad = write_text(conf_dir, "bad.toml", 'name = "m"\nbackend = "process"\ncommand = ["x"\nport = 3\n')
    catalog = load(conf_dir)
    (error,) = catalog.errors[str(bad)]
    assert error.line == 4 and error.message.startswith("TOML syntax error")
    assert str(error).startswith(f"{bad}:4: TOML syntax error")


def test_duplicate_key_is_a_toml_error(conf_dir: Path) -> None:
    bad = write_text(conf_dir, "bad.toml", 'name = "m"\nname = "n"\n')
    (error,) = load(conf_dir).errors[str(bad)]
    assert error.line == 2


def test_not_utf8(conf_dir: Path) -> None:
    bad = conf_dir / "bad.toml"
    bad.write_bytes(b'name = "\xff"\n')
    (error,) = load(conf_dir).errors[str(bad)]
    assert "not UTF-8" in error.message


def test_all_errors_of_a_file_reported_at_once(conf_dir: Path) -> None:
    bad = write_text(
        conf_dir,
        "bad.toml",
        'name="m"\nbackend="process"\ncommand=["x"]\nport="1"\nfoo=1\n[restart]\nfactor=0.5\n',
    )
    keys = {e.key for e in load(conf_dir).errors[str(bad)]}
    assert keys == {"port", "foo", "restart.factor"}


def test_duplicate_names_across_files_first_file_keeps_it(conf_dir: Path) -> None:
    a = write_decl(conf_dir, declaration("same"), "a.toml")
    b = write_decl(conf_dir, declaration("same"), "b.toml")
    catalog = load(conf_dir)
    assert catalog.owners["same"] == str(a)
    (error,) = errors_of(catalog, b)
    assert f"already declared in {a}" in error and str(b) in error


def test_duplicate_name_later_the_owner_keeps_it(conf_dir: Path) -> None:
    b = write_decl(conf_dir, declaration("same"), "b.toml")
    first = load(conf_dir)
    a = write_decl(conf_dir, declaration("same"), "a.toml")  # sorts first, but came later
    second = load(conf_dir, first)
    assert second.owners["same"] == str(b)
    assert f"already declared in {b}" in errors_of(second, a)[0]


def test_explicit_port_conflict_across_models(conf_dir: Path) -> None:
    write_decl(conf_dir, declaration("one", port=9000), "a.toml")
    b = write_decl(conf_dir, declaration("two", port=9000), "b.toml")
    catalog = load(conf_dir)
    assert "two" not in catalog.models
    assert "port 9000 (instance two@cpu) is already declared by one@cpu" in errors_of(catalog, b)[0]


def test_broken_edit_keeps_last_good_version(conf_dir: Path) -> None:
    path = write_decl(conf_dir, declaration("m", port=9100))
    good = load(conf_dir)
    path.write_text('name = "m"\nbackend = "process"\ncommand = "oops"\n')
    broken = load(conf_dir, good)
    assert broken.models["m"] is good.models["m"]
    assert broken.instances["m@cpu"].launch_hash == good.instances["m@cpu"].launch_hash
    assert errors_of(broken, path)
    write_decl(conf_dir, declaration("m", port=9100))
    fixed = load(conf_dir, broken)
    assert not fixed.errors


def test_gpu_sets_and_explicit_port_base(conf_dir: Path) -> None:
    write_decl(conf_dir, declaration("tp", gpus=[0, [2, 3]], port=9200))
    catalog = load(conf_dir)
    assert {i: (s.gpus, s.port) for i, s in catalog.instances.items()} == {
        "tp@gpu0": ((0,), 9200),
        "tp@gpu2-3": ((2, 3), 9202),
    }
    env = dict(catalog.instances["tp@gpu2-3"].launch.env)
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_placeholders_and_relative_cwd(conf_dir: Path) -> None:
    (conf_dir / "work").mkdir()  # a cwd that does not exist is an error (issue 11)
    write_decl(
        conf_dir,
        declaration(
            "p",
            command=["{python}", "-m", "srv", "--port={port}", "--gpus={gpus}", "{instance}"],
            gpus=[1],
            port=9300,
            cwd="work",
            env={"OUT": "/tmp/{name}"},
        ),
    )
    spec = load(conf_dir).instances["p@gpu1"]
    assert spec.launch.argv == (sys.executable, "-m", "srv", "--port=9301", "--gpus=1", "p@gpu1")
    assert spec.launch.cwd == str((conf_dir / "work").resolve())
    assert dict(spec.launch.env)["OUT"] == "/tmp/p"


def test_comment_only_edit_changes_no_hash(conf_dir: Path) -> None:
    path = write_decl(conf_dir, declaration("m"))
    before = load(conf_dir).instances["m@cpu"]
    path.write_text("# a comment\n\n" + path.read_text() + "\n\n")
    after = load(conf_dir).instances["m@cpu"]
    assert (before.launch_hash, before.policy_hash) == (after.launch_hash, after.policy_hash)


def test_policy_change_is_not_a_launch_change(conf_dir: Path) -> None:
    path = write_decl(conf_dir, declaration("m"))
    before = load(conf_dir).instances["m@cpu"]
    write_decl(conf_dir, declaration("m", restart={"max_retries": 9}))
    after = load(conf_dir).instances["m@cpu"]
    assert before.launch_hash == after.launch_hash and before.policy_hash != after.policy_hash
    assert path.exists()


def test_spec_has_every_default_documented_in_readme() -> None:
    readme = (REPO / "README.md").read_text()
    from supervisor.core.spec import Declaration, HealthSpec, RestartSpec, StopSpec

    for model, table in (
        (Declaration, ""),
        (RestartSpec, "restart."),
        (HealthSpec, "health."),
        (StopSpec, "stop."),
    ):
        for key in model.model_fields:
            if key in ("restart", "health", "stop"):
                continue
            assert f"`{table}{key}`" in readme, f"README does not document `{table}{key}`"


@pytest.mark.slow
def test_validate_command(tmp_path: Path, conf_dir: Path) -> None:
    write_decl(conf_dir, declaration("ok"))
    ok = subprocess.run(
        [sys.executable, "-m", "supervisor", "validate", str(conf_dir)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "1 valid model(s)" in ok.stdout
    write_text(
        conf_dir, "bad.toml", 'name="bad"\nbackend="process"\ncommand=["x"]\n[restart]\nmax_retries=-2\n'
    )
    bad = subprocess.run(
        [sys.executable, "-m", "supervisor", "validate", str(conf_dir)], capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert (
        f"{conf_dir}/bad.toml: restart.max_retries: Input should be greater than or equal to 0 (got -2)"
        in bad.stderr
    )


@pytest.mark.slow
def test_shipped_conf_d_is_valid() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "validate", str(REPO / "conf.d")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_shipped_examples_are_valid() -> None:
    # The examples name programs and checkouts of a GPU box, not of this one.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor",
            "validate",
            "--no-host-checks",
            str(REPO / "examples" / "conf.d"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_model_spec_round_trip(conf_dir: Path) -> None:
    write_decl(conf_dir, declaration("m", gpus=[0], restart={"policy": "never"}))
    spec: ModelSpec = load(conf_dir).models["m"]
    assert spec.raw["restart"] == {"policy": "never"}
    assert spec.effective_document()["restart"]["max_retries"] == 5
