"""Where the CLI's client commands find the API, read without the server's settings stack.

`supervisor.config.settings` (pydantic-settings) costs about 120 ms to import; a client command
needs four values from the same sources, so it reads them here with the same precedence:
defaults < settings file (`--settings` or MODEL_SUPERVISOR_SETTINGS_FILE) < MODEL_SUPERVISOR_*
env vars (case-insensitive, as pydantic-settings reads them) < flags. Issue 13: a client
command under 120 ms, import time included. Stdlib only, and no asyncio.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any  # already loaded by the stdlib modules the client needs

ENV_PREFIX = "MODEL_SUPERVISOR_"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6004


class ClientConfigError(Exception):
    pass


class ClientConfig:  # a plain class: dataclasses costs 5 ms to import
    def __init__(self, url: str, token: str | None, unix_socket: Path | None, listen_tcp: bool) -> None:
        self.url = url
        self.token = token
        self.unix_socket = unix_socket
        self.listen_tcp = listen_tcp


def _env() -> dict[str, str]:
    return {k.upper(): v for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX)}


def _read_file(path: Path) -> dict[str, Any]:
    import tomllib  # only when there is a settings file

    if not path.is_file():
        raise ClientConfigError(f"settings file {path} does not exist")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ClientConfigError(f"invalid settings (settings file {path}): {exc}") from None
    except OSError as exc:
        raise ClientConfigError(f"cannot read settings file {path}: {exc.strerror or exc}") from None


def _lookup(key: str, env: dict[str, str], file: dict[str, Any], where: str) -> tuple[Any, str] | None:
    name = ENV_PREFIX + key.upper()
    if name in env:
        return env[name], f"env {name}"
    if key in file:
        return file[key], f"{key} in {where}"
    return None


def _port(value: Any, origin: str) -> int:
    try:
        port = int(value) if not isinstance(value, bool) else -1
    except (TypeError, ValueError):
        port = -1
    if not 0 <= port <= 65535:
        raise ClientConfigError(f"invalid settings: port must be 0-65535 (got {value!r} from {origin})")
    return port


def _bool(value: Any, origin: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ClientConfigError(
        f"invalid settings: listen_tcp must be true or false (got {value!r} from {origin})"
    )


def load(settings_file: Path | None, url: str | None = None, token: str | None = None) -> ClientConfig:
    env = _env()
    path = settings_file or (
        Path(env[ENV_PREFIX + "SETTINGS_FILE"]) if env.get(ENV_PREFIX + "SETTINGS_FILE") else None
    )
    file = _read_file(path) if path is not None else {}
    where = f"settings file {path}"

    found = _lookup("host", env, file, where)
    host = str(found[0]) if found else DEFAULT_HOST
    found = _lookup("port", env, file, where)
    port = _port(*found) if found else DEFAULT_PORT
    found = _lookup("unix_socket", env, file, where)
    unix_socket = Path(str(found[0])) if found and found[0] else None
    found = _lookup("listen_tcp", env, file, where)
    listen_tcp = _bool(*found) if found else True

    if token is None:
        found = _lookup("api_token", env, file, where)
        if found and found[0]:
            token = str(found[0])
        else:
            found = _lookup("api_token_file", env, file, where)
            if found and found[0]:
                token_path = Path(str(found[0]))
                try:
                    token = token_path.read_text().strip() or None
                except OSError as exc:
                    raise ClientConfigError(
                        f"cannot read api_token_file {token_path}: {exc.strerror}"
                    ) from None

    if url is None and not listen_tcp and unix_socket is not None:  # the API listens on the socket only
        url = f"unix://{unix_socket}"
    if host in ("0.0.0.0", "::", ""):  # a wildcard bind is reached on loopback
        host = DEFAULT_HOST
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return ClientConfig(url or f"http://{host}:{port}", token or None, unix_socket, listen_tcp)
