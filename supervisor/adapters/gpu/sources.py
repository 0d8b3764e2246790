"""Where GPU facts come from: NVML, a simulated file, or nothing. The only module that calls NVML.

Every source has the same shape (`GpuSource`): `open()` once, then `sample()` from one thread
(the monitor's sampler), then `close()`. `sample()` blocks; it never raises because one GPU or
one field failed: that value becomes None and `GpuDevice.errors[field]` says why.

Simulated GPU file (`gpu_source = "simulated"`), TOML, or JSON when the name ends in `.json`,
read again on every sample so a test or a demo can edit it while the supervisor runs::

    [[gpu]]
    index = 0                       # required, unique
    name = "Simulated A100"         # default "Simulated GPU"
    uuid = "GPU-sim-0"              # default "GPU-sim-<index>"
    memory_total_mib = 81920        # required
    memory_used_mib = 1024          # default: sum of the listed live processes' memory
    power_draw_w = 60.0             # this and the following values: default None (not reported)
    power_limit_w = 400.0
    utilization_percent = 3.0
    memory_utilization_percent = 1.0
    temperature_c = 35.0
    errors = { power_draw_w = "NotSupported" }   # optional: these fields read as failed (None)

    [[gpu.process]]
    pid = 1234                      # listed only while this pid is alive (not a zombie)
    used_memory_mib = 2048          # default None (NVML's "not available")
    name = "python"                 # default: /proc/<pid>/comm
    kind = "compute"                # "compute" (default), "graphics" or "compute+graphics"

The JSON form is the same document: `{"gpu": [{"index": 0, ..., "process": [{"pid": 1234}]}]}`.
Unknown keys are errors (a typo must not silently simulate a different GPU). An invalid file
fails `open()`; a file that turns invalid later keeps the last good GPU list, with the error in
`reason` and in each device's `errors["source"]`.
"""

from __future__ import annotations

import json
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from supervisor.adapters.gpu.model import GpuDevice, GpuProcess, ProcessKind
from supervisor.adapters.procscan import read_comm, read_proc

log = logging.getLogger(__name__)

MIB = 1024**2


class GpuUnavailable(Exception):
    """A source cannot be opened; `reason` is meant for people (logs, API status)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@runtime_checkable
class GpuSource(Protocol):
    name: str  # "nvml", "simulated" or "none"; becomes GpuSnapshot.source

    @property
    def driver_version(self) -> str | None: ...

    @property
    def reason(self) -> str | None:
        """Why the source has no devices or degraded data right now; None when all is well."""
        ...

    def open(self) -> None:
        """Raises GpuUnavailable. Calling it again on an open source does nothing."""
        ...

    def sample(self) -> tuple[GpuDevice, ...]:
        """Blocking; degrades a failing field or GPU instead of raising."""
        ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------
# NVML


def _error_name(exc: BaseException) -> str:
    """`NVMLError_NotSupported` -> "NotSupported". Never compare or hash NVMLErrors: their
    `__eq__` reads `other.value` and they define no `__hash__`."""
    name = type(exc).__name__
    if name.startswith("NVMLError_"):
        return name[len("NVMLError_") :]
    if name == "NVMLError":
        value = getattr(exc, "value", None)
        return f"NVMLError({value})" if value is not None else name
    if name == "NVMLLibraryMismatchError":
        return "LibraryMismatch"
    return name


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # NVMLError.__str__ may call into the library for unknown codes
        text = ""
    name = _error_name(exc)
    return f"{name}: {text}" if text and text != name else name


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):  # older bindings return bytes
        value = value.decode(errors="replace")
    return value or None


def _init_reason(exc: BaseException) -> str:
    name = _error_name(exc)
    if name == "LibraryNotFound":
        return "NVML library not found (no NVIDIA driver installed?)"
    if name == "DriverNotLoaded":
        return "NVML: the NVIDIA driver is not loaded (is the kernel module installed and loaded?)"
    if name == "NoPermission":
        return "NVML: no permission to use the GPUs (check access to /dev/nvidia*)"
    return f"NVML failed to initialise ({_describe(exc)})"


#: What a sample fills in beyond the static facts; a GPU with no handle reports each as missing.
_DYNAMIC_FIELDS = (
    "memory_used_mib",
    "power_draw_w",
    "power_limit_w",
    "utilization_percent",
    "memory_utilization_percent",
    "temperature_c",
    "processes",
)


@dataclass(slots=True)
class _Static:
    """Facts read once at open(): they cannot change without a driver reload."""

    index: int
    handle: Any = None
    uuid: str | None = None
    name: str | None = None
    memory_total_mib: int | None = None
    errors: dict[str, str] = field(default_factory=dict)


class _Reader:
    """Runs one GPU's calls for one sample, turning each failure into errors[field].

    After GpuIsLost every further call on that GPU would fail the same way (each costing a
    driver round trip), so the rest of the sample is marked lost without calling.
    """

    def __init__(self, index: int, errors: dict[str, str]) -> None:
        self.index = index
        self.errors = errors
        self.lost: str | None = None

    def call(self, fields: tuple[str, ...], fn: Any, *args: Any) -> Any:
        if self.lost:
            for name in fields:
                self.errors[name] = self.lost
            return None
        try:
            return fn(*args)
        except Exception as exc:
            name = _error_name(exc)
            log.debug("GPU %d: %s failed: %s", self.index, "/".join(fields), _describe(exc))
            for f in fields:
                self.errors[f] = name
            if name == "GpuIsLost":
                self.lost = name
            return None


class NvmlSource:
    """Real GPUs through nvidia-ml-py (`pynvml`). `nvml` injects a module double for tests."""

    name = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        self._injected = nvml
        self._nv: Any = None
        self._static: list[_Static] = []
        self._names: dict[int, str] = {}  # pid -> process name, kept while the pid is on a GPU
        self._v2_processes: set[str] = set()  # process-list calls the driver only has as _v2
        self._temperature_v = True  # False once the driver proved to lack nvmlDeviceGetTemperatureV
        self.driver_version: str | None = None
        self.reason: str | None = None

    def open(self) -> None:
        if self._nv is not None:
            return
        nv = self._injected
        if nv is None:
            try:
                import pynvml  # loads nothing: the shared library is opened by nvmlInit
            except ImportError as exc:
                raise GpuUnavailable(f"NVML Python binding not installed (nvidia-ml-py): {exc}") from None
            nv = pynvml
        try:
            nv.nvmlInit()
        except Exception as exc:  # any NVMLError, or a broken binding: never crash the supervisor
            raise GpuUnavailable(_init_reason(exc)) from None
        try:
            count = int(nv.nvmlDeviceGetCount())
        except Exception as exc:
            self._shutdown(nv)
            raise GpuUnavailable(
                f"NVML initialised but could not count the GPUs ({_describe(exc)})"
            ) from None
        self._nv = nv
        try:
            self.driver_version = _text(nv.nvmlSystemGetDriverVersion())
        except Exception as exc:
            log.debug("NVML driver version unavailable: %s", _describe(exc))
        self._static = [_Static(i) for i in range(count)]
        for st in self._static:
            self._load_static(st)
        self.reason = None if count else "NVML reports no GPUs"
        log.info("NVML: %d GPU(s), driver %s", count, self.driver_version or "unknown")

    def close(self) -> None:
        nv, self._nv = self._nv, None
        self._static = []
        self._names.clear()
        if nv is not None:
            self._shutdown(nv)

    @staticmethod
    def _shutdown(nv: Any) -> None:
        try:
            nv.nvmlShutdown()
        except Exception as exc:
            log.warning("nvmlShutdown failed: %s", _describe(exc))

    def _load_static(self, st: _Static) -> None:
        nv = self._nv
        retry = "handle" in st.errors  # retried every sample: warn only the first time
        st.errors = {}
        try:
            st.handle = nv.nvmlDeviceGetHandleByIndex(st.index)
        except Exception as exc:
            st.handle = None
            st.errors["handle"] = _error_name(exc)
            log.log(
                logging.DEBUG if retry else logging.WARNING,
                "GPU %d: no NVML handle: %s",
                st.index,
                _describe(exc),
            )
            return
        if retry:
            log.info("GPU %d: NVML handle available again", st.index)
        reader = _Reader(st.index, st.errors)
        st.uuid = _text(reader.call(("uuid",), nv.nvmlDeviceGetUUID, st.handle))
        st.name = _text(reader.call(("name",), nv.nvmlDeviceGetName, st.handle))
        info = reader.call(("memory_total_mib",), nv.nvmlDeviceGetMemoryInfo, st.handle)
        st.memory_total_mib = int(info.total) // MIB if info is not None else None

    def sample(self) -> tuple[GpuDevice, ...]:
        if self._nv is None:
            raise RuntimeError("NvmlSource.sample() before open()")
        seen: set[int] = set()
        devices = []
        for st in self._static:
            try:
                devices.append(self._read_device(st, seen))
            except Exception as exc:  # a bug or a binding surprise: lose this GPU's sample only
                log.exception("GPU %d: sample failed", st.index)
                devices.append(self._unreadable(st, {"device": _error_name(exc)}))
        for pid in self._names.keys() - seen:  # pids are reused: forget names of exited ones
            del self._names[pid]
        return tuple(devices)

    def _unreadable(self, st: _Static, why: dict[str, str]) -> GpuDevice:
        return GpuDevice(
            index=st.index,
            uuid=st.uuid,
            name=st.name,
            memory_total_mib=st.memory_total_mib,
            memory_used_mib=None,
            power_draw_w=None,
            power_limit_w=None,
            utilization_percent=None,
            memory_utilization_percent=None,
            temperature_c=None,
            processes=(),
            errors={**st.errors, **why},
        )

    def _read_device(self, st: _Static, seen: set[int]) -> GpuDevice:
        nv = self._nv
        if st.handle is None:
            self._load_static(st)  # a GPU that failed at open may be back (after a reset)
            if st.handle is None:
                return self._unreadable(st, dict.fromkeys(_DYNAMIC_FIELDS, st.errors["handle"]))
        h = st.handle
        errors = dict(st.errors)
        r = _Reader(st.index, errors)

        memory_total = st.memory_total_mib
        memory_used = None
        info = r.call(("memory_used_mib",), nv.nvmlDeviceGetMemoryInfo, h)
        if info is not None:
            memory_used = int(info.used) // MIB
            if memory_total is None:
                memory_total = int(info.total) // MIB
                errors.pop("memory_total_mib", None)

        draw_mw = r.call(("power_draw_w",), nv.nvmlDeviceGetPowerUsage, h)
        limit_mw = r.call(("power_limit_w",), self._power_limit, h)
        util = r.call(
            ("utilization_percent", "memory_utilization_percent"), nv.nvmlDeviceGetUtilizationRates, h
        )
        temperature = r.call(("temperature_c",), self._temperature, h)
        processes = self._processes(r, h, seen)

        return GpuDevice(
            index=st.index,
            uuid=st.uuid,
            name=st.name,
            memory_total_mib=memory_total,
            memory_used_mib=memory_used,
            power_draw_w=draw_mw / 1000.0 if draw_mw is not None else None,
            power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
            utilization_percent=float(util.gpu) if util is not None else None,
            memory_utilization_percent=float(util.memory) if util is not None else None,
            temperature_c=float(temperature) if temperature is not None else None,
            processes=processes,
            errors=errors,
        )

    def _power_limit(self, h: Any) -> int:
        nv = self._nv
        enforced = getattr(nv, "nvmlDeviceGetEnforcedPowerLimit", None)
        fallback = getattr(nv, "nvmlDeviceGetPowerManagementLimit", None)
        if enforced is not None:
            try:
                limit: int = enforced(h)
                return limit
            except nv.NVMLError as exc:
                if fallback is None or _error_name(exc) == "GpuIsLost":
                    raise
        if fallback is None:
            raise AttributeError("the NVML binding has no power limit call")
        limit = fallback(h)
        return limit

    def _temperature(self, h: Any) -> int:
        nv = self._nv
        sensor = getattr(nv, "NVML_TEMPERATURE_GPU", 0)
        if self._temperature_v:
            # nvmlDeviceGetTemperature is deprecated (to be removed in CUDA 14); the V call is
            # missing from older drivers and bindings, hence the one-way fallback.
            try:
                celsius: int = nv.nvmlDeviceGetTemperatureV(h, sensor)
                return celsius
            except AttributeError:
                pass
            except nv.NVMLError as exc:
                if _error_name(exc) != "FunctionNotFound":
                    raise
            log.info("NVML: nvmlDeviceGetTemperatureV unavailable; using nvmlDeviceGetTemperature")
            self._temperature_v = False
        celsius = nv.nvmlDeviceGetTemperature(h, sensor)
        return celsius

    def _running(self, call: str, h: Any) -> list[Any]:
        nv = self._nv
        if call not in self._v2_processes:
            try:
                return list(getattr(nv, call)(h))
            except Exception as exc:
                # A driver without the _v3 symbol: the binding raises NVMLLibraryMismatchError,
                # a plain Exception, not an NVMLError.
                mismatch = getattr(nv, "NVMLLibraryMismatchError", None)
                if mismatch is None or not isinstance(exc, mismatch) or not hasattr(nv, call + "_v2"):
                    raise
                log.info("NVML: %s needs the _v2 call on this driver", call)
                self._v2_processes.add(call)
        return list(getattr(nv, call + "_v2")(h))

    def _processes(self, r: _Reader, h: Any, seen: set[int]) -> tuple[GpuProcess, ...]:
        # A compute failure makes the list unreliable ("processes"); graphics processes are
        # unsupported on some datacenter parts, which is worth recording but not alarming.
        compute = r.call(("processes",), self._running, "nvmlDeviceGetComputeRunningProcesses", h)
        graphics = r.call(("graphics_processes",), self._running, "nvmlDeviceGetGraphicsRunningProcesses", h)
        if r.lost:
            r.errors.pop("graphics_processes", None)
        merged: dict[int, tuple[int | None, set[str]]] = {}
        for kind, entries in (("compute", compute or ()), ("graphics", graphics or ())):
            for entry in entries:
                pid = int(entry.pid)
                used = entry.usedGpuMemory  # None: NVML_VALUE_NOT_AVAILABLE
                mib = int(used) // MIB if used is not None else None
                if pid in merged:
                    # Listed in both lists: the same memory, not twice as much.
                    old, kinds = merged[pid]
                    kinds.add(kind)
                    mib = mib if old is None else old if mib is None else max(old, mib)
                    merged[pid] = (mib, kinds)
                else:
                    merged[pid] = (mib, {kind})
        processes = []
        for pid, (mib, kinds) in merged.items():
            seen.add(pid)
            process_kind: ProcessKind = (
                "compute+graphics" if len(kinds) == 2 else "compute" if "compute" in kinds else "graphics"
            )
            processes.append(
                GpuProcess(pid=pid, name=self._process_name(pid), used_memory_mib=mib, kind=process_kind)
            )
        return tuple(sorted(processes, key=lambda p: p.pid))

    def _process_name(self, pid: int) -> str | None:
        name = self._names.get(pid)
        if name is None:
            try:
                name = _text(self._nv.nvmlSystemGetProcessName(pid))
            except Exception as exc:  # gone already, or another pid namespace / user
                log.debug("NVML: no name for pid %d: %s", pid, _describe(exc))
                return None
            if name:
                self._names[pid] = name  # only successes: a failed lookup is retried next sample
        return name


# --------------------------------------------------------------------------------------------
# Simulated


class _SimModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _SimProcess(_SimModel):
    pid: int = Field(gt=0)
    used_memory_mib: int | None = Field(default=None, ge=0)
    name: str | None = None
    kind: Literal["compute", "graphics", "compute+graphics"] = "compute"


_SIM_ERROR_FIELDS = frozenset({"uuid", "name", "memory_total_mib", *_DYNAMIC_FIELDS})


class _SimGpu(_SimModel):
    index: int = Field(ge=0)
    name: str = "Simulated GPU"
    uuid: str | None = None
    memory_total_mib: int = Field(ge=0)
    memory_used_mib: int | None = Field(default=None, ge=0)
    power_draw_w: float | None = Field(default=None, ge=0)
    power_limit_w: float | None = Field(default=None, ge=0)
    utilization_percent: float | None = Field(default=None, ge=0, le=100)
    memory_utilization_percent: float | None = Field(default=None, ge=0, le=100)
    temperature_c: float | None = None
    errors: dict[str, str] = {}
    process: list[_SimProcess] = []

    @model_validator(mode="after")
    def _check(self) -> _SimGpu:
        unknown = set(self.errors) - _SIM_ERROR_FIELDS
        if unknown:
            raise ValueError(
                f"errors: unknown field(s) {sorted(unknown)}; known: {sorted(_SIM_ERROR_FIELDS)}"
            )
        pids = [p.pid for p in self.process]
        if len(pids) != len(set(pids)):
            raise ValueError(f"GPU {self.index}: a pid is listed twice")
        return self


class _SimFile(_SimModel):
    gpu: list[_SimGpu] = []

    @model_validator(mode="after")
    def _unique(self) -> _SimFile:
        indices = [g.index for g in self.gpu]
        if len(indices) != len(set(indices)):
            raise ValueError(f"GPU indices must be unique, got {indices}")
        return self


def _alive(pid: int) -> bool:
    info = read_proc(pid)
    return info is not None and not info.zombie  # a zombie has released its GPU memory


class SimulatedSource:
    """GPUs described by a file (see the module docstring); for demos and tests, labelled as such."""

    name = "simulated"
    driver_version = None

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._last_good: _SimFile | None = None
        self._file_error: str | None = None

    @property
    def reason(self) -> str | None:
        if self._file_error is None:
            return None
        return f"{self._file_error}; showing the last valid contents"

    def _load(self) -> _SimFile:
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise GpuUnavailable(
                f"simulated GPU file {self.path}: cannot read ({exc.strerror or exc})"
            ) from None
        try:
            if self.path.suffix.lower() == ".json":
                doc = json.loads(raw)
            else:
                doc = tomllib.loads(raw.decode())
        except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
            kind = "JSON" if self.path.suffix.lower() == ".json" else "TOML"
            raise GpuUnavailable(f"simulated GPU file {self.path}: invalid {kind}: {exc}") from None
        try:
            return _SimFile.model_validate(doc)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in err['loc']) or '(file)'}: {err['msg']}"
                for err in exc.errors(include_url=False, include_context=False, include_input=False)
            )
            raise GpuUnavailable(f"simulated GPU file {self.path}: {problems}") from None

    def open(self) -> None:
        if self._last_good is None:
            self._last_good = self._load()
            self._file_error = None

    def close(self) -> None:
        self._last_good = None
        self._file_error = None

    def sample(self) -> tuple[GpuDevice, ...]:
        if self._last_good is None:
            raise RuntimeError("SimulatedSource.sample() before open()")
        try:
            spec = self._load()
        except GpuUnavailable as exc:
            if exc.reason != self._file_error:
                log.warning("%s; keeping the last valid GPU list", exc.reason)
            self._file_error = exc.reason
            spec = self._last_good
        else:
            if self._file_error is not None:
                log.info("simulated GPU file %s is valid again", self.path)
            self._file_error = None
            self._last_good = spec
        return tuple(self._device(gpu) for gpu in spec.gpu)

    def _device(self, gpu: _SimGpu) -> GpuDevice:
        processes: tuple[GpuProcess, ...] = ()
        if "processes" not in gpu.errors:
            processes = tuple(
                GpuProcess(
                    pid=p.pid,
                    name=p.name if p.name is not None else read_comm(p.pid),
                    used_memory_mib=p.used_memory_mib,
                    kind=p.kind,
                )
                for p in gpu.process
                if _alive(p.pid)
            )
        used = gpu.memory_used_mib
        if used is None:
            used = sum(p.used_memory_mib or 0 for p in processes)
        values: dict[str, Any] = {
            "uuid": gpu.uuid or f"GPU-sim-{gpu.index}",
            "name": gpu.name,
            "memory_total_mib": gpu.memory_total_mib,
            "memory_used_mib": used,
            "power_draw_w": gpu.power_draw_w,
            "power_limit_w": gpu.power_limit_w,
            "utilization_percent": gpu.utilization_percent,
            "memory_utilization_percent": gpu.memory_utilization_percent,
            "temperature_c": gpu.temperature_c,
        }
        for name in gpu.errors.keys() & values.keys():
            values[name] = None
        errors = dict(gpu.errors)
        if self._file_error is not None:
            errors["source"] = self._file_error
        return GpuDevice(index=gpu.index, processes=processes, errors=errors, **values)


# --------------------------------------------------------------------------------------------
# None


class NoGpuSource:
    """No GPU facts at all (no driver, or switched off); `reason` says why."""

    name = "none"
    driver_version = None

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def open(self) -> None:
        pass

    def sample(self) -> tuple[GpuDevice, ...]:
        return ()

    def close(self) -> None:
        pass


SourceKind = Literal["auto", "nvml", "simulated", "none"]


def node_file(path: Path | str | None, node: str) -> Path | None:
    """The simulated GPU file of one node: `{node}` in the path becomes its label ("local" for
    the supervisor's own machine), so one setting simulates different GPUs per cluster node."""
    return Path(str(path).replace("{node}", node)) if path is not None else None


def open_source(kind: SourceKind | str, simulated_file: Path | None) -> tuple[GpuSource, str | None]:
    """An *opened* source for the `gpu_source` setting, and why it is degraded (None if not).

    "auto" and "nvml" never fail: without a usable NVML the supervisor still runs, with no GPU
    facts (a CPU-only machine is a supported setup). "simulated" raises GpuUnavailable when the
    file is missing or invalid: that is a configuration error to fix, not an environment fact.
    """
    if kind in ("auto", "nvml"):
        nvml = NvmlSource()
        try:
            nvml.open()
        except GpuUnavailable as exc:
            if kind == "auto":
                reason = exc.reason
                log.info("no GPU facts: %s", reason)
            else:
                reason = f'gpu_source = "nvml" was requested, but {exc.reason}'
                log.warning("no GPU facts: %s", reason)
            return NoGpuSource(reason), reason
        return nvml, nvml.reason
    if kind == "simulated":
        if simulated_file is None:
            raise GpuUnavailable('gpu_source = "simulated" needs gpu_simulated_file')
        sim = SimulatedSource(simulated_file)
        sim.open()
        log.warning("GPU facts are SIMULATED, from %s", simulated_file)
        return sim, None
    if kind == "none":
        reason = 'GPU monitoring is off (gpu_source = "none")'
        return NoGpuSource(reason), reason
    raise ValueError(f"unknown GPU source kind {kind!r} (auto, nvml, simulated or none)")
