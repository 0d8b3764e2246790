"""A missing Docker daemon is said in a user's words (issue 13), against a real socket path."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.adapters.runners.docker import DockerRunner, daemon_reason


def test_no_daemon_at_a_socket_that_does_not_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("docker")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")
    assert DockerRunner("t")._ping() == f"no Docker daemon at unix://{tmp_path}/docker.sock"


def test_the_reasons_in_words() -> None:
    wrapped = OSError("('Connection aborted.', FileNotFoundError(2, 'No such file or directory'))")
    assert (
        daemon_reason(wrapped, "unix:///var/run/docker.sock")
        == "no Docker daemon at unix:///var/run/docker.sock"
    )
    denied = OSError("x")
    denied.__cause__ = PermissionError(13, "Permission denied")
    assert daemon_reason(denied, "unix:///s").startswith(
        "no permission to use the Docker daemon at unix:///s"
    )
    assert (
        daemon_reason(RuntimeError("boom"), "tcp://h:2375")
        == "Docker daemon at tcp://h:2375 not reachable: boom"
    )
