"""GPU facts: one `GpuSource` interface (NVML, a simulated file, or none) and a sampler thread.

Nothing outside this package knows which source is in use; everyone reads `GpuSnapshot`s from
`GpuMonitor.snapshot()`.
"""

from supervisor.adapters.gpu.model import GpuDevice, GpuProcess, GpuSnapshot
from supervisor.adapters.gpu.monitor import GpuMonitor, GpuMonitorStopped
from supervisor.adapters.gpu.sources import (
    GpuSource,
    GpuUnavailable,
    NoGpuSource,
    NvmlSource,
    SimulatedSource,
    open_source,
)

__all__ = [
    "GpuDevice",
    "GpuMonitor",
    "GpuMonitorStopped",
    "GpuProcess",
    "GpuSnapshot",
    "GpuSource",
    "GpuUnavailable",
    "NoGpuSource",
    "NvmlSource",
    "SimulatedSource",
    "open_source",
]
