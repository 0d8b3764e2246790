"""The stray rules (pure), shared by this machine's GPU tracker and every node's view."""

from __future__ import annotations

import os
import pwd

from supervisor.adapters.procscan import user_of
from supervisor.core.strays import Stray, StrayRules


def test_policy_per_gpu_allow_lists_and_the_kill_delay() -> None:
    rules = StrayRules(
        default="report",
        per_gpu={3: "kill"},
        allow_names=frozenset({"Xorg"}),
        allow_users=frozenset({"render"}),
        kill_after=30.0,
    )
    assert (rules.policy(0), rules.policy(3)) == ("report", "kill")
    assert rules.allowed("/usr/lib/xorg/Xorg", None) and rules.allowed("python", "render")
    assert not rules.allowed("python", "alice") and not rules.allowed(None, None)
    young = Stray(pid=10, gpu=3, name="python", user="alice", memory_mib=100, first_seen=100.0)
    assert not rules.due(young, 129.9) and rules.due(young, 130.0)
    assert not rules.due(Stray(11, 0, "python", "alice", 100, 0.0), 1000.0)  # GPU 0 only reports
    assert not rules.due(Stray(12, 3, "Xorg", None, 100, 0.0, action="allowed"), 1000.0)


def test_the_user_of_a_process_is_its_real_user() -> None:
    assert user_of(os.getpid()) == pwd.getpwuid(os.getuid()).pw_name
    assert user_of(2**22 + 1) is None  # beyond pid_max: no such process
