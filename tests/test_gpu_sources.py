"""GPU sources and the sampler thread.

NVML is faked at the lowest seam: `FakeNvml` stands in for the `pynvml` module (same function
names) and raises the *real* exception classes from nvidia-ml-py, so the error handling under
test is the one that meets real drivers. The simulated source and the monitor run for real,
with real child processes and a real file.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml as real_nvml
import pytest
import tomli_w

from supervisor.adapters.gpu import (
    GpuDevice,
    GpuMonitor,
    GpuMonitorStopped,
    GpuProcess,
    GpuSnapshot,
    GpuSource,
    GpuUnavailable,
    NoGpuSource,
    NvmlSource,
    SimulatedSource,
    open_source,
)

MIB = 1024**2
E = real_nvml  # error codes: E.NVML_ERROR_...

# ------------------------------------------------------------------------------------------
# A scripted pynvml


Failure = int | Callable[[], BaseException]  # an NVML error code, or a factory of any exception


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total_mib: int = 81559
    used_mib: int = 1024
    power_mw: int = 71_500
    limit_mw: int = 700_000
    util_gpu: int = 5
    util_mem: int = 2
    temp_c: int = 31
    compute: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, usedGpuMemory bytes)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)
    fail: dict[str, Failure] = field(default_factory=dict)  # function name -> failure, on this GPU


def _raise(spec: Failure | None) -> None:
    if spec is None:
        return
    raise real_nvml.NVMLError(spec) if isinstance(spec, int) else spec()


def _procs(entries: list[tuple[int, int | None]]) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(pid=pid, usedGpuMemory=used, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
        for pid, used in entries
    ]


def _mismatch() -> BaseException:
    # What the binding's throwOnVersionMismatch raises for a driver without the _v3 symbol.
    return real_nvml.NVMLLibraryMismatchError(
        "Unversioned function called and the pyNVML version does not match"
    )


class FakeNvml:
    NVMLError = real_nvml.NVMLError
    NVMLLibraryMismatchError = real_nvml.NVMLLibraryMismatchError
    NVML_TEMPERATURE_GPU = real_nvml.NVML_TEMPERATURE_GPU

    def __init__(
        self,
        *gpus: FakeGpu,
        fail: dict[str, Failure] | None = None,
        missing: tuple[str, ...] = (),
        names: dict[int, str] | None = None,
    ) -> None:
        self.gpus = list(gpus)
        self.fail = dict(fail or {})  # module-wide functions (init, count, process names)
        self.missing = set(missing)  # attributes this "binding" does not have
        self.names = dict(names or {})
        self.calls: list[tuple[str, str | None]] = []
        self.refcount = 0

    def __getattribute__(self, name: str) -> Any:
        if name in object.__getattribute__(self, "missing"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    def count(self, fn: str, uuid: str | None = None) -> int:
        return sum(1 for f, u in self.calls if f == fn and (uuid is None or u == uuid))

    def _hit(self, fn: str, gpu: FakeGpu | None = None) -> None:
        self.calls.append((fn, gpu.uuid if gpu else None))
        _raise((gpu.fail if gpu else self.fail).get(fn))

    def nvmlInit(self) -> None:
        self._hit("nvmlInit")
        self.refcount += 1

    def nvmlShutdown(self) -> None:
        self._hit("nvmlShutdown")
        self.refcount -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._hit("nvmlSystemGetDriverVersion")
        return "550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        self._hit("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        gpu = self.gpus[index]
        self._hit("nvmlDeviceGetHandleByIndex", gpu)
        return gpu  # the handle is opaque to the code under test

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str:
        self._hit("nvmlDeviceGetUUID", h)
        return h.uuid

    def nvmlDeviceGetName(self, h: FakeGpu) -> str:
        self._hit("nvmlDeviceGetName", h)
        return h.name

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> SimpleNamespace:
        self._hit("nvmlDeviceGetMemoryInfo", h)
        return SimpleNamespace(
            total=h.total_mib * MIB, used=h.used_mib * MIB + 5, free=(h.total_mib - h.used_mib) * MIB
        )

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        self._hit("nvmlDeviceGetPowerUsage", h)
        return h.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeGpu) -> int:
        self._hit("nvmlDeviceGetEnforcedPowerLimit", h)
        return h.limit_mw

    def nvmlDeviceGetPowerManagementLimit(self, h: FakeGpu) -> int:
        self._hit("nvmlDeviceGetPowerManagementLimit", h)
        return h.limit_mw - 1000  # distinguishable from the enforced limit

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> SimpleNamespace:
        self._hit("nvmlDeviceGetUtilizationRates", h)
        return SimpleNamespace(gpu=h.util_gpu, memory=h.util_mem)

    def nvmlDeviceGetTemperatureV(self, h: FakeGpu, sensor: int) -> int:
        self._hit("nvmlDeviceGetTemperatureV", h)
        assert sensor == real_nvml.NVML_TEMPERATURE_GPU
        return h.temp_c

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        self._hit("nvmlDeviceGetTemperature", h)
        assert sensor == real_nvml.NVML_TEMPERATURE_GPU
        return h.temp_c + 100  # distinguishable from the V call

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGpu) -> list[SimpleNamespace]:
        self._hit("nvmlDeviceGetComputeRunningProcesses", h)
        return _procs(h.compute)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, h: FakeGpu) -> list[SimpleNamespace]:
        self._hit("nvmlDeviceGetComputeRunningProcesses_v2", h)
        return _procs(h.compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: FakeGpu) -> list[SimpleNamespace]:
        self._hit("nvmlDeviceGetGraphicsRunningProcesses", h)
        return _procs(h.graphics)

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, h: FakeGpu) -> list[SimpleNamespace]:
        self._hit("nvmlDeviceGetGraphicsRunningProcesses_v2", h)
        return _procs(h.graphics)

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        self._hit("nvmlSystemGetProcessName")
        if pid not in self.names:
            raise real_nvml.NVMLError(E.NVML_ERROR_NOT_FOUND)
        return self.names[pid]


def opened(fake: FakeNvml) -> NvmlSource:
    source = NvmlSource(nvml=fake)
    source.open()
    return source


def only(devices: tuple[GpuDevice, ...], index: int = 0) -> GpuDevice:
    [dev] = [d for d in devices if d.index == index]
    return dev


# ------------------------------------------------------------------------------------------
# NvmlSource against the fake


def test_fake_raises_the_real_exception_classes() -> None:
    # The premise of every test below: NVMLError(code) builds the real subclass.
    with pytest.raises(real_nvml.NVMLError_GpuIsLost):
        _raise(E.NVML_ERROR_GPU_IS_LOST)


def test_full_sample_converts_units_and_reads_static_facts_once() -> None:
    fake = FakeNvml(
        FakeGpu("GPU-aaa", compute=[(101, 3 * MIB), (102, 1536 * MIB)]),
        FakeGpu(
            "GPU-bbb",
            name="NVIDIA A100-SXM4-40GB",
            total_mib=40960,
            used_mib=0,
            power_mw=55_250,
            limit_mw=400_000,
            util_gpu=0,
            util_mem=0,
            temp_c=28,
        ),
        names={101: "python3", 102: "tritonserver"},
    )
    source = opened(fake)
    assert isinstance(source, GpuSource)
    assert source.driver_version == "550.54.15"
    assert source.reason is None
    first = source.sample()
    second = source.sample()
    assert first == second
    gpu0, gpu1 = first
    assert gpu0 == GpuDevice(
        index=0,
        uuid="GPU-aaa",
        name="NVIDIA H100 80GB HBM3",
        memory_total_mib=81559,
        memory_used_mib=1024,
        power_draw_w=71.5,
        power_limit_w=700.0,
        utilization_percent=5.0,
        memory_utilization_percent=2.0,
        temperature_c=31.0,
        processes=(
            GpuProcess(101, "python3", 3, "compute"),
            GpuProcess(102, "tritonserver", 1536, "compute"),
        ),
        errors={},
    )
    assert (gpu1.index, gpu1.uuid, gpu1.name, gpu1.memory_total_mib) == (
        1,
        "GPU-bbb",
        "NVIDIA A100-SXM4-40GB",
        40960,
    )
    assert (gpu1.power_draw_w, gpu1.power_limit_w, gpu1.temperature_c, gpu1.processes) == (
        55.25,
        400.0,
        28.0,
        (),
    )
    # Static facts at open only; dynamic ones on every sample.
    assert fake.count("nvmlInit") == 1
    assert fake.count("nvmlDeviceGetUUID") == 2 and fake.count("nvmlDeviceGetName") == 2
    assert fake.count("nvmlDeviceGetPowerUsage") == 4
    # Process names are cached while the pid stays on a GPU.
    assert fake.count("nvmlSystemGetProcessName") == 2
    source.close()


def test_close_shuts_nvml_down_once() -> None:
    fake = FakeNvml(FakeGpu("GPU-aaa"))
    source = opened(fake)
    source.open()  # idempotent: a second open must not init twice
    assert fake.refcount == 1
    source.close()
    source.close()
    assert fake.count("nvmlShutdown") == 1 and fake.refcount == 0
    with pytest.raises(RuntimeError):
        source.sample()


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (E.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML library not found (no NVIDIA driver installed?)"),
        (E.NVML_ERROR_DRIVER_NOT_LOADED, "driver is not loaded"),
        (E.NVML_ERROR_NO_PERMISSION, "no permission"),
        (E.NVML_ERROR_UNKNOWN, "NVML failed to initialise (Unknown"),
    ],
)
def test_init_failure_is_gpu_unavailable(code: int, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(FakeGpu("GPU-aaa"), fail={"nvmlInit": code})
    with pytest.raises(GpuUnavailable) as info:
        NvmlSource(nvml=fake).open()
    assert expected in info.value.reason
    assert fake.count("nvmlShutdown") == 0  # nothing to pair with

    # "auto" resolves `import pynvml` to the same scripted module and degrades to no GPUs.
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    source, reason = open_source("auto", None)
    assert isinstance(source, NoGpuSource)
    assert source.name == "none" and source.sample() == ()
    assert reason is not None and expected in reason and source.reason == reason

    source, reason = open_source("nvml", None)
    assert isinstance(source, NoGpuSource)
    assert reason is not None and "requested" in reason and expected in reason


def test_missing_binding_is_gpu_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(GpuUnavailable, match="nvidia-ml-py"):
        NvmlSource().open()
    source, reason = open_source("auto", None)
    assert source.name == "none" and reason and "nvidia-ml-py" in reason


def test_count_failure_shuts_down_and_is_unavailable() -> None:
    fake = FakeNvml(FakeGpu("GPU-aaa"), fail={"nvmlDeviceGetCount": E.NVML_ERROR_UNKNOWN})
    with pytest.raises(GpuUnavailable, match="could not count"):
        NvmlSource(nvml=fake).open()
    assert fake.refcount == 0


def test_no_gpus_is_a_reason() -> None:
    source = opened(FakeNvml())
    assert source.sample() == ()
    assert source.reason == "NVML reports no GPUs"


def test_power_not_supported_degrades_only_power() -> None:
    gpu = FakeGpu(
        "GPU-aaa",
        fail={
            "nvmlDeviceGetPowerUsage": E.NVML_ERROR_NOT_SUPPORTED,
            "nvmlDeviceGetEnforcedPowerLimit": E.NVML_ERROR_NOT_SUPPORTED,
        },
    )
    dev = only(opened(FakeNvml(gpu)).sample())
    assert dev.power_draw_w is None
    assert dev.errors == {"power_draw_w": "NotSupported"}
    assert dev.power_limit_w == 699.0  # from nvmlDeviceGetPowerManagementLimit
    assert dev.memory_used_mib == 1024 and dev.temperature_c == 31.0 and dev.utilization_percent == 5.0


def test_power_limit_fails_both_ways() -> None:
    gpu = FakeGpu(
        "GPU-aaa",
        fail={
            "nvmlDeviceGetEnforcedPowerLimit": E.NVML_ERROR_NOT_SUPPORTED,
            "nvmlDeviceGetPowerManagementLimit": E.NVML_ERROR_NOT_SUPPORTED,
        },
    )
    dev = only(opened(FakeNvml(gpu)).sample())
    assert dev.power_limit_w is None and dev.errors == {"power_limit_w": "NotSupported"}
    assert dev.power_draw_w == 71.5


def test_no_permission_on_processes() -> None:
    gpu = FakeGpu(
        "GPU-aaa",
        compute=[(101, MIB)],
        graphics=[(102, MIB)],
        fail={
            "nvmlDeviceGetComputeRunningProcesses": E.NVML_ERROR_NO_PERMISSION,
            "nvmlDeviceGetGraphicsRunningProcesses": E.NVML_ERROR_NO_PERMISSION,
        },
    )
    dev = only(opened(FakeNvml(gpu)).sample())
    assert dev.processes == ()
    assert dev.errors == {"processes": "NoPermission", "graphics_processes": "NoPermission"}
    assert dev.memory_used_mib == 1024 and dev.power_draw_w == 71.5


def test_graphics_not_supported_keeps_compute_list() -> None:
    gpu = FakeGpu(
        "GPU-aaa",
        compute=[(101, MIB)],
        fail={"nvmlDeviceGetGraphicsRunningProcesses": E.NVML_ERROR_NOT_SUPPORTED},
    )
    dev = only(opened(FakeNvml(gpu)).sample())
    assert [p.pid for p in dev.processes] == [101]
    assert dev.errors == {"graphics_processes": "NotSupported"}  # "processes" stays trustworthy


def test_gpu_lost_on_one_of_two() -> None:
    healthy = FakeGpu("GPU-aaa", compute=[(101, 2048 * MIB)])
    doomed = FakeGpu("GPU-bbb")
    fake = FakeNvml(healthy, doomed, names={101: "vllm"})
    source = opened(fake)
    doomed.fail = {name: E.NVML_ERROR_GPU_IS_LOST for name in dir(FakeNvml) if name.startswith("nvmlDevice")}
    before = len(fake.calls)
    gpu0, gpu1 = source.sample()
    assert gpu0.processes == (GpuProcess(101, "vllm", 2048, "compute"),)
    assert gpu0.errors == {} and gpu0.power_draw_w == 71.5 and gpu0.temperature_c == 31.0
    # The lost GPU keeps its static facts; every dynamic field says why it is missing.
    assert (gpu1.index, gpu1.uuid, gpu1.name, gpu1.memory_total_mib) == (
        1,
        "GPU-bbb",
        "NVIDIA H100 80GB HBM3",
        81559,
    )
    assert (
        gpu1.memory_used_mib,
        gpu1.power_draw_w,
        gpu1.power_limit_w,
        gpu1.utilization_percent,
        gpu1.memory_utilization_percent,
        gpu1.temperature_c,
        gpu1.processes,
    ) == (None,) * 6 + ((),)
    assert gpu1.errors == dict.fromkeys(
        [
            "memory_used_mib",
            "power_draw_w",
            "power_limit_w",
            "utilization_percent",
            "memory_utilization_percent",
            "temperature_c",
            "processes",
        ],
        "GpuIsLost",
    )
    # After the first GpuIsLost the sample stops calling into that GPU.
    assert sum(1 for _, uuid in fake.calls[before:] if uuid == "GPU-bbb") == 1


def test_gpu_lost_at_open_still_listed_and_retried() -> None:
    doomed = FakeGpu("GPU-bbb", fail={"nvmlDeviceGetHandleByIndex": E.NVML_ERROR_GPU_IS_LOST})
    fake = FakeNvml(FakeGpu("GPU-aaa"), doomed)
    source = opened(fake)
    gpu0, gpu1 = source.sample()
    assert gpu0.errors == {} and gpu0.uuid == "GPU-aaa"
    assert gpu1.index == 1 and gpu1.uuid is None and gpu1.memory_used_mib is None
    assert gpu1.errors["handle"] == "GpuIsLost" and gpu1.errors["processes"] == "GpuIsLost"
    doomed.fail = {}  # back after a reset
    gpu1 = source.sample()[1]
    assert gpu1.uuid == "GPU-bbb" and gpu1.errors == {} and gpu1.memory_used_mib == 1024


def test_static_field_failure_at_open() -> None:
    gpu = FakeGpu("GPU-aaa", fail={"nvmlDeviceGetName": E.NVML_ERROR_UNKNOWN})
    dev = only(opened(FakeNvml(gpu)).sample())
    assert dev.name is None and dev.errors == {"name": "Unknown"} and dev.uuid == "GPU-aaa"


def test_used_gpu_memory_not_available() -> None:
    gpu = FakeGpu("GPU-aaa", compute=[(101, None), (102, 5 * MIB)])
    dev = only(opened(FakeNvml(gpu, names={101: "a", 102: "b"})).sample())
    assert dev.processes == (GpuProcess(101, "a", None, "compute"), GpuProcess(102, "b", 5, "compute"))


def test_v3_process_call_mismatch_falls_back_to_v2() -> None:
    gpu = FakeGpu(
        "GPU-aaa",
        compute=[(101, MIB)],
        graphics=[(102, 2 * MIB)],
        fail={
            "nvmlDeviceGetComputeRunningProcesses": _mismatch,
            "nvmlDeviceGetGraphicsRunningProcesses": _mismatch,
        },
    )
    fake = FakeNvml(gpu, names={101: "a", 102: "b"})
    source = opened(fake)
    for _ in range(2):
        dev = only(source.sample())
        assert dev.errors == {}
        assert dev.processes == (GpuProcess(101, "a", 1, "compute"), GpuProcess(102, "b", 2, "graphics"))
    # The unversioned call is tried once; afterwards the _v2 one is used directly.
    assert fake.count("nvmlDeviceGetComputeRunningProcesses") == 1
    assert fake.count("nvmlDeviceGetComputeRunningProcesses_v2") == 2
    assert fake.count("nvmlDeviceGetGraphicsRunningProcesses_v2") == 2


def test_v3_mismatch_without_v2_is_recorded() -> None:
    gpu = FakeGpu("GPU-aaa", compute=[(101, MIB)], fail={"nvmlDeviceGetComputeRunningProcesses": _mismatch})
    fake = FakeNvml(gpu, missing=("nvmlDeviceGetComputeRunningProcesses_v2",))
    dev = only(opened(fake).sample())
    assert dev.processes == () and dev.errors == {"processes": "LibraryMismatch"}


@pytest.mark.parametrize("how", ["function-not-found", "attribute-missing"])
def test_temperature_falls_back_to_deprecated_call(how: str) -> None:
    gpu = FakeGpu("GPU-aaa", temp_c=40)
    if how == "function-not-found":
        gpu.fail["nvmlDeviceGetTemperatureV"] = E.NVML_ERROR_FUNCTION_NOT_FOUND
        fake = FakeNvml(gpu, FakeGpu("GPU-bbb", temp_c=41))
    else:
        fake = FakeNvml(gpu, FakeGpu("GPU-bbb", temp_c=41), missing=("nvmlDeviceGetTemperatureV",))
    source = opened(fake)
    assert [d.temperature_c for d in source.sample()] == [140.0, 141.0]
    assert [d.temperature_c for d in source.sample()] == [140.0, 141.0]
    assert all(not d.errors for d in source.sample())
    assert fake.count("nvmlDeviceGetTemperatureV") == (1 if how == "function-not-found" else 0)


def test_temperature_other_errors_are_not_a_fallback() -> None:
    gpu = FakeGpu("GPU-aaa", fail={"nvmlDeviceGetTemperatureV": E.NVML_ERROR_NOT_SUPPORTED})
    fake = FakeNvml(gpu)
    dev = only(opened(fake).sample())
    assert dev.temperature_c is None and dev.errors == {"temperature_c": "NotSupported"}
    assert fake.count("nvmlDeviceGetTemperature") == 0


def test_process_name_lookup_failing_is_retried_and_names_forgotten_with_the_pid() -> None:
    gpu = FakeGpu("GPU-aaa", compute=[(101, MIB), (102, MIB)])
    fake = FakeNvml(gpu, names={102: "b"})
    source = opened(fake)
    dev = only(source.sample())
    assert [(p.pid, p.name) for p in dev.processes] == [(101, None), (102, "b")]
    fake.names[101] = "a"
    dev = only(source.sample())
    assert [(p.pid, p.name) for p in dev.processes] == [(101, "a"), (102, "b")]
    assert fake.count("nvmlSystemGetProcessName") == 3  # 101 twice (failed, then found), 102 once
    gpu.compute = [(101, MIB)]  # 102 exits ...
    source.sample()
    gpu.compute = [(101, MIB), (102, MIB)]  # ... and the pid is reused by another process
    fake.names[102] = "reused"
    dev = only(source.sample())
    assert [(p.pid, p.name) for p in dev.processes] == [(101, "a"), (102, "reused")]


def test_process_name_bytes_and_unexpected_exception() -> None:
    gpu = FakeGpu("GPU-aaa", compute=[(101, MIB)])
    fake = FakeNvml(gpu, names={101: b"old-binding"})  # type: ignore[dict-item]
    assert only(opened(fake).sample()).processes[0].name == "old-binding"
    fake = FakeNvml(gpu, fail={"nvmlSystemGetProcessName": lambda: OSError("boom")})
    assert only(opened(fake).sample()).processes[0].name is None


def test_same_pid_in_compute_and_graphics_is_one_process() -> None:
    gpu = FakeGpu(
        "GPU-aaa",
        compute=[(101, 512 * MIB), (103, None)],
        graphics=[(101, 512 * MIB), (102, MIB), (103, 7 * MIB)],
    )
    dev = only(opened(FakeNvml(gpu, names={101: "a", 102: "b", 103: "c"})).sample())
    assert dev.processes == (
        GpuProcess(101, "a", 512, "compute+graphics"),
        GpuProcess(102, "b", 1, "graphics"),
        GpuProcess(103, "c", 7, "compute+graphics"),
    )


def test_unexpected_exception_in_one_field_degrades_that_field() -> None:
    gpu = FakeGpu("GPU-aaa", fail={"nvmlDeviceGetUtilizationRates": lambda: ValueError("binding surprise")})
    dev = only(opened(FakeNvml(gpu)).sample())
    assert dev.utilization_percent is None and dev.memory_utilization_percent is None
    assert dev.errors == {"utilization_percent": "ValueError", "memory_utilization_percent": "ValueError"}
    assert dev.power_draw_w == 71.5


def test_error_objects_are_never_hashed() -> None:
    # NVMLError instances are unhashable; a set or dict key holding one would raise TypeError.
    with pytest.raises(TypeError):
        hash(real_nvml.NVMLError(E.NVML_ERROR_UNKNOWN))
    everything = {
        name: E.NVML_ERROR_UNKNOWN
        for name in dir(FakeNvml)
        if name.startswith("nvmlDevice") and name != "nvmlDeviceGetHandleByIndex"
    }
    fake = FakeNvml(FakeGpu("GPU-aaa", compute=[(1, 1)]))
    source = opened(fake)
    fake.gpus[0].fail = everything
    dev = only(source.sample())
    assert set(dev.errors.values()) == {"Unknown"}
    assert dev.uuid == "GPU-aaa"


# ------------------------------------------------------------------------------------------
# The real binding on this machine


def _nvml_library_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_nvml_library_present(), reason="an NVIDIA driver is installed here")
def test_real_nvml_without_a_driver() -> None:
    with pytest.raises(GpuUnavailable) as info:
        NvmlSource().open()
    assert "NVML" in info.value.reason
    source, reason = open_source("auto", None)
    assert isinstance(source, NoGpuSource) and reason and "NVML" in reason


@pytest.mark.skipif(not _nvml_library_present(), reason="needs an NVIDIA driver")
def test_real_nvml_with_a_driver() -> None:
    source, reason = open_source("auto", None)
    assert source.name == "nvml", reason
    try:
        devices = source.sample()
        assert devices and all(d.uuid and d.memory_total_mib for d in devices)
        assert source.driver_version
    finally:
        source.close()


def test_open_source_kinds(tmp_path: Path) -> None:
    source, reason = open_source("none", None)
    assert isinstance(source, NoGpuSource) and reason and "off" in reason
    with pytest.raises(GpuUnavailable, match="gpu_simulated_file"):
        open_source("simulated", None)
    with pytest.raises(GpuUnavailable, match="cannot read"):
        open_source("simulated", tmp_path / "missing.toml")
    path = write_toml(tmp_path / "gpus.toml", [gpu_doc(0)])
    source, reason = open_source("simulated", path)
    assert isinstance(source, SimulatedSource) and reason is None and len(source.sample()) == 1
    with pytest.raises(ValueError, match="unknown GPU source"):
        open_source("cuda", None)


# ------------------------------------------------------------------------------------------
# SimulatedSource


def gpu_doc(index: int, *processes: dict[str, Any], **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"index": index, "memory_total_mib": 81920, **fields}
    if processes:
        doc["process"] = list(processes)
    return doc


def write_toml(path: Path, gpus: list[dict[str, Any]]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tomli_w.dumps({"gpu": gpus}))
    os.replace(tmp, path)  # a reader never sees a half-written file
    return path


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_simulated_devices_as_written(tmp_path: Path) -> None:
    path = tmp_path / "gpus.toml"
    me, parent = os.getpid(), os.getppid()
    path.write_text(f"""
[[gpu]]
index = 0
name = "Simulated A100"
memory_total_mib = 81920
power_draw_w = 60.0
power_limit_w = 400.0
utilization_percent = 3.0
temperature_c = 35.0
[[gpu.process]]
pid = {me}
used_memory_mib = 2048
name = "python"
[[gpu.process]]
pid = {parent}
used_memory_mib = 512
kind = "graphics"

[[gpu]]
index = 1
uuid = "GPU-custom"
memory_total_mib = 40960
memory_used_mib = 100
errors = {{ power_draw_w = "NotSupported", processes = "NoPermission" }}
[[gpu.process]]
pid = {me}
""")
    source = SimulatedSource(path)
    source.open()
    gpu0, gpu1 = source.sample()
    comm = Path(f"/proc/{os.getppid()}/comm").read_text().strip()
    assert gpu0 == GpuDevice(
        index=0,
        uuid="GPU-sim-0",
        name="Simulated A100",
        memory_total_mib=81920,
        memory_used_mib=2560,
        power_draw_w=60.0,
        power_limit_w=400.0,
        utilization_percent=3.0,
        memory_utilization_percent=None,
        temperature_c=35.0,
        processes=(
            GpuProcess(os.getpid(), "python", 2048, "compute"),
            GpuProcess(os.getppid(), comm, 512, "graphics"),
        ),
        errors={},
    )
    assert gpu1.uuid == "GPU-custom" and gpu1.name == "Simulated GPU" and gpu1.memory_used_mib == 100
    assert gpu1.power_draw_w is None and gpu1.processes == ()
    assert gpu1.errors == {"power_draw_w": "NotSupported", "processes": "NoPermission"}
    assert source.reason is None and source.driver_version is None


@pytest.mark.slow
def test_simulated_real_child_listed_until_it_exits(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    path = write_toml(tmp_path / "gpus.toml", [gpu_doc(0, {"pid": sleeper.pid, "used_memory_mib": 4096})])
    source = SimulatedSource(path)
    source.open()
    dev = only(source.sample())
    assert dev.processes == (GpuProcess(sleeper.pid, "sleep", 4096, "compute"),)
    assert dev.memory_used_mib == 4096 and dev.memory_free_mib == 81920 - 4096
    sleeper.send_signal(signal.SIGKILL)
    # Wait for the exit without reaping: a zombie holds no GPU memory, so it is gone already.
    os.waitid(os.P_PID, sleeper.pid, os.WEXITED | os.WNOWAIT)
    assert Path(f"/proc/{sleeper.pid}").exists()
    dev = only(source.sample())
    assert dev.processes == () and dev.memory_used_mib == 0
    sleeper.wait()
    assert only(source.sample()).processes == ()


def test_simulated_file_edited_between_samples(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "gpus.toml", [gpu_doc(0, memory_used_mib=10)])
    source = SimulatedSource(path)
    source.open()
    assert [(d.index, d.memory_used_mib) for d in source.sample()] == [(0, 10)]
    write_toml(path, [gpu_doc(0, memory_used_mib=20), gpu_doc(3, name="Another")])
    assert [(d.index, d.memory_used_mib, d.name) for d in source.sample()] == [
        (0, 20, "Simulated GPU"),
        (3, 0, "Another"),
    ]


def test_simulated_json_file(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps({"gpu": [gpu_doc(0, {"pid": os.getpid(), "used_memory_mib": 7})]}))
    source = SimulatedSource(path)
    source.open()
    dev = only(source.sample())
    assert dev.memory_used_mib == 7 and dev.processes[0].pid == os.getpid()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("[[gpu]\nindex = ", "invalid TOML"),
        (
            "[[gpu]]\nindex = 0\nmemory_total_mib = 1\nmemroy_used_mib = 3\n",
            "gpu.0.memroy_used_mib: Extra inputs",
        ),
        ("[[gpu]]\nindex = 0\n", "gpu.0.memory_total_mib: Field required"),
        ('[[gpu]]\nindex = 0\nmemory_total_mib = "80G"\n', "gpu.0.memory_total_mib"),
        ("[[gpu]]\nindex = 0\nmemory_total_mib = 1\n[[gpu]]\nindex = 0\nmemory_total_mib = 1\n", "unique"),
        ('[[gpu]]\nindex = 0\nmemory_total_mib = 1\nerrors = { powr = "x" }\n', "unknown field"),
    ],
)
def test_simulated_invalid_file_at_open(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "gpus.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(GpuUnavailable) as info:
        SimulatedSource(path).open()
    assert str(path) in info.value.reason and message in info.value.reason


def test_simulated_file_invalid_later_keeps_last_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_toml(tmp_path / "gpus.toml", [gpu_doc(0, memory_used_mib=10)])
    source = SimulatedSource(path)
    source.open()
    good = source.sample()
    path.write_text("[[gpu]]\nindex = zero\n")
    with caplog.at_level(logging.WARNING, logger="supervisor.adapters.gpu.sources"):
        degraded = source.sample()
        source.sample()
    assert [d.memory_used_mib for d in degraded] == [d.memory_used_mib for d in good] == [10]
    assert source.reason and "invalid TOML" in source.reason and "last valid" in source.reason
    assert "invalid TOML" in degraded[0].errors["source"]
    assert sum("invalid TOML" in r.getMessage() for r in caplog.records) == 1  # once, not every sample
    path.unlink()
    assert only(source.sample()).memory_used_mib == 10 and "cannot read" in (source.reason or "")
    write_toml(path, [gpu_doc(0, memory_used_mib=30)])
    dev = only(source.sample())
    assert dev.memory_used_mib == 30 and dev.errors == {} and source.reason is None


# ------------------------------------------------------------------------------------------
# The snapshot model


def test_snapshot_helpers_and_json() -> None:
    dev0 = GpuDevice(
        0,
        "GPU-a",
        "A",
        1000,
        250,
        None,
        None,
        None,
        None,
        None,
        (GpuProcess(5, "x", 200, "compute"), GpuProcess(6, None, None, "graphics")),
        {"power_draw_w": "NotSupported"},
    )
    dev1 = GpuDevice(
        1, None, None, None, 10, None, None, None, None, None, (GpuProcess(7, "y", 1, "compute"),), {}
    )
    at = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    snap = GpuSnapshot("simulated", (dev0, dev1), None, at, 0.001, True)
    assert dev0.memory_used_percent == 25.0 and dev0.memory_free_mib == 750
    assert dev1.memory_used_percent is None and dev1.memory_free_mib is None
    assert snap.device(1) is dev1 and snap.device(2) is None
    assert snap.pids() == {5, 6, 7} and snap.pids(0) == {5, 6}
    doc = json.loads(json.dumps(snap.as_dict()))
    assert doc["simulated"] is True and doc["source"] == "simulated"
    assert doc["sampled_at"] == "2025-01-02T03:04:05+00:00"
    assert doc["devices"][0]["memory_free_mib"] == 750
    assert doc["devices"][0]["processes"][1] == {
        "pid": 6,
        "name": None,
        "used_memory_mib": None,
        "kind": "graphics",
    }
    assert doc["devices"][0]["errors"] == {"power_draw_w": "NotSupported"}
    assert GpuSnapshot("nvml", (), None, at, None, False).as_dict()["simulated"] is False


# ------------------------------------------------------------------------------------------
# GpuMonitor


class ScriptedSource:
    """A source whose sample() can be held, or made to fail, from the test."""

    name = "simulated"
    driver_version = "test"
    reason: str | None = None

    def __init__(self, open_error: BaseException | None = None) -> None:
        self.open_error = open_error
        self.samples = 0
        self.fail_next = 0
        self.failed_sample: int | None = None
        self.hold = threading.Event()
        self.hold.set()
        self.in_sample = threading.Event()
        self.closed = threading.Event()
        self.sampler_threads: set[str] = set()

    def open(self) -> None:
        if self.open_error is not None:
            raise self.open_error

    def sample(self) -> tuple[GpuDevice, ...]:
        self.sampler_threads.add(threading.current_thread().name)
        self.in_sample.set()
        self.hold.wait()
        self.samples += 1
        if self.fail_next:
            self.fail_next -= 1
            self.failed_sample = self.samples
            raise RuntimeError("sample went wrong")
        return (GpuDevice(0, "GPU-x", "X", 100, self.samples, None, None, None, None, None, (), {}),)

    def close(self) -> None:
        self.closed.set()


@pytest.fixture
def monitors() -> Iterator[list[GpuMonitor]]:
    started: list[GpuMonitor] = []
    yield started
    for monitor in started:
        monitor.stop()


def run(monitors: list[GpuMonitor], source: Any, interval: float = 0.05) -> GpuMonitor:
    monitor = GpuMonitor(source, interval=interval)
    monitors.append(monitor)
    monitor.start()
    return monitor


@pytest.mark.slow
async def test_monitor_samples_in_background(
    tmp_path: Path, monitors: list[GpuMonitor], sleeper: subprocess.Popen[bytes]
) -> None:
    path = write_toml(tmp_path / "gpus.toml", [gpu_doc(0, {"pid": sleeper.pid, "used_memory_mib": 64})])
    source = SimulatedSource(path)
    monitor = GpuMonitor(source, interval=0.05)
    assert monitor.snapshot().sampled_at is None and monitor.snapshot().reason == "not sampled yet"
    monitors.append(monitor)
    monitor.start()
    first = await monitor.wait_for_sample(timeout=5)
    assert first.source == "simulated" and first.simulated and first.as_dict()["simulated"] is True
    assert first.pids() == {sleeper.pid}
    assert first.sample_seconds is not None and 0 <= first.sample_seconds < 1
    assert first.sampled_at is not None and first.sampled_at.tzinfo is UTC
    second = await monitor.wait_for_sample(after=first.sampled_at, timeout=5)
    assert second.sampled_at is not None and second.sampled_at > first.sampled_at
    # The file is re-read by the sampler: an edit shows up in a later snapshot.
    write_toml(path, [gpu_doc(0, {"pid": sleeper.pid, "used_memory_mib": 64}), gpu_doc(1)])
    edited_at = datetime.now(UTC)
    third = await monitor.wait_for_sample(after=edited_at, timeout=5)
    assert [d.index for d in third.devices] == [0, 1]
    sleeper.kill()
    sleeper.wait()
    fourth = await monitor.wait_for_sample(after=datetime.now(UTC), timeout=5)
    assert fourth.pids() == frozenset()


async def test_snapshot_never_blocks_on_a_slow_sample(monitors: list[GpuMonitor]) -> None:
    source = ScriptedSource()
    monitor = run(monitors, source)
    first = await monitor.wait_for_sample(timeout=5)
    source.hold.clear()
    source.in_sample.clear()
    assert await asyncio.to_thread(source.in_sample.wait, 30)  # the sampler is now stuck in sample()
    # The sample is released only below: a snapshot() that waited for it would never return
    # (the test's timeout would end it), so returning at all is the proof.
    assert monitor.snapshot() is not None
    assert not source.hold.is_set()  # still held: the answer did not wait for it
    assert monitor.snapshot().sampled_at >= first.sampled_at  # type: ignore[operator]
    source.hold.set()
    await monitor.wait_for_sample(after=monitor.snapshot().sampled_at, timeout=5)


async def test_sampled_at_is_when_the_sample_started(monitors: list[GpuMonitor]) -> None:
    # So that wait_for_sample(after=t) never returns values read before t.
    source = ScriptedSource()
    source.hold.clear()
    monitor = run(monitors, source)
    assert await asyncio.to_thread(source.in_sample.wait, 30)
    during = datetime.now(UTC)
    source.hold.set()
    snap = await monitor.wait_for_sample(timeout=5)
    assert snap.sampled_at is not None and snap.sampled_at < during


async def test_wait_for_sample_times_out(monitors: list[GpuMonitor]) -> None:
    monitor = run(monitors, ScriptedSource(), interval=60)
    first = await monitor.wait_for_sample(timeout=5)
    with pytest.raises(TimeoutError):
        await monitor.wait_for_sample(after=first.sampled_at, timeout=0.1)
    assert monitor._waiters == []  # the timed-out waiter is gone


async def test_listener_runs_in_sampler_thread(monitors: list[GpuMonitor]) -> None:
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[tuple[GpuSnapshot, str]] = asyncio.Queue()

    def listener(snapshot: GpuSnapshot) -> None:
        loop.call_soon_threadsafe(got.put_nowait, (snapshot, threading.current_thread().name))

    def broken(snapshot: GpuSnapshot) -> None:
        raise RuntimeError("listener bug")

    monitor = GpuMonitor(ScriptedSource(), interval=0.05)
    monitor.add_listener(broken)  # must not stop the others or the sampler
    monitor.add_listener(listener)
    monitors.append(monitor)
    monitor.start()
    snap1, thread = await asyncio.wait_for(got.get(), 5)
    snap2, _ = await asyncio.wait_for(got.get(), 5)
    assert thread == "gpu-sampler"
    assert snap2.sampled_at > snap1.sampled_at  # type: ignore[operator]
    monitor.remove_listener(listener)
    await monitor.wait_for_sample(after=monitor.snapshot().sampled_at, timeout=5)
    await monitor.wait_for_sample(after=monitor.snapshot().sampled_at, timeout=5)
    while not got.empty():  # at most the one in flight while removing
        got.get_nowait()
    await monitor.wait_for_sample(after=monitor.snapshot().sampled_at, timeout=5)
    assert got.empty()


async def test_stop_is_prompt_and_closes_the_source(monitors: list[GpuMonitor]) -> None:
    source = ScriptedSource()
    monitor = run(monitors, source, interval=30)
    await monitor.wait_for_sample(timeout=5)
    pending = asyncio.ensure_future(monitor.wait_for_sample(after=monitor.snapshot().sampled_at))
    await asyncio.sleep(0)  # let it register
    # Prompt: the sampler sleeps out a 30 s interval unless stop() wakes it, and stop() waits
    # for it at most 5 s, so a sampler still running (or a source not closed) is a stop that
    # was not prompt. No wall-clock bound needed.
    monitor.stop()
    assert source.closed.is_set() and not monitor.running
    with pytest.raises(GpuMonitorStopped):
        await asyncio.wait_for(pending, 5)
    with pytest.raises(GpuMonitorStopped):
        await monitor.wait_for_sample(after=monitor.snapshot().sampled_at)
    assert (await monitor.wait_for_sample()).sampled_at is not None  # the last one still answers
    with pytest.raises(RuntimeError):
        monitor.start()


async def test_sample_raising_once_keeps_sampling(
    monitors: list[GpuMonitor], caplog: pytest.LogCaptureFixture
) -> None:
    source = ScriptedSource()
    monitor = run(monitors, source)
    snap = await monitor.wait_for_sample(timeout=5)
    seen = [snap.devices[0].memory_used_mib]  # each sample's number
    with caplog.at_level(logging.ERROR, logger="supervisor.adapters.gpu.monitor"):
        source.fail_next = 1
        while source.failed_sample is None or seen[-1] <= source.failed_sample:
            snap = await monitor.wait_for_sample(after=snap.sampled_at, timeout=5)
            seen.append(snap.devices[0].memory_used_mib)
    assert monitor.running
    assert source.failed_sample not in seen  # the failed sample published nothing ...
    assert seen[-1] == source.failed_sample + 1  # ... and the very next one did
    [record] = [r for r in caplog.records if r.exc_info]
    assert "GPU sample" in record.getMessage() and "sample went wrong" in str(record.exc_info[1])


async def test_open_failure_becomes_a_none_snapshot(monitors: list[GpuMonitor]) -> None:
    source = ScriptedSource(open_error=GpuUnavailable("NVML library not found (no NVIDIA driver installed?)"))
    monitor = run(monitors, source)  # must not raise
    snap = await monitor.wait_for_sample(timeout=5)
    assert snap.source == "none" and snap.devices == () and not snap.simulated
    assert snap.reason == "NVML library not found (no NVIDIA driver installed?)"
    with pytest.raises(GpuMonitorStopped):
        await monitor.wait_for_sample(after=snap.sampled_at, timeout=5)
    assert source.samples == 0


async def test_open_bug_becomes_a_none_snapshot(monitors: list[GpuMonitor]) -> None:
    monitor = run(monitors, ScriptedSource(open_error=KeyError("bug")))
    snap = await monitor.wait_for_sample(timeout=5)
    assert snap.source == "none" and snap.reason and "KeyError" in snap.reason


async def test_monitor_with_no_gpu_source(monitors: list[GpuMonitor]) -> None:
    source, reason = open_source("none", None)
    monitor = run(monitors, source)
    snap = await monitor.wait_for_sample(timeout=5)
    assert (snap.source, snap.devices, snap.reason, snap.simulated) == ("none", (), reason, False)


async def test_monitor_with_fake_nvml(monitors: list[GpuMonitor]) -> None:
    fake = FakeNvml(FakeGpu("GPU-aaa", compute=[(101, MIB)]), names={101: "a"})
    monitor = run(monitors, NvmlSource(nvml=fake))
    snap = await monitor.wait_for_sample(timeout=5)
    assert snap.source == "nvml" and not snap.simulated and snap.driver_version == "550.54.15"
    assert snap.pids() == {101} and "simulated" in snap.as_dict()
    monitor.stop()
    assert fake.count("nvmlInit") == 1 and fake.count("nvmlShutdown") == 1


async def test_wait_for_sample_before_start_resolves_after_start(monitors: list[GpuMonitor]) -> None:
    monitor = GpuMonitor(ScriptedSource(), interval=0.05)
    monitors.append(monitor)
    waiting = asyncio.ensure_future(monitor.wait_for_sample(timeout=5))
    await asyncio.sleep(0)
    assert not waiting.done()
    monitor.start()
    snap = await waiting
    assert snap.sampled_at is not None and snap.sampled_at > datetime.now(UTC) - timedelta(seconds=5)
