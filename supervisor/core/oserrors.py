"""An OSError told as what it is: "no space left on device while writing state/ports.json".

Pure wording, shared by the writers of state/ (adapters.storage), the resolve that records
automatic ports (config.desired) and the API's 507/503 answers.
"""

from __future__ import annotations

import errno
from pathlib import Path

#: Errors that mean "no room": answered 507 Insufficient Storage. Others (a read-only file
#: system, permissions, I/O errors) are 503: the server cannot store anything right now.
FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
}


def is_full(exc: OSError) -> bool:
    return exc.errno in FULL


def describe(exc: OSError, path: Path | str | None = None, doing: str = "writing") -> str:
    """ "no space left on device while writing state/ports.json"."""
    cause = _CAUSES.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()
    where = path if path is not None else exc.filename
    return f"{cause} while {doing} {where}" if where is not None else f"{cause} while {doing}"
