"""Which option a command-line item really sets, read the way the server's own parser reads it.

A preset owns some flags (the port, the bind address, the GPUs). Comparing `extra_args` items
with those flags literally is not enough: argparse (`allow_abbrev`, on by default) and
getopt_long both accept any unambiguous prefix of a long option, so `--po 9999` is ComfyUI's
`--port` and `--http-p=18010` is tritonserver's `--http-port` (issue 12: both passed
`validate` and moved the server away from the port the supervisor probes). This module
emulates the two parsers' option lookup, pure and without the server installed: a preset
records its server's option list (`ParserSyntax`) and asks which items set an owned flag.

Where parser versions differ (argparse's single-dash prefix rule changed in Python 3.12), an
item is read as an option when any version would: refusing an item the server would reject
anyway costs nothing, missing one moves a port.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ParserSyntax:
    """How a server's own parser reads its command line."""

    #: "argparse": Python's argparse with allow_abbrev=True; "getopt": glibc getopt_long.
    style: Literal["argparse", "getopt"]
    #: Every long option the real parser knows, e.g. "--port".
    long_options: frozenset[str]
    #: Other spellings of a long option: short forms ("-p" -> "--port") and aliases
    #: ("-tp" -> "--tensor-parallel-size"). Keys are option strings the parser knows too.
    short_options: Mapping[str, str] = field(default_factory=dict)
    #: Where the option list came from, e.g. "ComfyUI a125cd84 comfy/cli_args.py".
    source: str = ""
    #: The parser reads `--a_b` as `--a-b` before parsing (vLLM's FlexibleArgumentParser).
    underscores_as_dashes: bool = False
    #: `--a.b value` sets a key of the JSON option `--a` (vLLM's FlexibleArgumentParser).
    dotted_keys: bool = False

    def canonical(self, option: str) -> str:
        return self.short_options.get(option, option)

    def all_option_strings(self) -> frozenset[str]:
        return self.long_options | frozenset(self.short_options)


@dataclass(frozen=True, slots=True)
class OptionUse:
    """One item of an argument list that the parser reads as an option."""

    index: int
    item: str
    option: str  # the canonical long option it sets, e.g. "--port"
    spelled: str  # the option string the parser matched, e.g. "--port" for "--po=1", "-p" for "-p1"
    #: The value attached to the item itself (`--port=1` -> "1", `-p1` -> "1"), else None.
    attached: str | None
    #: Whether the item is an abbreviation (a prefix of `spelled`), not the option itself.
    abbreviated: bool


@dataclass(frozen=True, slots=True)
class _Read:
    kind: Literal["positional", "option", "ambiguous", "unknown", "end"]
    spelled: str = ""
    attached: str | None = None
    matches: tuple[str, ...] = ()


def _pick(matches: Sequence[str], syntax: ParserSyntax, attached: str | None) -> _Read:
    """One parse of a prefix lookup: unique -> that option. Several option strings that all
    name the same option (an alias and its long form) are read as that option: some parser
    versions accept that, and refusing costs nothing when the others reject it."""
    if not matches:
        return _Read("unknown")
    if len({syntax.canonical(m) for m in matches}) == 1:
        return _Read("option", sorted(matches, key=len, reverse=True)[0], attached)
    return _Read("ambiguous", matches=tuple(sorted(matches)))


def _read_argparse(item: str, syntax: ParserSyntax) -> _Read:
    # Mirrors ArgumentParser._parse_optional / _get_option_tuples (CPython 3.11-3.13).
    options = syntax.all_option_strings()
    if not item or item[0] != "-":
        return _Read("positional")
    if item in options:
        return _Read("option", item)
    if len(item) == 1:
        return _Read("positional")
    head, sep, tail = item.partition("=")
    if sep and head in options:
        return _Read("option", head, tail)
    if item[1] == "-":
        # "--x" items are only split at "=", and any option string starting with the part
        # before it matches.
        return _pick([o for o in options if o.startswith(head)], syntax, tail if sep else None)
    # "-x...": the short option "-x" with the rest attached ("-p9999"), or a prefix of a
    # single-dash option string ("-t" for "-tp"; 3.12+ compares the part before "=").
    short, rest = item[:2], item[2:]
    matches = [o for o in options if o == short]
    attached: dict[str, str | None] = dict.fromkeys(matches, rest)
    for o in options:
        if o != short and o.startswith((item, head)):
            matches.append(o)
            attached[o] = tail if (sep and o.startswith(head) and not o.startswith(item)) else None
    read = _pick(matches, syntax, None)
    if read.kind == "option":
        return _Read("option", read.spelled, attached.get(read.spelled))
    if read.kind == "unknown" and (item.lstrip("-").replace(".", "", 1).isdigit() or " " in item):
        return _Read("positional")  # a negative number or a string with a space: a value
    return read


def _read_getopt(item: str, syntax: ParserSyntax) -> _Read:
    # Mirrors glibc's getopt_long (process_long_option): exact name first, else a unique prefix;
    # several prefix matches are ambiguous unless they are the same option.
    if item == "-" or not item.startswith("-"):
        return _Read("positional")
    if item.startswith("--"):
        head, sep, tail = item.partition("=")
        attached = tail if sep else None
        if head in syntax.long_options:
            return _Read("option", head, attached)
        if head == "--":
            return _Read("unknown")
        return _pick([o for o in syntax.long_options if o.startswith(head)], syntax, attached)
    # A short option, its value attached ("-p9999") or in the next item. Clusters of flags
    # ("-vp9999") are read by their first letter only: the option table does not say which
    # short options take no value.
    short = item[:2]
    if short in syntax.short_options:
        return _Read("option", short, item[2:] or None)
    return _Read("unknown")


def read_options(args: Sequence[str], syntax: ParserSyntax) -> list[OptionUse]:
    """Every item of `args` the parser reads as one of its options, in order. Items after a
    `--` are operands; unknown and ambiguous items are left out (the server rejects them)."""
    reader = _read_argparse if syntax.style == "argparse" else _read_getopt
    uses: list[OptionUse] = []
    for index, raw in enumerate(args):
        if raw == "--":
            break
        item = raw
        if item.startswith("--") and (syntax.underscores_as_dashes or syntax.dotted_keys):
            head, sep, tail = item.partition("=")
            name, dot, _keys = head.partition(".")
            if syntax.underscores_as_dashes:
                name = name.replace("_", "-")
            # `--a.b=v` is `--a` with a JSON value built from `b` and `v`: the option is `--a`.
            item = name + sep + tail if (dot and syntax.dotted_keys) else name + dot + _keys + sep + tail
        read = reader(item, syntax)
        if read.kind != "option":
            continue
        head = item.partition("=")[0] if read.attached is not None and "=" in item else item
        typed = head if read.spelled.startswith("--") or len(read.spelled) > 2 else read.spelled
        uses.append(
            OptionUse(
                index=index,
                item=raw,
                option=syntax.canonical(read.spelled),
                spelled=read.spelled,
                attached=read.attached,
                abbreviated=typed != read.spelled,
            )
        )
    return uses


def value_of(args: Sequence[str], use: OptionUse) -> str | None:
    """The value of an option that takes one: attached (`--x=v`, `-xv`) or the next item."""
    if use.attached is not None:
        return use.attached
    nxt = use.index + 1
    return args[nxt] if nxt < len(args) and args[nxt] != "--" else None


def owned_flag_errors(
    args: Sequence[str], owned: Iterable[str], syntax: ParserSyntax, key: str = "extra_args"
) -> list[str]:
    """Messages for every item of `args` that sets an owned flag in any spelling the parser accepts:
    exact, `--flag=value`, an unambiguous prefix (`--http-p=18010`, `--po 9999`), a short form
    (`-p`, `-p9999`), naming the item by index and the flag it abbreviates.

    `owned` lists long options; when it is a mapping (flag -> the declaration key that sets
    it) the message names that key too."""
    return [f"{key}[{index}] {message}" for index, message in owned_flag_findings(args, owned, syntax, key)]


def owned_flag_findings(
    args: Sequence[str], owned: Iterable[str], syntax: ParserSyntax, key: str = "extra_args"
) -> list[tuple[int, str]]:
    """`owned_flag_errors` as (index, message) pairs, the message without the `key[index]`
    prefix (for errors that carry the item's key themselves)."""
    sources = dict(owned) if isinstance(owned, Mapping) else dict.fromkeys(owned, "")
    found = []
    for use in read_options(args, syntax):
        if use.option not in sources:
            continue
        how = ""
        if use.abbreviated:
            how = f" (an abbreviation of {use.spelled} that the server accepts)"
        elif use.spelled != use.option:
            how = f" ({use.spelled} is {use.option})"
        origin = f" (from {sources[use.option]})" if sources[use.option] else ""
        found.append(
            (
                use.index,
                f"{use.item!r} sets {use.option}{how}: {use.option} is set by the "
                f"supervisor{origin}; remove it from {key}",
            )
        )
    return found
