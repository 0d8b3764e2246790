"""The API's listeners: TCP (`host:port`), a unix socket (`unix_socket`), or both, one Sanic app.

Anyone with a shell on the machine can reach 127.0.0.1; a unix socket with mode 0600 can be
reached only by the supervisor's user (and root), as the Docker daemon's is. It is bound under
a temporary name, chmod-ed and only then renamed into place, so it is never reachable with
wider permissions; a live socket at the path (another `serve`) is an error, a dead one is
replaced, and ours is removed at shutdown.

`ApiServers` has the lifecycle of the one `AsyncioServer` Sanic returns: the app's start/stop
events run once (through the first listener), every listener serves and closes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path
from typing import Any

from sanic import DefaultSanic
from sanic.server.async_server import AsyncioServer
from sanic.server.socket import bind_unix_socket

from supervisor.config.settings import Settings

SOCKET_MODE = 0o600


class ListenerError(OSError):
    pass


def bind_unix(path: Path) -> socket.socket:
    """A listening AF_UNIX socket at `path`, mode 0600 (blocking: stats and connects)."""
    path = path.absolute()
    if not path.parent.is_dir():
        raise ListenerError(f"unix_socket {path}: directory {path.parent} does not exist")
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(
                f"unix_socket {path}: exists and is not a socket; remove it or choose another path"
            )
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
            except (ConnectionRefusedError, FileNotFoundError):
                pass  # left behind by a process that is gone: replaced below
            else:
                raise ListenerError(f"unix_socket {path}: another server is listening there")
    try:
        return bind_unix_socket(path, mode=SOCKET_MODE)
    except OSError as exc:
        raise ListenerError(f"unix_socket {path}: cannot listen there: {exc.strerror or exc}") from None


def remove_unix(path: Path, inode: int) -> None:
    """Remove the socket file if it is still the one we bound (a newer server may own the path)."""
    try:
        if path.lstat().st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


class ApiServers:
    def __init__(self, servers: list[AsyncioServer], where: list[str], unix: tuple[Path, int] | None) -> None:
        self.servers = servers
        self.where = ", ".join(where)
        self._unix = unix

    # The app's lifecycle events: once, through the first listener.
    def startup(self) -> Any:
        return self.servers[0].startup()

    def before_start(self) -> Any:
        return self.servers[0].before_start()

    def after_start(self) -> Any:
        return self.servers[0].after_start()

    def before_stop(self) -> Any:
        return self.servers[0].before_stop()

    def after_stop(self) -> Any:
        return self.servers[0].after_stop()

    async def serve_forever(self) -> None:
        await asyncio.gather(*(server.serve_forever() for server in self.servers))

    def close(self) -> None:
        for server in self.servers:
            server.close()

    async def wait_closed(self) -> None:
        for server in self.servers:
            await server.wait_closed()
        if self._unix is not None:
            await asyncio.to_thread(remove_unix, *self._unix)
            self._unix = None


async def create_servers(app: DefaultSanic, settings: Settings) -> ApiServers:
    """Bind every configured listener (not serving yet: call `startup()` and the rest)."""
    servers: list[AsyncioServer] = []
    where: list[str] = []
    unix: tuple[Path, int] | None = None
    try:
        if settings.listen_tcp:
            server = await app.create_server(
                host=settings.host, port=settings.port, return_asyncio_server=True
            )
            if server is None:
                raise ListenerError(f"cannot serve the API on {settings.host}:{settings.port}")
            servers.append(server)
            host = f"[{settings.host}]" if ":" in settings.host else settings.host
            where.append(f"http://{host}:{settings.port}")
        if settings.unix_socket is not None:
            path = settings.unix_socket.absolute()
            sock = await asyncio.to_thread(bind_unix, path)
            unix = (path, os.stat(path).st_ino)
            # `sock=`, not `unix=`: Sanic would bind the path itself, with mode 0666.
            server = await app.create_server(sock=sock, return_asyncio_server=True)
            if server is None:
                sock.close()
                raise ListenerError(f"cannot serve the API on unix socket {path}")
            servers.append(server)
            where.append(f"unix://{path}")
    except BaseException:
        for server in servers:
            server.close()
        if unix is not None:
            remove_unix(*unix)
        raise
    return ApiServers(servers, where, unix)
