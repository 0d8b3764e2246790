"""What to do with a stray GPU process (one no instance owns), on this machine or a node.

Pure: the settings' rules (`strays`, `strays_per_gpu`, `strays_allow_names`,
`strays_allow_users`, `strays_kill_after`) applied to what a sample showed. The GPU tracker
(this machine) and the cluster's node view (every node) keep their strays as `Stray` and ask
these rules; killing is theirs (here: kill.terminate; on a node: its agent).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Stray:
    pid: int
    gpu: int
    name: str | None
    user: str | None
    memory_mib: int | None
    first_seen: float
    action: str = "reported"  # "reported" | "allowed" | "killing" | "killed" | "kill refused" | "kill failed"


@dataclass(frozen=True)
class StrayRules:
    default: str = "report"  # "report" | "kill"
    per_gpu: dict[int, str] | None = None
    allow_names: frozenset[str] = frozenset()
    allow_users: frozenset[str] = frozenset()
    kill_after: float = 30.0

    @classmethod
    def from_settings(cls, s: Any) -> StrayRules:
        return cls(
            s.strays,
            dict(s.strays_per_gpu),
            frozenset(s.strays_allow_names),
            frozenset(s.strays_allow_users),
            s.strays_kill_after,
        )

    def policy(self, gpu: int) -> str:
        return (self.per_gpu or {}).get(gpu, self.default)

    def allowed(self, name: str | None, user: str | None) -> bool:
        """Allow-listed: never killed, whatever the policy."""
        return bool(
            (name and os.path.basename(name) in self.allow_names)
            or (user is not None and user in self.allow_users)
        )

    def due(self, stray: Stray, now: float) -> bool:
        """Kill it now: its GPU's policy says so and it has been seen for `kill_after` seconds."""
        return (
            self.policy(stray.gpu) == "kill"
            and stray.action == "reported"
            and now - stray.first_seen >= self.kill_after
        )
