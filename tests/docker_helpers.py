"""A real Docker engine for the tests, and a tiny local image built from static busybox.

No registry is reachable, so the image is made here: a root filesystem holding
/bin/busybox (Debian's busybox-static) and its applets as symlinks, imported with the SDK.
Without an engine the docker tests skip with the reason; with
MODEL_SUPERVISOR_TEST_REQUIRE_DOCKER=1 (set by .ci/run) they fail instead.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from typing import Any

import pytest

IMAGE = "local/busybox:test"
APPLETS = ["sh", "sleep", "httpd", "echo", "cat", "mkdir", "ls", "true", "false", "kill", "trap"]
REQUIRE = "MODEL_SUPERVISOR_TEST_REQUIRE_DOCKER"


def docker_client() -> Any:
    """A client to a live engine, or skip (or fail, in CI) with the reason."""
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
        return client
    except Exception as exc:
        reason = f"no usable Docker engine ({type(exc).__name__}: {exc})"
        if os.environ.get(REQUIRE):
            pytest.fail(f"{reason}, but {REQUIRE} is set")
        pytest.skip(reason)


def busybox_rootfs() -> bytes:
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        message = "static busybox is not installed (apt-get install busybox-static)"
        if os.environ.get(REQUIRE):
            pytest.fail(message)
        pytest.skip(message)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "www", "www/v2", "www/v2/health", "tmp"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
        for path, body in (("www/v2/health/ready", b"ready\n"), ("www/index.html", b"busybox\n")):
            info = tarfile.TarInfo(path)
            info.size = len(body)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def ensure_image(client: Any) -> str:
    import docker

    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        repository, tag = IMAGE.split(":")
        client.api.import_image_from_data(busybox_rootfs(), repository=repository, tag=tag)
        client.images.get(IMAGE)
    return IMAGE


def containers_of(client: Any, label_value: str | None = None) -> list[Any]:
    import docker

    from supervisor.adapters.runners.docker import LABEL_INSTANCE, LABEL_MANAGED

    filters = {"label": [f"{LABEL_MANAGED}=1"] + ([f"{LABEL_INSTANCE}={label_value}"] if label_value else [])}
    for _ in range(20):
        try:
            return client.containers.list(all=True, filters=filters)
        except docker.errors.NotFound:  # listed, then removed before docker-py inspected it
            continue
    return client.containers.list(all=True, filters=filters)
