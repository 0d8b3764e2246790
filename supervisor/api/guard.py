"""Who may talk to the API, decided from a request's head, before its body is read (issue 11).

A browser is the attacker's tool here: any page the user visits can send requests to
127.0.0.1, and with no token set (the default) the API would run what they declare. Three
rules close that without touching the old clients (JSON bodies, no Origin header):

- **Host** (DNS rebinding, 421): on TCP, the Host header must name an address the connection
  arrived on, the configured `host`, `localhost`, `127.0.0.1` or `[::1]`, with the server's port,
  or one of `allowed_hosts`. A rebinding page's requests carry its own name (`evil.example`).
- **Origin** (cross-site requests, 403): a state-changing request (anything but GET/HEAD/OPTIONS)
  whose Origin, or without one its Referer, is not the server's own origin (same as the Host it
  was sent to) nor one of `allowed_origins`. No Origin and no Referer: not a browser, allowed.
- **Content-Type** (415): a non-empty body must be `application/json`. Browsers send JSON
  cross-site only after a CORS preflight, which this API never grants; `text/plain` and form
  posts, which need no preflight, are refused here.

On the unix socket no browser can connect and there is no name to rebind (clients send
placeholders: curl `localhost`, others the encoded socket path), so Host is not checked; a
browser can only be behind a reverse proxy there, so an Origin/Referer must be in
`allowed_origins` (the proxy's Host says nothing about the page).

The body limit is enforced here too: a Content-Length over `MAX_BODY` is answered 413 at once;
a chunked body stops being read at `MAX_BODY`. After the answer Sanic reads and discards the
rest of a body (up to `DRAIN_LIMIT`, the app's REQUEST_MAX_SIZE), so the client, still
sending, gets to read the 413 instead of a connection reset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sanic import DefaultSanic, Request
from sanic.exceptions import SanicException

from supervisor.config.settings import Settings

#: The largest request body the API accepts (a declaration is a few KiB).
MAX_BODY = 1024 * 1024
#: Bodies up to this size are read and thrown away after a 413, so the client sees the answer;
#: beyond it the connection is closed unread.
DRAIN_LIMIT = 256 * 1024 * 1024

LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
WILDCARD_BINDS = ("", "0.0.0.0", "::", "[::]")


class Refused(SanicException):
    """A request refused by these rules; the message says which rule and what was sent."""

    quiet = True

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status_code=status)


@dataclass(frozen=True, slots=True)
class Local:
    """Where a connection arrived: an address and port on TCP, or the unix socket."""

    address: str | None = None  # "127.0.0.1", "[::1]"; None on the unix socket
    port: int | None = None
    unix_path: str | None = None


def split_host(value: str) -> tuple[str, int | None] | None:
    """`"LocalHost:6004"` -> `("localhost", 6004)`, `"[::1]"` -> `("[::1]", None)`; None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_text = value.partition(":")
        if not sep:
            port_text = None
        if ":" in (port_text or ""):
            return None
    if not name or any(c in name for c in "/@ \\"):
        return None
    name = name.rstrip(".") if name != "." else name
    if port_text is None:
        return name, None
    if not port_text.isdigit() or len(port_text) > 5:
        return None
    return name, int(port_text)


def _bracket(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


@dataclass(frozen=True, slots=True)
class Policy:
    bound_host: str
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            settings.host.strip().lower(), tuple(settings.allowed_hosts), tuple(settings.allowed_origins)
        )

    # -- the three rules; each returns why the request is refused, or None ------------------------
    def host_problem(self, host: str | None, local: Local) -> str | None:
        if local.unix_path is not None or "*" in self.allowed_hosts:
            return None
        if not host:
            return "a Host header is required"
        parsed = split_host(host)
        if parsed is None:
            return f"malformed Host header {host!r}"
        name, port = parsed
        if name in self.allowed_hosts or (port is not None and f"{name}:{port}" in self.allowed_hosts):
            return None
        names = set(LOOPBACK)
        if self.bound_host not in WILDCARD_BINDS:
            names.add(_bracket(self.bound_host))
        if local.address:
            names.add(_bracket(local.address.lower()))
        if name in names and (port if port is not None else 80) == local.port:
            return None
        return (
            f"Host {host!r} is not this server (expected localhost, 127.0.0.1, [::1] or the bound address, "
            f"port {local.port}; add reverse-proxy names to allowed_hosts)"
        )

    def origin_problem(
        self, method: str, origin: str | None, referer: str | None, host: str | None, local: Local
    ) -> str | None:
        if method.upper() in SAFE_METHODS:
            return None
        if origin is not None:
            claimed, what = origin.strip().lower(), "Origin"
        elif referer is not None:
            parts = urlsplit(referer.strip())
            claimed, what = f"{parts.scheme}://{parts.netloc}".lower(), "Referer"
        else:
            return None  # no browser sends a POST/PUT/DELETE without either
        if claimed in self.allowed_origins:
            return None
        if (
            local.unix_path is None
            and host
            and claimed in (f"http://{host.strip().lower()}", f"https://{host.strip().lower()}")
        ):
            return None  # same origin: the page was loaded from the address this request was sent to
        shown = origin if what == "Origin" else referer
        return (
            f"cross-origin {method.upper()} refused: {what} {shown!r} is not this server's origin "
            "(add trusted origins to allowed_origins)"
        )


def content_type_problem(content_type: str | None, has_body: bool) -> str | None:
    if not has_body:
        return None
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json":
        return None
    return (
        f"request bodies must be JSON (Content-Type: application/json), got {content_type!r}"
        if content_type
        else "request bodies must be JSON: send Content-Type: application/json"
    )


def local_of(request: Request) -> Local:
    sockname: Any = request.conn_info.sockname if request.conn_info else None
    if isinstance(sockname, str):  # AF_UNIX
        return Local(unix_path=sockname)
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return Local(str(sockname[0]), int(sockname[1]))
    return Local()


def check(request: Request, policy: Policy) -> None:
    """Raise `Refused` for a request the rules refuse; set the body limit on the others."""
    headers = request.headers
    local = local_of(request)
    host = headers.getone("host", None)
    problem = policy.host_problem(host, local)
    if problem:
        raise Refused(421, problem)
    problem = policy.origin_problem(
        request.method, headers.getone("origin", None), headers.getone("referer", None), host, local
    )
    if problem:
        raise Refused(403, problem)
    length_text = headers.getone("content-length", None)
    chunked = "transfer-encoding" in headers
    length = int(length_text) if length_text and length_text.strip().isdigit() else 0
    if length > MAX_BODY:
        raise Refused(413, f"request body of {length} bytes is over the limit of {MAX_BODY} bytes")
    problem = content_type_problem(headers.getone("content-type", None), length > 0 or chunked)
    if problem:
        raise Refused(415, problem)
    if chunked and request.stream is not None:
        request.stream.request_max_size = MAX_BODY  # Sanic answers 413 once a chunked body passes it


def install(app: DefaultSanic, settings: Settings) -> None:
    policy = Policy.from_settings(settings)
    app.config.REQUEST_MAX_SIZE = DRAIN_LIMIT

    # A signal, not middleware: Sanic reads the whole body before request middleware runs, and
    # these checks must come first (a refused request's body is never stored, only drained).
    @app.signal("http.routing.before")
    async def guard(request: Request) -> None:
        check(request, policy)
