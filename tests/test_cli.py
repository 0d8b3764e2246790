"""The CLI client against a real `serve` process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from .conftest import (
    PY,
    REPO,
    Output,
    alive,
    declaration,
    default_sigint,
    demo_cmd,
    free_port,
    free_range,
    wait_for,
    write_decl,
)

pytestmark = pytest.mark.slow  # a real `serve` process and CLI processes

TCP = {"type": "tcp", "start_interval": 0.05}


class Served:
    def __init__(self, tmp_path: Path, token: str | None = None) -> None:
        self.conf = tmp_path / "conf.d"
        self.state = tmp_path / "state"
        self.conf.mkdir()
        self.port = free_port()
        low, high = free_range()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
        self.env.update(MODEL_SUPERVISOR_PORT=str(self.port), MODEL_SUPERVISOR_PORT_RANGE=f"{low}-{high}")
        if token:
            self.env["MODEL_SUPERVISOR_API_TOKEN"] = token
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "supervisor", "serve", "--conf-dir", str(self.conf), "--state-dir", str(self.state)],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        proc = self.proc

        def up() -> bool:
            assert proc.poll() is None, f"serve exited: {proc.communicate()[0]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5).read()
                return True
            except OSError:
                return False

        wait_for(up, 60, "serve to come up")

    def cli(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PY, "-m", "supervisor", *args],
            cwd=REPO,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def items(self) -> dict[str, dict]:
        out = self.cli("status", "--json")
        ok = out.returncode in (0, 3)  # 3: something is unhealthy, the answer is still there
        return {i["instance_id"]: i for i in json.loads(out.stdout)["instances"]} if ok else {}

    def wait_state(self, instance: str, state: str, timeout: float = 60) -> dict:
        seen: dict[str, dict] = {}

        def reached() -> bool:
            seen.update(self.items())
            return instance in seen and seen[instance]["state"] == state

        try:
            wait_for(reached, timeout, f"{instance} to reach {state}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {seen.get(instance)}") from None
        return seen[instance]

    def popen_cli(self, *args: str) -> tuple[subprocess.Popen, Output]:
        """A long-running CLI command (a follow, a watch), stopped with SIGINT as ^C does, and
        its output read as it comes."""
        proc = subprocess.Popen(
            [PY, "-m", "supervisor", *args],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,
        )
        assert proc.stdout is not None
        return proc, Output(proc.stdout)

    @staticmethod
    def interrupt(proc: subprocess.Popen, output: Output) -> str:
        """^C: SIGINT, then wait for the exit (a child left running would fail the test)."""
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{proc.args} did not stop on SIGINT") from None
        return output.close()

    def event_stream_open(self, proc: subprocess.Popen) -> bool:
        """True while `proc` holds a connection to the API open (a watch's event stream: its
        requests for a frame are each a connection of their own, closed once answered)."""
        child = psutil.Process(proc.pid)
        connections = getattr(child, "net_connections", None) or child.connections  # psutil < 6
        return any(
            c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == self.port
            for c in connections("tcp")
        )

    def stop(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                out, _ = self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                out, _ = self.proc.communicate()
            return out
        return self.proc.communicate()[0]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    try:
        yield s
    finally:
        if s.proc is not None:
            s.stop()


def test_status_start_stop_restart_logs_reload(served: Served) -> None:
    write_decl(served.conf, declaration("web", demo_cmd("--name", "web"), health=TCP))
    served.start()
    served.wait_state("web@cpu", "RUNNING")
    out = served.cli("status")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()[:2]
    assert header.split() == [
        "INSTANCE",
        "STATE",
        "PID",
        "PORT",
        "GPUS",
        "GPU",
        "MEM",
        "UPTIME",
        "RESTARTS",
        "REASON",
    ]
    assert row.split()[:2] == ["web@cpu", "RUNNING"]
    # columns are aligned: every row starts its STATE where the header does
    assert row.index("RUNNING") == header.index("STATE")

    out = served.cli(
        "start",
        "gpu-model",
        "--gpu",
        "1",
        "--type",
        "process",
        "--wait",
        "--config",
        json.dumps({"command": demo_cmd(), "health": TCP}),
    )
    assert out.returncode == 0, out.stderr
    assert "gpu-model@gpu1" in out.stdout and "RUNNING" in out.stdout
    assert tomllib.loads((served.conf / "gpu-model.toml").read_text())["gpus"] == [1]

    pid = served.wait_state("web@cpu", "RUNNING")["pid"]
    out = served.cli("restart", "web")
    assert out.returncode == 0
    wait_for(lambda: served.wait_state("web@cpu", "RUNNING")["pid"] != pid, 60, "web@cpu on a new pid")

    out = served.cli("logs", "web@cpu", "-n", "50")
    assert out.returncode == 0 and "web listening on" in out.stdout

    out = served.cli("stop", "gpu-model", "--gpu", "1")
    assert out.returncode == 0 and "STOPPED" in out.stdout
    assert tomllib.loads((served.conf / "gpu-model.toml").read_text())["gpus"] == []

    out = served.cli("stop", "web")
    assert out.returncode == 0 and "STOPPED" in out.stdout
    out = served.cli("start", "web")
    assert out.returncode == 0
    served.wait_state("web@cpu", "RUNNING")

    write_decl(served.conf, declaration("late", ["sleep", "3600"]))
    assert served.cli("reload").returncode == 0
    served.wait_state("late@cpu", "RUNNING")


def test_failures_exit_non_zero_with_the_servers_message(served: Served) -> None:
    served.start()
    out = served.cli("stop", "ghost", "--gpu", "0")
    assert out.returncode == 1
    assert "Model 'ghost' not found or not running on GPU 0. (HTTP 404)" in out.stderr
    out = served.cli("kill", "1")
    assert out.returncode == 1 and "never a valid target" in out.stderr and "HTTP 403" in out.stderr
    out = served.cli("start", "x", "--gpu", "0")
    assert out.returncode == 1 and "body.model_type: required" in out.stderr
    out = served.cli("logs", "nope@cpu")
    assert out.returncode == 1 and "HTTP 404" in out.stderr
    out = served.cli("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1 and "cannot reach the supervisor" in out.stderr


def test_gpus_without_a_driver(served: Served) -> None:
    served.start()
    out = served.cli("gpus")
    assert out.returncode == 0 and out.stdout.startswith("no GPUs (")
    out = served.cli("gpus", "--json")
    assert json.loads(out.stdout) == []


def test_logs_follow_streams_new_lines(served: Served) -> None:
    write_decl(served.conf, declaration("chatty", demo_cmd(), health=TCP))
    served.start()
    port = served.wait_state("chatty@cpu", "RUNNING")["port"]
    follower, output = served.popen_cli("logs", "chatty@cpu", "-f", "-n", "1")
    try:
        output.wait_for(bool, what="the last line (-n 1): following from there on")
        assert "POST /v1/predict" not in output.text()
        body = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/predict", data=b'{"inputs": [21]}', method="POST"
        )
        urllib.request.urlopen(body, timeout=10).read()  # the server logs "POST /v1/predict"
        output.wait_for(lambda text: "POST /v1/predict" in text, what="the new line")
    finally:
        served.interrupt(follower, output)


def test_token_from_settings(tmp_path: Path) -> None:
    s = Served(tmp_path, token="t0ken")
    try:
        s.start()
        assert s.cli("status").returncode == 0  # the CLI reads the same settings
        env = {k: v for k, v in s.env.items() if k != "MODEL_SUPERVISOR_API_TOKEN"}
        out = s.cli("status", env=env)
        assert out.returncode == 1 and "HTTP 401" in out.stderr
    finally:
        s.stop()


def test_non_loopback_without_token_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    out = subprocess.run(
        [
            PY,
            "-m",
            "supervisor",
            "serve",
            "--conf-dir",
            str(tmp_path / "conf.d"),
            "--state-dir",
            str(tmp_path / "state"),
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")},
    )
    assert out.returncode == 2
    assert "refusing to serve the API on 0.0.0.0 without a token" in out.stderr and "--insecure" in out.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    (tmp_path / "conf.d").mkdir()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = subprocess.run(
            [
                PY,
                "-m",
                "supervisor",
                "serve",
                "--conf-dir",
                str(tmp_path / "conf.d"),
                "--state-dir",
                str(tmp_path / "state"),
                "--port",
                str(port),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode == 2 and "address already in use" in out.stderr


def test_no_child_left_after_serve_stops(served: Served) -> None:
    write_decl(served.conf, declaration("a", demo_cmd(), health=TCP))
    served.start()
    pid = served.wait_state("a@cpu", "RUNNING")["pid"]
    out = served.stop()
    assert served.proc.returncode == 0, out
    assert not alive(pid)


def test_status_watch_redraws_on_a_state_change(served: Served) -> None:
    write_decl(served.conf, declaration("watched", ["sleep", "3600"]))
    served.start()
    served.wait_state("watched@cpu", "RUNNING")
    watcher, output = served.popen_cli("status", "-w", "--interval", "60")
    try:
        output.wait_for(lambda text: "watched@cpu" in text and "RUNNING" in text, what="the first frame")
        wait_for(lambda: served.event_stream_open(watcher), what="the watch's event stream")
        assert served.cli("stop", "watched").returncode == 0
        # The interval is 60 s: only the event stream can trigger this redraw.
        output.wait_for(lambda text: "STOPPED" in text, 30, "a redraw with watched@cpu STOPPED")
        assert output.text().count("--- ") >= 2
    finally:
        served.interrupt(watcher, output)


# -- issue 13: honest output, stop/start --all, exit codes, the small wrongs ------------------------


def _rows(stdout: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in stdout.splitlines()[1:] if line.strip()}


def test_start_and_restart_print_the_state_after_the_action(served: Served) -> None:
    write_decl(served.conf, declaration("web", demo_cmd("--ready-after", "0.5"), health=TCP, enabled=False))
    served.start()
    served.wait_state("web@cpu", "STOPPED")
    out = served.cli("start", "web")
    assert out.returncode == 0, out.stderr
    row = _rows(out.stdout)["web@cpu"]
    assert row[1] in ("STARTING", "RUNNING") and row[2].isdigit(), out.stdout  # not the STOPPED of before
    first = served.wait_state("web@cpu", "RUNNING")["pid"]
    assert int(row[2]) == first

    out = served.cli("restart", "web")
    row = _rows(out.stdout)["web@cpu"]
    assert out.returncode == 0 and row[2].isdigit() and int(row[2]) != first, out.stdout  # the new pid
    out = served.cli("restart", "web", "--wait")
    row = _rows(out.stdout)["web@cpu"]
    assert out.returncode == 0 and row[1] == "RUNNING", out.stdout

    served.cli("stop", "web")
    out = served.cli("start", "web", "--wait")  # --wait without --gpu is honoured
    assert out.returncode == 0 and _rows(out.stdout)["web@cpu"][1] == "RUNNING", out.stdout


def test_start_wait_reports_a_failed_start(served: Served) -> None:
    write_decl(
        served.conf,
        declaration(
            "broken",
            [PY, "-c", "import sys; sys.exit(3)"],
            health=TCP,
            enabled=False,
            restart={"initial_delay": 30.0},
        ),
    )
    served.start()
    out = served.cli("start", "broken", "--wait", "--timeout", "20")
    assert out.returncode == 1 and "broken@cpu failed to start" in out.stderr and "HTTP 502" in out.stderr


def test_stop_all_and_start_all_edit_every_file_and_restore_them(served: Served) -> None:
    for name in ("alpha", "beta"):
        write_decl(served.conf, declaration(name, ["sleep", "3600"]))
    texts = {p.name: p.read_text() for p in served.conf.iterdir()}
    served.start()
    served.wait_state("alpha@cpu", "RUNNING")
    served.wait_state("beta@cpu", "RUNNING")
    pids = [served.wait_state(i, "RUNNING")["pid"] for i in ("alpha@cpu", "beta@cpu")]

    out = served.cli("stop", "--all")
    assert out.returncode == 0, out.stderr
    rows = _rows(out.stdout)
    assert rows["alpha@cpu"][1] == rows["beta@cpu"][1] == "STOPPED"  # answered once everything stopped
    assert not any(alive(p) for p in pids)
    for name in texts:
        assert tomllib.loads((served.conf / name).read_text())["enabled"] is False

    out = served.cli("start", "--all", "--wait")
    assert out.returncode == 0, out.stderr
    rows = _rows(out.stdout)
    assert rows["alpha@cpu"][1] == rows["beta@cpu"][1] == "RUNNING"
    assert {p.name: p.read_text() for p in served.conf.iterdir()} == texts  # exactly as written

    out = served.cli("stop", "alpha", "--all")
    assert out.returncode == 2 and "not both" in out.stderr
    out = served.cli("stop")
    assert out.returncode == 2 and "--all" in out.stderr


def test_reload_waits_and_prints_what_it_changed(served: Served) -> None:
    served.start()
    write_decl(served.conf, declaration("late", ["sleep", "3600"]))
    out = served.cli("reload")
    assert out.returncode == 0 and out.stdout.startswith("reloaded: ") and "late@cpu" in out.stdout, (
        out.stdout
    )
    served.wait_state("late@cpu", "RUNNING")
    out = served.cli("reload", "--json")
    result = json.loads(out.stdout)
    assert result["changes"] == {
        "added": [],
        "removed": [],
        "replaced": [],
        "updated": [],
    }  # this reload's, not an earlier one's
    assert served.cli("reload").stdout.startswith("reloaded: nothing changed")


def test_status_exit_codes_and_models_without_instances(served: Served) -> None:
    write_decl(served.conf, declaration("fine", ["sleep", "3600"]))
    write_decl(served.conf, declaration("parked", ["sleep", "3600"], gpus=[]))
    served.start()
    served.wait_state("fine@cpu", "RUNNING")
    out = served.cli("status")
    assert out.returncode == 0, out.stdout + out.stderr
    row = _rows(out.stdout)["parked"]
    assert "no instances (gpus = [])" in " ".join(row)
    assert any(
        m["model"] == "parked"
        for m in json.loads(served.cli("status", "--json").stdout)["models_without_instances"]
    )
    assert "no instances" in served.cli("status", "parked").stdout

    (served.conf / "bad.toml").write_text('name = "bad"\nbackend = "process"\nport = "x"\n')
    wait_for(lambda: served.cli("status").returncode == 3, 60, "status to exit 3 for the bad file")
    out = served.cli("status")
    assert out.returncode == 3 and "configuration errors:" in out.stdout, out.stdout
    (served.conf / "bad.toml").unlink()

    write_decl(
        served.conf,
        declaration(
            "dies",
            [PY, "-c", "raise SystemExit(1)"],
            restart={"max_retries": 1, "initial_delay": 0.0, "jitter": 0.0},
        ),
    )
    served.wait_state("dies@cpu", "FATAL")
    out = served.cli("status")
    assert out.returncode == 3 and "FATAL" in out.stdout
    assert served.cli("status", "--json").returncode == 3
    assert served.cli("status", "fine").returncode == 0  # only that model's instances count


def test_status_watch_writes_no_escape_codes_into_a_pipe(served: Served) -> None:
    write_decl(served.conf, declaration("w", ["sleep", "3600"]))
    served.start()
    served.wait_state("w@cpu", "RUNNING")
    watcher, output = served.popen_cli("status", "-w", "--interval", "0.2")
    try:
        output.wait_for(lambda text: text.count("--- ") >= 2 and "w@cpu" in text, 60, "a second frame")
    finally:
        out = served.interrupt(watcher, output)
    assert "w@cpu" in out and "\033" not in out and out.count("--- ") >= 2


def test_small_wrongs_kill_logs_and_help(served: Served) -> None:
    write_decl(served.conf, declaration("solo", demo_cmd(), health=TCP))
    write_decl(served.conf, declaration("pair", ["sleep", "3600"], gpus=[0, 1]))
    served.start()
    served.wait_state("solo@cpu", "RUNNING")
    served.wait_state("pair@gpu1", "RUNNING")

    out = served.cli("kill", "999999")
    assert out.returncode == 1 and "pid 999999: Process not found" in out.stderr
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        out = served.cli("kill", str(bystander.pid))
        assert out.returncode == 1 and "--force" in out.stderr and "?force=true" not in out.stderr, out.stderr
    finally:
        bystander.kill()
        bystander.wait()

    out = served.cli("logs", "solo")  # a model with one instance: its log
    assert out.returncode == 0 and "listening on" in out.stdout
    out = served.cli("logs", "pair")
    assert out.returncode == 1 and "pair@gpu0, pair@gpu1" in out.stderr
    out = served.cli("logs", "ghost")
    assert out.returncode == 1 and "no instance or model 'ghost'" in out.stderr
    out = served.cli("logs", "solo", "--json")
    assert out.returncode == 2 and "unrecognized arguments: --json" in out.stderr

    assert "stop only the instance there" in served.cli("stop", "--help").stdout
    assert "redraw at least this often" in served.cli("status", "--help").stdout
    assert "exit status: 0 every instance healthy" in served.cli("status", "--help").stdout
    assert "give up waiting after this long" in served.cli("start", "--help").stdout


def test_client_commands_import_no_pydantic_sanic_or_asyncio(served: Served) -> None:
    served.start()
    probe = (
        "import sys\nfrom supervisor.cli.main import main\ncode = main(['status'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_settings', 'sanic', "
        "'sanic_ext', 'asyncio', 'uvloop', 'httpx'))\nprint('HEAVY', heavy, code)\n"
    )
    out = subprocess.run(
        [PY, "-c", probe], cwd=REPO, env=served.env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY [] 0" in out.stdout, out.stdout


def test_validate_accepts_one_file(tmp_path: Path) -> None:
    conf = tmp_path / "conf.d"
    conf.mkdir()
    good = write_decl(conf, declaration("good", ["sleep", "1"], port=7001))
    clash = write_decl(
        conf, declaration("zclash", ["sleep", "1"], port=7001)
    )  # same port: checked against the dir
    run = lambda *a: subprocess.run(
        [PY, "-m", "supervisor", "validate", *a], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    out = run(str(good))
    assert out.returncode == 0 and f"{good}: 1 valid model(s), 0 error(s)" in out.stdout, (
        out.stdout + out.stderr
    )
    out = run(str(clash))
    assert (
        out.returncode == 1
        and "7001" in out.stderr
        and "declaration directory does not exist" not in out.stderr
    )
