"""Issue 11 item 2: the API on a unix socket with mode 0600, in-process and through `serve` and the CLI."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from supervisor.api.app import create_app
from supervisor.api.listeners import ListenerError, bind_unix, create_servers
from supervisor.config.settings import Settings
from supervisor.runtime.engine import Engine
from supervisor.wiring import build

from .conftest import PY, REPO, declaration, free_port, sleep_cmd, wait_until, write_decl

NOBODY = 65534


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Not under tmp_path: pytest's base directory is 0700, which would lock other users out
    # whatever the socket's mode, and the test below must show that the mode does it.
    d = Path(tempfile.mkdtemp(prefix="msup-sock-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Engine]:
    sup = build(settings)
    engine = sup.engine
    app = create_app(settings, engine, sup.gpus, sup.metrics)
    servers = await create_servers(app, settings)
    await servers.startup()
    await servers.before_start()
    await servers.after_start()
    task = asyncio.ensure_future(servers.serve_forever())
    try:
        yield engine
    finally:
        await servers.before_stop()
        servers.close()
        await servers.wait_closed()
        await servers.after_stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def uds_client(path: Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(path)), base_url="http://localhost", timeout=30
    )


@pytest.mark.slow
async def test_socket_only_listener_serves_the_api_with_mode_0600(
    settings: Settings, sock_dir: Path, conf_dir: Path
) -> None:
    path = sock_dir / "api.sock"
    port = free_port()
    settings = settings.model_copy(
        update={
            "unix_socket": path,
            "listen_tcp": False,
            "port": port,
            "gpu_source": "none",
            "allowed_origins": ["https://gpu.example.com"],
        }
    )
    write_decl(conf_dir, declaration("m", sleep_cmd(), gpus="none"))
    async with serving(settings) as engine, uds_client(path) as client:
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        with pytest.raises(OSError):  # no TCP listener
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        await wait_until(lambda: "m" in engine.catalog.models)
        r = await client.get("/api/v1/models")
        assert r.status_code == 200 and r.json()[0]["name"] == "m"
        # No name to rebind on a socket: any Host placeholder a client sends is fine.
        for host in ("localhost", "%2Ftmp%2Fapi.sock", "api.moby.localhost", "evil.example"):
            assert (await client.get("/healthz", headers={"Host": host})).status_code == 200, host
        # A browser can only be behind a proxy here: its Origin must be listed.
        r = await client.post("/api/v1/models/m/restart", headers={"Origin": "http://localhost"})
        assert r.status_code == 403, r.text
        r = await client.post("/api/v1/models/m/restart", headers={"Origin": "https://gpu.example.com"})
        assert r.status_code == 202, r.text
        r = await client.post(
            "/api/v1/models/m/restart", content=b"{}", headers={"Content-Type": "text/plain"}
        )
        assert r.status_code == 415
        r = await client.post("/api/v1/models/m/restart")  # the CLI: no Origin
        assert r.status_code == 202, r.text
    assert not path.exists(), "the socket file is removed at shutdown"


SYSTEM_PYTHON = "/usr/bin/python3"  # the test's own interpreter may not be readable by another user


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root (to connect as another user) and /usr/bin/python3",
)
def test_another_user_cannot_connect(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    sock = bind_unix(path)
    probe = [
        SYSTEM_PYTHON,
        "-c",
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('connected')",
        str(path),
    ]
    try:
        denied = subprocess.run(probe, user=NOBODY, capture_output=True, text=True, timeout=30)
        assert denied.returncode != 0 and "PermissionError" in denied.stderr, denied.stdout + denied.stderr
        path.chmod(0o666)  # control: with a wider mode the same user gets in
        allowed = subprocess.run(probe, user=NOBODY, capture_output=True, text=True, timeout=30)
        assert allowed.stdout.strip() == "connected", allowed.stderr
    finally:
        sock.close()


def test_socket_path_errors_are_named(sock_dir: Path) -> None:
    with pytest.raises(ListenerError, match="does not exist"):
        bind_unix(sock_dir / "missing" / "api.sock")
    (sock_dir / "file.sock").write_text("")
    with pytest.raises(ListenerError, match=r"file.sock: exists and is not a socket"):
        bind_unix(sock_dir / "file.sock")
    live = bind_unix(sock_dir / "live.sock")
    try:
        with pytest.raises(ListenerError, match="another server is listening there"):
            bind_unix(sock_dir / "live.sock")
    finally:
        live.close()
    # Closed but left on disk (a crashed server): replaced.
    again = bind_unix(sock_dir / "live.sock")
    again.close()


def test_settings_refuse_no_listener_at_all() -> None:
    with pytest.raises(ValueError, match="listen_tcp = false needs unix_socket"):
        Settings(listen_tcp=False)


@pytest.mark.slow
def test_serve_and_cli_over_the_socket(tmp_path: Path, sock_dir: Path) -> None:
    conf, state, path = tmp_path / "conf.d", tmp_path / "state", sock_dir / "api.sock"
    conf.mkdir()
    write_decl(conf, declaration("sleeper", sleep_cmd(), gpus="none"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
    env.update(
        MODEL_SUPERVISOR_UNIX_SOCKET=str(path),
        MODEL_SUPERVISOR_LISTEN_TCP="false",
        MODEL_SUPERVISOR_GPU_SOURCE="none",
        MODEL_SUPERVISOR_PORT=str(port),
    )
    server = subprocess.Popen(
        [PY, "-m", "supervisor", "serve", "--conf-dir", str(conf), "--state-dir", str(state)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
    try:
        deadline = time.monotonic() + 20
        while True:
            status = subprocess.run(
                [PY, "-m", "supervisor", "status", "--url", f"unix://{path}"],
                cwd=REPO,
                env=cli_env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            if status.returncode == 0 and "sleeper@cpu" in status.stdout and "RUNNING" in status.stdout:
                break
            assert time.monotonic() < deadline and server.poll() is None, status.stdout + status.stderr
            time.sleep(0.2)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        stopped = subprocess.run(
            [PY, "-m", "supervisor", "stop", "sleeper", "--url", f"unix://{path}"],
            cwd=REPO,
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "STOPPED" in stopped.stdout, stopped.stdout
        gone = subprocess.run(
            [PY, "-m", "supervisor", "status", "--url", f"unix://{sock_dir / 'nope.sock'}"],
            cwd=REPO,
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert gone.returncode != 0 and "cannot reach the supervisor at unix://" in gone.stderr, gone.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            out, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            out, _ = server.communicate()
    assert server.returncode == 0, out[-3000:]
    assert f"API on unix://{path}" in out, out[-3000:]
    assert not path.exists()
