"""The `triton` preset: NVIDIA Triton Inference Server, in Docker (default) or as a local binary.

One server per instance, loading `models` at start (`--model-control-mode=explicit
--load-model=M`). What it fixes in the old tool's runner:

* config.pbtxt is never written into the user's repository (weakness 26): each start builds an
  overlay repository in the instance's work dir, one directory per model holding the generated
  config.pbtxt and symlinks to everything else of the original model directory. A template's
  own `instance_group` is replaced, not duplicated.
* The `gpus:` of the generated instance_group are the ids the *server* sees, 0..n-1 (weakness
  25): inside a container the device request renumbers the GPUs from 0, and a local
  tritonserver gets CUDA_VISIBLE_DEVICES (in PCI bus order), which renumbers them the same way.
* Ports are published on 127.0.0.1 unless `bind_address` says otherwise, and a local or
  host-network server binds that address itself (weakness 15).
* Model names are checked before they go into paths (weakness 16).
* Readiness is /v2/health/ready, which (strict readiness, Triton's default) waits for every
  loaded model, not /v2/health/live (weakness 29). Liveness, once RUNNING, is /v2/health/live:
  ready goes false while a model loads through the repository API (server#7014), and a
  healthy server must not be restarted for that (issue 12).

Issue 12 (tried against a real tritonserver 2.51):

* The model list and `instances_per_gpu` are the plan's *live* part (`TritonRepositoryOverlay`
  is both the prepare step and `plan.live`; its `models` are left out of its repr, hence of the
  launch fingerprint). The server starts with `--load-model=*` on an overlay holding exactly the
  listed models, so the argv does not depend on them; a change is applied to the running
  server by rebuilding the overlay and `POST /v2/repository/models/<m>/load` (Triton 2.51 only
  adds or removes instances when just the instance_group changed) or `.../unload`.
* A plain config.pbtxt is used as the template when there is no config.pbtxt.template, and a
  model with no config at all gets one holding only its name and instance_group (Triton's
  auto-complete fills in the rest), so `instances_per_gpu` always applies.
* Each instance gets its own python-backend shm prefix (`--backend-config=python,
  shm-region-prefix-name=`), so its stubs and its /dev/shm regions can be told apart from
  every other server's: leftovers are removed before each launch and when a dead stub is
  healed, and only if no live process maps them.
* A killed python-backend stub leaves the server and the model "ready" while every request
  to it fails: the liveness check counts the instance's stubs per model and reloads (unload,
  load) a model that has fewer than its instance_group says.
* `--exit-timeout-secs` is the instance's stop.timeout - 5 (at least 1): Triton's graceful
  exit finishes before our SIGKILL.

The package, one concern a module:

* `kind`: `TritonOptions`, `TritonKind`, the option checks and the launch plan;
* `overlay`: the overlay repository, the plan's prepare step and its live part;
* `model_control`: the model-control HTTP client live apply and the stub heal use;
* `stubs`: counting the python backend's stubs and sweeping their /dev/shm regions;
* `pbtxt`: rendering and scanning config.pbtxt.

The names below are re-exported for the modules and tests that import them from here.
"""

from supervisor.adapters.procscan import cmdlines as _cmdlines
from supervisor.backends.triton.kind import (
    CONTAINER_PORTS,
    CONTAINER_REPOSITORY,
    DEFAULT_IMAGE,
    OVERLAY,
    OWNED_FLAGS,
    SHM_SETTING,
    TRITON_SYNTAX,
    TritonKind,
    TritonOptions,
    exit_timeout,
)
from supervisor.backends.triton.model_control import UNLOAD_WAIT, LiveApplyError
from supervisor.backends.triton.overlay import CONFIG, TEMPLATE, TritonRepositoryOverlay
from supervisor.backends.triton.pbtxt import render_config, strip_instance_groups
from supervisor.backends.triton.stubs import SHM_DIR, STUB, ShmSweep, count_stubs, shm_prefix, sweep_shm

__all__ = [
    "CONFIG",
    "CONTAINER_PORTS",
    "CONTAINER_REPOSITORY",
    "DEFAULT_IMAGE",
    "OVERLAY",
    "OWNED_FLAGS",
    "SHM_DIR",
    "SHM_SETTING",
    "STUB",
    "TEMPLATE",
    "TRITON_SYNTAX",
    "UNLOAD_WAIT",
    "LiveApplyError",
    "ShmSweep",
    "TritonKind",
    "TritonOptions",
    "TritonRepositoryOverlay",
    "_cmdlines",
    "count_stubs",
    "exit_timeout",
    "render_config",
    "shm_prefix",
    "strip_instance_groups",
    "sweep_shm",
]
