"""Prometheus metrics: instances, GPUs and the supervisor itself, in the text exposition format.

Everything is read at scrape time from what the engine and the GPU tracker already hold (the
last GPU sample, the instances' own counters): a scrape never calls NVML or scans /proc. All is
rendered here, the one histogram too: prometheus-client costs 7 MiB of RSS to import, for a
format of a few lines (tests parse our output with its parser).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from supervisor.core.states import State

PREFIX = "model_supervisor"
MIB = 1024 * 1024
INSTANCE_LABELS = ["model", "instance", "backend", "gpu", "node"]  # node: "" on this machine
GPU_LABELS = ["gpu", "uuid", "name"]


#: The exposition format's content type (what prometheus-client's CONTENT_TYPE_LATEST says).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """A Prometheus histogram: cumulative buckets, a sum and a count."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.bounds = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append(f'{self.name}_bucket{{le="{le}"}} {float(total)}')
        out += [f"{self.name}_count {float(total)}", f"{self.name}_sum {self.sum!r}"]
        return out


class Metrics:
    """The few metrics that are observed as things happen, and the renderer of the rest."""

    def __init__(self) -> None:
        self.reconcile_seconds = Histogram(
            f"{PREFIX}_reconcile_duration_seconds",
            "Time to re-read conf.d/ and settle it against what runs",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.requests: Counter[tuple[str, str, str]] = Counter()  # (route, method, status) -> count
        self._engine: Any = None
        self._gpus: Any = None

    def attach(self, engine: Any, gpus: Any) -> None:
        self._engine, self._gpus = engine, gpus
        self._collector = _Collector(self)

    def count_request(self, route: str, method: str, status: int) -> None:
        self.requests[(route, method, str(status))] += 1

    def render(self) -> bytes:
        """The high-cardinality families, then the histogram."""
        return (self._collector.render_text() + "\n".join(self.reconcile_seconds.lines()) + "\n").encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: list[str], values: list[str]) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=False))


def _num(value: float) -> str:
    return repr(float(value)) if value == value else "NaN"


class _Family:
    """Lines of one metric family in the Prometheus text format (0.0.4, which 1.0.0 accepts)."""

    def __init__(self, name: str, kind: str, help: str) -> None:
        self.lines = [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        self.name = name

    def add(self, labels: str, value: float, suffix: str = "") -> None:
        self.lines.append(
            f"{self.name}{suffix}{{{labels}}} {_num(value)}"
            if labels
            else f"{self.name}{suffix} {_num(value)}"
        )


class _Collector:
    """The high-cardinality families, rendered by hand: prometheus-client's generic exposition
    costs tens of microseconds a sample, and 200 instances make thousands of samples (see
    bench/metrics_bench.py). Label strings are escaped once per instance and kept."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self._label_cache: dict[Any, tuple[Any, str, str]] = {}

    def render_text(self) -> str:
        families = [*self._instances(), *self._gpus(), *self._supervisor()]
        return "\n".join(line for f in families for line in f.lines) + "\n"

    def _instance_labels(self, inst: Any) -> str:
        spec = inst.effective_spec
        node = inst.node or ""
        cached = self._label_cache.get(inst)
        if cached is None or cached[0] is not spec or cached[1] != node:
            text = _labels(
                INSTANCE_LABELS,
                [spec.model, spec.id, spec.backend, ",".join(str(g) for g in spec.gpus), node],
            )
            cached = (spec, node, text)
            self._label_cache[inst] = cached
        return cached[2]

    def _instances(self) -> list[_Family]:
        engine = self.m._engine
        state = _Family(f"{PREFIX}_instance_state", "gauge", "The instance's state: 1 for the current one")
        restarts = _Family(
            f"{PREFIX}_instance_restarts_total",
            "counter",
            "Automatic restarts since the instance was created",
        )
        adoptions = _Family(
            f"{PREFIX}_instance_adoptions_total",
            "counter",
            "Runs of an earlier supervisor this one adopted instead of starting anew",
        )
        failures = _Family(
            f"{PREFIX}_instance_consecutive_failures", "gauge", "Failed starts or early exits in a row"
        )
        uptime = _Family(f"{PREFIX}_instance_uptime_seconds", "gauge", "Seconds RUNNING (0 when not running)")
        ready = _Family(f"{PREFIX}_instance_ready", "gauge", "1 when RUNNING (its health check passes)")
        exit_code = _Family(
            f"{PREFIX}_instance_last_exit_code",
            "gauge",
            "Exit code of the last run; 128 + n when killed by signal n",
        )
        gpu_mem = _Family(
            f"{PREFIX}_instance_gpu_memory_bytes", "gauge", "GPU memory used by the instance's processes"
        )
        usage = self.m._gpus.memory_by_instance()
        now = time.monotonic()
        states = [s.value for s in State]
        live = set()
        for iid in sorted(engine.instances):
            inst = engine.instances[iid]
            live.add(inst)
            labels = self._instance_labels(inst)
            current = inst.state.value
            for name in states:
                state.add(f'{labels},state="{name}"', 1.0 if name == current else 0.0)
            restarts.add(labels, inst.restarts)
            adoptions.add(labels, inst.adoptions)
            failures.add(labels, inst.failures)
            running = inst.state == State.RUNNING and inst.ready_monotonic is not None
            uptime.add(labels, now - inst.ready_monotonic if running else 0.0)
            ready.add(labels, 1.0 if inst.state == State.RUNNING else 0.0)
            last = inst.last_exit
            if last is not None and (last.code is not None or last.signal is not None):
                exit_code.add(labels, last.code if last.code is not None else 128 + last.signal)
            gpu_mem.add(labels, usage.get(iid, 0) * MIB)
        if len(self._label_cache) > 2 * len(live) + 64:
            self._label_cache = {k: v for k, v in self._label_cache.items() if k in live}
        return [state, restarts, adoptions, failures, uptime, ready, exit_code, gpu_mem]

    def _gpus(self) -> list[_Family]:
        tracker = self.m._gpus
        snap = tracker.attributed_view()
        used = _Family(f"{PREFIX}_gpu_memory_used_bytes", "gauge", "GPU memory in use")
        total = _Family(f"{PREFIX}_gpu_memory_total_bytes", "gauge", "GPU memory in all")
        util = _Family(f"{PREFIX}_gpu_utilization_ratio", "gauge", "GPU utilisation (0-1)")
        power = _Family(f"{PREFIX}_gpu_power_watts", "gauge", "GPU power draw")
        temp = _Family(f"{PREFIX}_gpu_temperature_celsius", "gauge", "GPU temperature")
        procs = _Family(f"{PREFIX}_gpu_processes", "gauge", "Processes on the GPU")
        strays = _Family(f"{PREFIX}_gpu_stray_processes", "gauge", "GPU processes that belong to no instance")
        nodes = tracker.cluster_nodes
        # Cluster mode: every node's GPUs too, each with its `node` label ("" for this machine's).
        where = [("", snap, Counter(gpu for gpu, _pid in tracker.stray_list))]
        if nodes is not None:
            where += [
                (label, sample.snapshot, Counter(s["gpu"] for s in nodes.strays() if s["node"] == label))
                for label, sample in sorted(nodes.samples.items())
            ]
        for node, view, stray_count in where:
            self._gpu_rows(
                view,
                node if nodes is not None else None,
                stray_count,
                used,
                total,
                util,
                power,
                temp,
                procs,
                strays,
            )
        sample = _Family(f"{PREFIX}_gpu_sample_seconds", "gauge", "CPU time the last GPU sample took")
        if snap.sample_seconds is not None:
            sample.add(_labels(["source"], [snap.source]), snap.sample_seconds)
        return [used, total, util, power, temp, procs, strays, sample]

    @staticmethod
    def _gpu_rows(
        snap: Any,
        node: str | None,
        stray_count: Counter[int],
        used: _Family,
        total: _Family,
        util: _Family,
        power: _Family,
        temp: _Family,
        procs: _Family,
        strays: _Family,
    ) -> None:
        for d in snap.devices:
            values = [str(d.index), d.uuid or "", d.name or ""]
            labels = (
                _labels(GPU_LABELS, values)
                if node is None
                else _labels([*GPU_LABELS, "node"], [*values, node])
            )
            if d.memory_used_mib is not None:
                used.add(labels, d.memory_used_mib * MIB)
            if d.memory_total_mib is not None:
                total.add(labels, d.memory_total_mib * MIB)
            if d.utilization_percent is not None:
                util.add(labels, d.utilization_percent / 100.0)
            if d.power_draw_w is not None:
                power.add(labels, d.power_draw_w)
            if d.temperature_c is not None:
                temp.add(labels, d.temperature_c)
            procs.add(labels, len(d.processes))
            strays.add(labels, stray_count.get(d.index, 0))

    def _supervisor(self) -> list[_Family]:
        engine = self.m._engine
        errors = engine.catalog.errors
        files = _Family(f"{PREFIX}_config_error_files", "gauge", "Declaration files that do not load")
        files.add("", len(errors))
        count = _Family(f"{PREFIX}_config_errors", "gauge", "Errors in declaration files")
        count.add("", sum(len(e) for e in errors.values()))
        reloads = _Family(f"{PREFIX}_reconciles_total", "counter", "Re-reads of conf.d/ that were settled")
        reloads.add("", engine.reload_count)
        requests = _Family(
            f"{PREFIX}_api_requests_total", "counter", "API requests by route, method and status"
        )
        for (route, method, status), n in sorted(self.m.requests.items()):
            requests.add(_labels(["route", "method", "status"], [route, method, status]), n)
        return [files, count, reloads, requests]
