"""The line of a log tail that says why a server failed, for the reason of a failed start or exit.

"exited before becoming ready (exit code 1)" sends the user to the log; the log's last error
line usually says it all (issue 12): tritonserver's "error: creating server: ...", argparse's
"main.py: error: unrecognized arguments: --bogus", a Python traceback's final
"ValueError: ...". Pure: the caller passes the tail it already has.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MAX_LENGTH = 300

#: Strong signs, checked from the end: the last line matching one is the reason.
_ERROR = re.compile(
    r"""(^|[\s:\]])(error|fatal|critical|panic)\b[:\s]   # "error: ...", "E0101 ... ERROR ...", "FATAL:"
      | ^\w[\w.]*(Error|Exception|Exit|Interrupt)\b(:|$)  # a traceback's last line: "ValueError: ..."
      | \b(unrecognized|ambiguous)\ (arguments?|option)    # argparse
      | \bcannot\b|\bcould\ not\b|\bfailed\ to\b|\bno\ such\ file\b|\baddress\ already\ in\ use\b
      | \bis\ already\ in\ use\b|\bpermission\ denied\b|\bnot\ found\b|\bout\ of\ memory\b""",
    re.IGNORECASE | re.VERBOSE,
)
#: Lines that match but say nothing: shutdown chatter after the real error.
_NOISE = re.compile(
    r"^\s*(Traceback \(most recent call last\)|During handling of the above|The above exception)"
    r"|^\s*File \"|^\s*\^+\s*$|^\s*$",
    re.IGNORECASE,
)
#: Log prefixes (timestamps, levels, glog's "E1012 12:00:00.123 123 file.cc:12]") that are not the message.
_PREFIX = re.compile(r"^(\S+ )?\d{2}:\d{2}:\d{2}([.,]\d+)?\s+(\d+\s+\S+:\d+\]\s*)?")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _clean(line: str) -> str:
    line = _ANSI.sub("", line).strip()
    if len(line) > MAX_LENGTH:
        line = line[: MAX_LENGTH - 1] + "…"
    return line


def last_error_line(tail: Sequence[str]) -> str | None:
    """The last meaningful error line of `tail` (oldest first), cleaned of colour codes and
    cut to MAX_LENGTH; None when no line looks like an error (the caller keeps its generic
    reason)."""
    for raw in reversed(tail):
        line = _clean(raw)
        if not line or _NOISE.search(line):
            continue
        if _ERROR.search(_PREFIX.sub("", line)) or _ERROR.search(line):
            return line
    return None


def with_log_reason(reason: str, tail: Sequence[str]) -> str:
    """`reason` followed by the log's last error line, if there is one."""
    line = last_error_line(tail)
    return f"{reason}: {line}" if line else reason
