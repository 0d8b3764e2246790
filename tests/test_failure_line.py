"""The log line a failure's reason quotes: real-looking tails of the servers the presets run."""

from __future__ import annotations

import pytest

from supervisor.core.failure_line import MAX_LENGTH, last_error_line, with_log_reason

TRITON = """\
I1012 10:00:00.100 1 pinned_memory_manager.cc:277] Pinned memory pool is created at '0x7f' with size 268435456
I1012 10:00:00.200 1 server.cc:631]
+---------+---------+--------+
| Model   | Version | Status |
+---------+---------+--------+
E1012 10:00:00.300 1 model_repository_manager.cc:1335] Poll failed for model directory 'add_one': failed to open text file for read /models/add_one/config.pbtxt: No such file or directory
I1012 10:00:00.400 1 server.cc:306] Waiting for in-flight requests to complete.
error: creating server: Internal - failed to load all models
""".splitlines()

ARGPARSE = """\
usage: main.py [-h] [--listen [IP]] [--port PORT] [--tls-keyfile TLS_KEYFILE]
               [--tls-certfile TLS_CERTFILE] [--enable-cors-header [ORIGIN]]
main.py: error: unrecognized arguments: --bogus 1
""".splitlines()

TRACEBACK = """\
Starting server
Traceback (most recent call last):
  File "/opt/ComfyUI/main.py", line 12, in <module>
    import torch
  File "/venv/lib/python3.11/site-packages/torch/__init__.py", line 290, in <module>
    from torch._C import *
    ^^^^^^^^^^^^^^^^^^^^^^
ImportError: libcudart.so.12: cannot open shared object file: No such file or directory
""".splitlines()

VLLM = """\
INFO 10-12 10:00:00 [api_server.py:1000] vLLM API server version 0.11.0
\x1b[1;31mERROR\x1b[0m 10-12 10:00:05 [core.py:700] EngineCore failed to start.
ValueError: Free memory on device (1.2/79.1 GiB) on startup is less than desired GPU memory utilization (0.9, 71.2 GiB).
INFO 10-12 10:00:06 [launcher.py:100] Shutting down FastAPI HTTP server.
""".splitlines()


@pytest.mark.parametrize(
    "tail,expected",
    [
        (TRITON, "error: creating server: Internal - failed to load all models"),
        (ARGPARSE, "main.py: error: unrecognized arguments: --bogus 1"),
        (
            TRACEBACK,
            "ImportError: libcudart.so.12: cannot open shared object file: No such file or directory",
        ),
        (
            VLLM,
            "ValueError: Free memory on device (1.2/79.1 GiB) on startup is less than desired GPU memory "
            "utilization (0.9, 71.2 GiB).",
        ),
        (
            ["Port 5000 is already in use. Using port 41234 instead."],
            "Port 5000 is already in use. Using port 41234 instead.",
        ),
    ],
    ids=["triton", "argparse", "traceback", "vllm-ansi", "textgen-port"],
)
def test_last_error_line_of_real_tails(tail: list[str], expected: str) -> None:
    assert last_error_line(tail) == expected


def test_nothing_that_looks_like_an_error() -> None:
    tail = ["Starting server", "To see the GUI go to: http://127.0.0.1:8188", ""]
    assert last_error_line(tail) is None
    assert (
        with_log_reason("exited before becoming ready (exit code 1)", tail)
        == "exited before becoming ready (exit code 1)"
    )


def test_reason_carries_the_line_and_long_lines_are_cut() -> None:
    assert with_log_reason("exited (exit code 2)", ARGPARSE) == (
        "exited (exit code 2): main.py: error: unrecognized arguments: --bogus 1"
    )
    line = last_error_line(["error: " + "x" * 1000])
    assert line is not None and len(line) == MAX_LENGTH and line.endswith("…")
