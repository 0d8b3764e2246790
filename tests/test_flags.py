"""The owned-flag reader: which option an `extra_args` item really sets, as argparse
(allow_abbrev) and getopt_long read it. Pure: no server, no process.

Besides hand-picked cases, each style is checked against a real parser over a corpus of
spellings: Python's own argparse, and Python's getopt.gnu_getopt (which implements GNU
getopt_long's long-option lookup: exact name, else a unique prefix).
"""

from __future__ import annotations

import argparse
import getopt
import itertools

import pytest

from supervisor.backends.flags import (
    ParserSyntax,
    owned_flag_errors,
    owned_flag_findings,
    read_options,
    value_of,
)

COMFY_LIKE = ParserSyntax(
    "argparse",
    frozenset(
        {
            "--listen",
            "--port",
            "--cuda-device",
            "--cuda-malloc",
            "--cpu",
            "--cpu-vae",
            "--verbose",
            "--tls-keyfile",
            "--tls-certfile",
            "--preview-size",
            "--base-directory",
        }
    ),
    source="test",
)
VLLM_LIKE = ParserSyntax(
    "argparse",
    frozenset(
        {
            "--host",
            "--port",
            "--tensor-parallel-size",
            "--pipeline-parallel-size",
            "--model",
            "--max-model-len",
            "--quantization",
        }
    ),
    {"-tp": "--tensor-parallel-size", "-pp": "--pipeline-parallel-size", "-q": "--quantization"},
    underscores_as_dashes=True,
)
TRITON_LIKE = ParserSyntax(
    "getopt",
    frozenset(
        {
            "--http-port",
            "--http-address",
            "--grpc-port",
            "--metrics-port",
            "--allow-http",
            "--allow-grpc",
            "--model-repository",
            "--model-control-mode",
            "--load-model",
            "--log-verbose",
            "--log",
            "--log-file",  # not tritonserver's: an exact name that is a prefix of another
        }
    ),
    {"-v": "--log-verbose"},
)

COMFY_OWNED = {"--listen": "listen", "--port": "port", "--cuda-device": "gpus"}


def sets(args: list[str], syntax: ParserSyntax) -> list[tuple[int, str]]:
    return [(u.index, u.option) for u in read_options(args, syntax)]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--port", "9999"], [(0, "--port")]),
        (["--port=9999"], [(0, "--port")]),
        (["--po", "9999"], [(0, "--port")]),
        (["--po=9999"], [(0, "--port")]),
        (["--list", "0.0.0.0"], [(0, "--listen")]),
        (["--l"], [(0, "--listen")]),
        (["--cuda-dev", "1"], [(0, "--cuda-device")]),
        (["--cuda-d=1"], [(0, "--cuda-device")]),
        # --cpu is exact: an exact match wins over --cpu-vae sharing its prefix.
        (["--cpu"], [(0, "--cpu")]),
        (["--cpu-"], [(0, "--cpu-vae")]),
        # Ambiguous prefixes are the server's own error, not an owned flag.
        (["--cuda", "1"], []),
        (["--c"], []),
        (["--p"], []),
        # Values are not options; `--` ends the options.
        (["--verbose", "DEBUG", "0.0.0.0"], [(0, "--verbose")]),
        (["--", "--port", "1"], []),
        (["--cpu", "--", "--port"], [(0, "--cpu")]),
        # A single dash is no abbreviation of a double-dash option.
        (["-port", "1"], []),
        (["-p", "1"], []),
        (["-1"], []),
        ([""], []),
        (["-"], []),
        (["--nosuch"], []),
    ],
)
def test_argparse_reading(args: list[str], expected: list[tuple[int, str]]) -> None:
    assert sets(args, COMFY_LIKE) == expected


@pytest.mark.parametrize(
    "args,expected",
    [
        (["-tp", "2"], [(0, "--tensor-parallel-size")]),
        (["-tp=2"], [(0, "--tensor-parallel-size")]),
        # `-t` is a prefix of the single-dash option -tp: argparse reads it as -tp.
        (["-t", "2"], [(0, "--tensor-parallel-size")]),
        (["-q", "awq"], [(0, "--quantization")]),
        (["-qawq"], [(0, "--quantization")]),
        (["--tensor_parallel_size", "2"], [(0, "--tensor-parallel-size")]),
        (["--tensor_par=2"], [(0, "--tensor-parallel-size")]),
        (["--tensor-parallel", "4"], [(0, "--tensor-parallel-size")]),
        (["--hos", "0.0.0.0"], [(0, "--host")]),
        (["--por", "9999"], [(0, "--port")]),
        (["--max-model-len", "8192"], [(0, "--max-model-len")]),
        (["--m", "x"], []),  # --model / --max-model-len: ambiguous
        (["-p", "2"], [(0, "--pipeline-parallel-size")]),  # "-p" is a prefix of -pp alone
    ],
)
def test_argparse_short_forms_and_underscores(args: list[str], expected: list[tuple[int, str]]) -> None:
    assert sets(args, VLLM_LIKE) == expected


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--http-port=18010"], [(0, "--http-port")]),
        (["--http-p=18010"], [(0, "--http-port")]),
        (["--http-p", "18010"], [(0, "--http-port")]),
        (["--http", "1"], []),  # --http-port / --http-address: ambiguous
        (["--allow-h=false"], [(0, "--allow-http")]),
        (["--model-r", "/x"], [(0, "--model-repository")]),
        (["--model", "/x"], []),  # --model-repository / --model-control-mode: ambiguous
        (["-v"], [(0, "--log-verbose")]),
        (["-v1"], [(0, "--log-verbose")]),
        (["-x"], []),
        (["--log", "1"], [(0, "--log")]),  # exact wins over --log-file / --log-verbose
        (["--log-f=x"], [(0, "--log-file")]),
        (["--", "--http-port=1"], []),
    ],
)
def test_getopt_reading(args: list[str], expected: list[tuple[int, str]]) -> None:
    assert sets(args, TRITON_LIKE) == expected


def test_messages_name_item_index_and_flag() -> None:
    args = ["--lowvram", "--list", "0.0.0.0", "--po", "9999", "--cuda-dev", "1", "--port=1"]
    assert owned_flag_errors(args, COMFY_OWNED, COMFY_LIKE) == [
        "extra_args[1] '--list' sets --listen (an abbreviation of --listen that the server accepts): "
        "--listen is set by the supervisor (from listen); remove it from extra_args",
        "extra_args[3] '--po' sets --port (an abbreviation of --port that the server accepts): "
        "--port is set by the supervisor (from port); remove it from extra_args",
        "extra_args[5] '--cuda-dev' sets --cuda-device (an abbreviation of --cuda-device that the server "
        "accepts): --cuda-device is set by the supervisor (from gpus); remove it from extra_args",
        "extra_args[7] '--port=1' sets --port: --port is set by the supervisor (from port); remove it from extra_args",
    ]
    assert [i for i, _ in owned_flag_findings(args, COMFY_OWNED, COMFY_LIKE)] == [1, 3, 5, 7]


def test_messages_for_short_forms_and_plain_owned_lists() -> None:
    (message,) = owned_flag_errors(
        ["--dtype", "half", "-tp", "2"], ["--tensor-parallel-size"], VLLM_LIKE, key="args"
    )
    assert message == (
        "args[2] '-tp' sets --tensor-parallel-size (-tp is --tensor-parallel-size): "
        "--tensor-parallel-size is set by the supervisor; remove it from args"
    )
    (message,) = owned_flag_errors(["--http-p=18010"], {"--http-port": "port"}, TRITON_LIKE)
    assert message.startswith(
        "extra_args[0] '--http-p=18010' sets --http-port (an abbreviation of --http-port"
    )


def test_ambiguous_and_unknown_items_are_not_refused() -> None:
    assert owned_flag_errors(["--c", "1", "--nosuch", "--cuda", "0"], COMFY_OWNED, COMFY_LIKE) == []


def test_value_of_attached_and_separate() -> None:
    args = ["--tls-k=/k.pem", "--tls-certfile", "/c.pem", "--cpu"]
    uses = read_options(args, COMFY_LIKE)
    assert [(u.option, value_of(args, u)) for u in uses] == [
        ("--tls-keyfile", "/k.pem"),
        ("--tls-certfile", "/c.pem"),
        ("--cpu", None),
    ]
    (use,) = read_options(["-qawq"], VLLM_LIKE)
    assert use.attached == "awq" and not use.abbreviated


# --- differential checks against real parsers ------------------------------------------------


def _corpus(syntax: ParserSyntax) -> list[str]:
    """Every prefix of every option string, with and without "=v" / an attached value, plus
    noise (values, negative numbers, single dashes, spaces)."""
    items = {"", "-", "--", "-1", "-.5", "x", "a b", "-a b", "--=x", "--nosuch", "-Z"}
    for option in syntax.all_option_strings():
        for end in range(1, len(option) + 1):
            prefix = option[:end]
            items |= {prefix, prefix + "=v", prefix + "7", prefix.replace("-", "_", 3)}
    return sorted(items)


def _argparse_reads(item: str, syntax: ParserSyntax) -> str | None:
    """Which option real argparse (this Python) sets for `item` alone; None if none."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=True)
    dests: dict[str, str] = {}
    for long in sorted(syntax.long_options):
        aliases = [s for s, target in syntax.short_options.items() if target == long]
        dest = "d" + str(len(dests))
        dests[dest] = long
        parser.add_argument(long, *aliases, dest=dest, nargs="?", const="SET")
    try:
        namespace, _rest = parser.parse_known_args([item])
    except SystemExit:  # ambiguous: argparse exits with an error
        return None
    found = [dests[d] for d, v in vars(namespace).items() if v is not None]
    assert len(found) <= 1
    return found[0] if found else None


@pytest.mark.parametrize("syntax", [COMFY_LIKE, VLLM_LIKE], ids=["comfy-like", "vllm-like"])
def test_argparse_emulation_matches_real_argparse(
    syntax: ParserSyntax, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = ParserSyntax("argparse", syntax.long_options, syntax.short_options)  # no vLLM preprocessing
    checked = 0
    for item in _corpus(syntax):
        ours = [u.option for u in read_options([item], plain)]
        real = _argparse_reads(item, syntax)
        if real is not None:
            assert ours == [real], item  # never miss what the real parser sets
        elif ours:
            # The one deliberate difference: Python 3.12+ match "-t=v" against "-tp" by the part
            # before "=", 3.11 does not; we refuse what any version accepts.
            assert item.startswith("-") and not item.startswith("--") and "=" in item, (item, ours)
        checked += 1
    capsys.readouterr()
    assert checked > 100


def test_getopt_long_emulation_matches_gnu_getopt() -> None:
    longs = [o[2:] + "=" for o in sorted(TRITON_LIKE.long_options)]
    shorts = "".join(s[1] + ":" for s in TRITON_LIKE.short_options)
    for item in _corpus(TRITON_LIKE):
        ours = [u.option for u in read_options([item, "value"], TRITON_LIKE)]
        try:
            opts, _rest = getopt.gnu_getopt([item, "value"], shorts, longs)
        except getopt.GetoptError:
            opts = []
        real = [TRITON_LIKE.canonical(name) if not name.startswith("--") else name for name, _v in opts]
        if (
            item.startswith("-")
            and not item.startswith("--")
            and len(item) > 1
            and item[:2] not in TRITON_LIKE.short_options
        ):
            real = []  # an unknown short option: gnu_getopt raises, like getopt_long's error
        assert ours == real, item


def test_corpus_covers_every_prefix() -> None:
    corpus = set(_corpus(TRITON_LIKE))
    assert all(o[:n] in corpus for o, n in itertools.product(TRITON_LIKE.long_options, range(3, 8)))
