"""`model-supervisor node`: join this machine to the cluster as a Ray worker.

Its per-GPU resources (`msup_gpu_<id>: 1`, the names `ClusterLaunch.resources()` requests) and
its `msup-node` label are derived here, from NVML or from `--gpus`/`--num-gpus`, so nobody
types resource JSON and a typo cannot make a GPU unschedulable.

The command then *becomes* `ray start --block` (exec): the pid a service manager or a test
holds is the Ray node's own, SIGTERM reaches it directly, and Ray (which `ray start --block`
runs with its shutdown hooks and reaper) stops the raylet and its agents. Ray is never
imported in this process: `--ray-python` (default this Python) runs `-m ray.scripts.scripts`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

from supervisor.config.cluster_launch import LABEL_KEY, gpu_resource
from supervisor.core.spec import NODE_LABEL_RE


class NodeError(Exception):
    """A bad option or an unreadable machine, said for the person at the terminal."""


@dataclass(frozen=True, slots=True)
class NodeJoin:
    address: str
    label: str | None
    gpus: tuple[int, ...]
    num_cpus: int | None = None
    node_ip_address: str | None = None

    def resources(self) -> dict[str, float]:
        return {gpu_resource(g): 1.0 for g in self.gpus}

    def argv(self, python: str) -> list[str]:
        argv = [
            python,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--address",
            self.address,
            "--block",
            "--num-gpus",
            str(len(self.gpus)),
            "--resources",
            json.dumps(self.resources(), sort_keys=True),
        ]
        if self.label is not None:
            argv += ["--labels", f"{LABEL_KEY}={self.label}"]
        if self.num_cpus is not None:
            argv += ["--num-cpus", str(self.num_cpus)]
        if self.node_ip_address is not None:
            argv += ["--node-ip-address", self.node_ip_address]
        return argv


def parse_gpus(text: str) -> tuple[int, ...]:
    """`--gpus 0,1` (or "" / "none" for a node without GPUs)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise NodeError(f"--gpus {text!r}: expected GPU ids separated by commas, e.g. 0,1") from None
    if any(g < 0 for g in ids) or len(set(ids)) != len(ids):
        raise NodeError(f"--gpus {text!r}: GPU ids must be distinct and not negative")
    return tuple(sorted(ids))


def detected_gpus() -> tuple[int, ...]:
    """This machine's GPU ids in NVML's order (PCI bus order, which is the CUDA_DEVICE_ORDER the
    backends get), through the same NVML code as the supervisor's GPU monitor."""
    from supervisor.adapters.gpu.sources import GpuUnavailable, NvmlSource

    source = NvmlSource()
    try:
        source.open()
    except GpuUnavailable as exc:
        raise NodeError(
            f"cannot read this machine's GPUs: {exc.reason}; pass --gpus 0,1 (the ids to offer) "
            "or --num-gpus 0 for a node without GPUs"
        ) from None
    try:
        return tuple(sorted(d.index for d in source.sample()))
    finally:
        source.close()


def plan_join(
    address: str,
    label: str | None,
    gpus: str | None,
    num_gpus: int | None,
    num_cpus: int | None = None,
    node_ip_address: str | None = None,
    detect: Callable[[], tuple[int, ...]] = detected_gpus,
) -> NodeJoin:
    """What to start, from the options: explicit `--gpus` wins; otherwise NVML's GPUs, of which
    `--num-gpus N` offers the first N (`--num-gpus 0`: none, and NVML is not asked)."""
    if not address.strip():
        raise NodeError("--address: the Ray head's address (HOST:PORT) is required")
    if label is not None and not NODE_LABEL_RE.match(label):
        raise NodeError(
            f"--label {label!r} is not a node label: use 1 to 32 lower-case letters, digits or '-', "
            "starting and ending with a letter or digit (declarations name it as node = ...)"
        )
    if gpus is not None and num_gpus is not None:
        raise NodeError("--gpus and --num-gpus: give one of them")
    if num_gpus is not None and num_gpus < 0:
        raise NodeError(f"--num-gpus {num_gpus}: must be 0 or more")
    if num_cpus is not None and num_cpus < 0:
        raise NodeError(f"--num-cpus {num_cpus}: must be 0 or more")
    if gpus is not None:
        ids = parse_gpus(gpus)
    elif num_gpus == 0:
        ids = ()
    else:
        ids = detect()
        if num_gpus is not None:
            if num_gpus > len(ids):
                raise NodeError(f"--num-gpus {num_gpus}: NVML reports {len(ids)} GPU(s) on this machine")
            ids = ids[:num_gpus]
    return NodeJoin(address.strip(), label, ids, num_cpus, node_ip_address)


def run(args: argparse.Namespace) -> int:
    try:
        join = plan_join(
            args.address, args.label, args.gpus, args.num_gpus, args.num_cpus, args.node_ip_address
        )
    except NodeError as exc:
        print(f"model-supervisor node: {exc}", file=sys.stderr)
        return 2
    argv = join.argv(args.ray_python or sys.executable)
    gpus = ",".join(map(str, join.gpus)) or "none"
    print(
        f"model-supervisor node: joining {join.address} as {join.label or '(no label)'} with GPUs {gpus}",
        file=sys.stderr,
        flush=True,
    )
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        print(f"model-supervisor node: cannot run {argv[0]}: {exc}", file=sys.stderr)
        return 2
    return 0  # not reached
