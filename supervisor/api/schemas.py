"""Request and response bodies of the HTTP API, and the OpenAPI components built from them.

The first models keep the old tool's names and fields unchanged (its clients must keep
working); new fields are only ever added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from supervisor.core.spec import NAME_PATTERN

if TYPE_CHECKING:
    from pydantic.config import JsonDict

# -- the original contract -------------------------------------------------------------------


class GPUProcess(BaseModel):
    pid: int
    name: str | None = "N/A"
    gpu_memory_usage: int | None = Field(None, description="MiB; null when the driver cannot tell")
    instance_id: str | None = Field(None, description="the supervised instance owning it; null for a stray")
    type: str | None = Field(None, description="compute or graphics")


class GPUInfo(BaseModel):
    id: int
    memory_usage: float | None = Field(None, description="percent of total memory in use")
    power_draw: float | None = Field(None, description="watts")
    processes: list[GPUProcess] = []
    uuid: str | None = None
    name: str | None = None
    memory_total: int | None = Field(None, description="MiB")
    memory_used: int | None = Field(None, description="MiB")
    power_limit: float | None = Field(None, description="watts")
    utilization: float | None = Field(None, description="percent")
    memory_utilization: float | None = Field(None, description="percent")
    temperature: float | None = Field(None, description="degrees Celsius")
    sampled_at: str | None = None
    source: str | None = Field(None, description="nvml, simulated or none")
    simulated: bool = False
    errors: dict[str, str] = Field(
        default_factory=dict, description="fields the driver could not provide, and why"
    )


class StrayProcess(BaseModel):
    pid: int
    gpu: int
    name: str | None = None
    user: str | None = None
    gpu_memory_usage: int | None = None
    policy: str = Field(description='"report" or "kill"')
    action: str = Field(
        description="reported, allowed (allow-listed), killing, killed, kill refused, kill failed"
    )


class KillProcessResponse(BaseModel):
    pid: int
    status: str = Field(description='"killed" once the process is gone')
    message: str | None = None
    instance_id: str | None = Field(
        None, description="the supervised instance it belonged to (it will restart)"
    )
    node: str | None = Field(None, description="cluster mode: the node it ran on (with ?node=)")


NAME_SCHEMA: JsonDict = {"pattern": NAME_PATTERN, "maxLength": 64}


class StartRequest(BaseModel):
    model_name: str = Field(json_schema_extra=NAME_SCHEMA)
    model_type: str | None = Field(
        None, description="a registered backend kind; needed for a model not declared yet"
    )
    gpu_id: int = Field(ge=0)
    config: dict[str, Any] = Field(
        default_factory=dict, description="the declaration of a new model (TOML keys)"
    )


class StopRequest(BaseModel):
    """The old body (model_name + gpu_id) keeps working; `instance_id` alone, or `gpu_id` null
    for a CPU-only model, names instances the old body could not (issue 12)."""

    model_name: str | None = Field(
        None, json_schema_extra=NAME_SCHEMA, description="required unless instance_id is given"
    )
    model_type: str | None = None
    gpu_id: int | None = Field(
        None,
        ge=0,
        description="the instance's GPU; leave out (or null) with instance_id, "
        'or for a CPU-only model (gpus = "none")',
    )
    instance_id: str | None = Field(None, max_length=200, description='e.g. "MAM@gpu0", "tts@cpu"')


CompatStatus = Literal["STARTING", "RUNNING", "STOPPED", "ERROR"]


class ModelInstanceInfo(BaseModel):
    instance_id: str
    model_name: str
    model_type: str
    active_gpu_ids: list[int]
    total_instances: int
    status: CompatStatus = Field(description="the old tool's four states; `state` has the precise one")
    pid: int | None = None
    port: int | None = None
    created_at: str
    updated_at: str
    state: str
    gpu_ids: list[int] = Field(description="the GPUs of this instance")
    reason: str | None = Field(None, description="why it is in its state (last transition)")
    last_error: str | None = None


class ModelStatusItem(BaseModel):
    model_name: str
    model_type: str
    gpu_id: int | None = Field(description="first GPU of the instance; null for a CPU-only instance")
    instance_id: str
    gpu_ids: list[int]
    status: CompatStatus
    state: str
    desired: str
    pid: int | None = None
    port: int | None = None
    node: str | None = Field(
        None,
        description="cluster mode: the node of the run (its label, else its Ray node "
        "id); null on this machine",
    )
    restarts: int
    consecutive_failures: int
    uptime: float | None = Field(None, description="seconds RUNNING")
    state_since: str
    reason: str | None = None
    last_error: str | None = None
    last_exit: str | None = None
    last_exit_code: int | None = None
    gpu_memory_mib: int | None = Field(None, description="GPU memory used by the instance's processes")
    gpu_processes: list[GPUProcess] = []


# -- beyond the original ---------------------------------------------------------------------


class ConfigErrorItem(BaseModel):
    file: str
    key: str | None = None
    line: int | None = None
    message: str


class ModelSummary(BaseModel):
    name: str
    backend: str
    file: str
    enabled: bool
    description: str = ""
    instances: list[str]
    declaration: dict[str, Any] = Field(description="the file's document as written")
    effective: dict[str, Any] = Field(description="every key with its value in force, defaults included")
    errors: list[ConfigErrorItem] = []


class Declaration(BaseModel):
    """A declaration document, as in a conf.d/*.toml file (validated like one)."""

    model_config = ConfigDict(extra="allow")
    name: str | None = None
    backend: str


class DeleteResult(BaseModel):
    name: str
    file: str
    stopped: list[str]


class ReloadResult(BaseModel):
    requested: bool
    last_reload: dict[str, Any] | None = None
    changes: dict[str, list[str]] | None = Field(
        None, description="wait=true: what this reload changed (added, removed, replaced, updated)"
    )
    config_errors: int | None = Field(None, description="wait=true: configuration errors after it")


class StateDirHealth(BaseModel):
    path: str
    writable: bool = Field(description="a small write (and fsync) in it just worked")
    reason: str | None = Field(
        None, description='why not, e.g. "no space left on device while writing state"'
    )


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(description='"degraded": see `degraded` (still answered 200)')
    degraded: list[str] = Field(default_factory=list, description="what is wrong, when status is degraded")
    state_dir: StateDirHealth | None = None
    version: str
    instances: dict[str, int] = Field(description="count by state")
    config_errors: int
    gpu_source: str
    gpu_count: int
    gpu_reason: str | None = None
    gpu_sample_ms: float | None = Field(None, description="CPU time the last GPU sample took")
    runners: dict[str, str | None] = Field(
        default_factory=dict, description="why a runner (process, docker) cannot be used; null when it can"
    )
    warnings: list[str] = Field(
        default_factory=list,
        description='e.g. "GPU 5 is not known: no GPU source" (instances still run there)',
    )
    containment: Literal["cgroup", "mark+subreaper", "mark"] = Field(
        "mark", description="how each run's processes are kept together so that a stop reaches every one"
    )
    containment_note: str = Field("", description="why per-run cgroups are or are not in use")


class Welcome(BaseModel):
    status: str
    message: str


class ValidationErrorItem(BaseModel):
    type: str
    loc: list[str | int]
    msg: str


class ValidationErrorBody(BaseModel):
    detail: list[ValidationErrorItem]


class ErrorBody(BaseModel):
    detail: str
    status: int | None = None


COMPONENTS: list[type[BaseModel]] = [
    GPUProcess,
    GPUInfo,
    StrayProcess,
    KillProcessResponse,
    StartRequest,
    StopRequest,
    ModelInstanceInfo,
    ModelStatusItem,
    ConfigErrorItem,
    ModelSummary,
    Declaration,
    DeleteResult,
    ReloadResult,
    Health,
    Welcome,
    ValidationErrorItem,
    ValidationErrorBody,
    ErrorBody,
]


def to_openapi30(schema: Any) -> Any:
    """Rewrite pydantic's JSON Schema (2020-12) into the OpenAPI 3.0 dialect sanic-ext serves:
    `anyOf: [X, {type: null}]` becomes X with `nullable: true`; `const` becomes a one-item enum."""
    if isinstance(schema, list):
        return [to_openapi30(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    any_of = out.get("anyOf")
    if isinstance(any_of, list) and {"type": "null"} in any_of:
        rest = [s for s in any_of if s != {"type": "null"}]
        del out["anyOf"]
        if len(rest) == 1 and "$ref" not in rest[0]:
            out = {**rest[0], **out}
        elif len(rest) == 1:
            out["allOf"] = rest
        else:
            out["anyOf"] = rest
        out["nullable"] = True
    if "const" in out:
        out["enum"] = [out.pop("const")]
    return {k: to_openapi30(v) for k, v in out.items()}


def components(backends: list[str] | None = None) -> dict[str, Any]:
    """Every model as an OpenAPI 3.0 schema; `backends` (the registered kinds) become enums."""
    _, defs = models_json_schema(
        [(m, "validation") for m in COMPONENTS], ref_template="#/components/schemas/{model}"
    )
    schemas = {name: to_openapi30(schema) for name, schema in defs["$defs"].items()}
    # Responses are produced by us, so the serialisation view is what a client sees.
    _, out_defs = models_json_schema(
        [(m, "serialization") for m in COMPONENTS], ref_template="#/components/schemas/{model}"
    )
    for name, schema in out_defs["$defs"].items():
        schemas.setdefault(name, to_openapi30(schema))
    if backends:
        schemas["Declaration"]["properties"]["backend"]["enum"] = list(backends)
        schemas["StartRequest"]["properties"]["model_type"]["enum"] = [*backends, None]
    return schemas


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def array_of(model: type[BaseModel]) -> dict[str, Any]:
    return {"type": "array", "items": ref(model)}
