"""The LLMDeployment custom resource: the user's contract, as pydantic v2 models.

Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python.
`crds/llmdeployment.yaml` is generated from these models (`kvpilot crd`). Cross-field rules live
twice, side by side: a pydantic validator (for `kvpilot plan` and `kvpilot up`, which never see an API
server) and the same rule in CEL under `x-kubernetes-validations` (for `kubectl apply`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "kvpilot.io"
API_VERSION = "v1alpha1"
KIND = "LLMDeployment"
DEFAULT_IMAGE = "ghcr.io/kvpilot/runtime:0.1.0"

Quantization = Literal["auto", "fp32", "bf16", "fp16", "fp8", "int8", "int4"]
KVDtype = Literal["auto", "fp32", "bf16", "fp16", "fp8"]
Quantity = str | int  # a Kubernetes quantity: 4Gi, 500m or 2 (int-or-string in the CRD)
# DNS-1035: the name also names the Service, which must start with a letter.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class SpecError(ValueError):
    """A manifest that cannot be read or does not match the LLMDeployment schema."""


def cel(rule: str, message: str) -> dict[str, str]:
    """One CEL rule of the CRD, beside the pydantic validator that enforces the same thing."""
    return {"rule": rule, "message": message}


def cel_rules(*rules: dict[str, str]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": list(rules)})


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Architecture(_Model):
    """Model facts given inline, for models outside the catalog (names as in a HF config.json)."""

    num_layers: int = Field(ge=1, description="Decoder layers (num_hidden_layers).")
    hidden_size: int = Field(ge=1, description="Hidden size.")
    num_heads: int = Field(ge=1, description="Query heads (num_attention_heads).")
    num_kv_heads: int | None = Field(None, ge=1, description="KV heads; defaults to numHeads (no GQA).")
    head_dim: int | None = Field(None, ge=1, description="Head dimension; defaults to hiddenSize / numHeads.")
    intermediate_size: int = Field(ge=1, description="MLP intermediate size.")
    vocab_size: int = Field(ge=1, description="Vocabulary size.")
    max_position_embeddings: int = Field(4096, ge=1, description="Longest context the model was trained for.")
    tie_word_embeddings: bool = Field(False, description="lm_head shares the embedding matrix.")
    qkv_bias: bool = Field(False, description="q/k/v projections have biases (Qwen2).")


class ModelSource(_Model):
    """Which model to serve and where its weights come from."""

    source: str = Field(min_length=1, description=(
        "Where the weights are: hf://org/name, pvc://claim/path, file:///path (a HF directory or a "
        ".gguf file), or a catalog name such as llama-3.1-8b."))
    served_name: str | None = Field(None, description=(
        "Model name the OpenAI API answers to; defaults to the source's name."))
    architecture: Architecture | None = Field(None, description="Inline model facts for models outside the catalog.")
    revision: str | None = Field(None, description="Git revision (branch, tag or commit) of an hf:// source.")
    token_secret: str | None = Field(None, description="Secret with key HF_TOKEN, for gated hf:// models.")

    @property
    def name(self) -> str:
        return self.served_name or self.source.split("://", 1)[-1].rstrip("/")


class GPU(_Model):
    """The accelerator of each pod: a catalog GPU type, a custom GPU (memory), or cpu."""

    model_config = cel_rules(cel("has(self.type) || has(self.memory)",
                                 "set gpu.type (a catalog name or cpu) or gpu.memory (a custom GPU)"))

    type: str | None = Field(None, description="GPU type from the catalog (h100-80gb, a100-80gb, l4, ...) or cpu.")
    memory: str | None = Field(None, pattern=r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$",
                               description="Memory of a custom GPU (e.g. 48Gi); overrides the catalog's figure.")
    fp8: bool = Field(False, description="A custom GPU supports fp8 (Ada or Hopper).")
    per_node: int = Field(8, ge=1, le=64, description="GPUs on one node.")
    max_per_replica: int | None = Field(None, ge=1, description=(
        "Most GPUs one replica may use; unset: one node, or up to 4 nodes when one cannot hold the model."))
    tensor_parallel: int | None = Field(None, ge=1, le=256, description=(
        "Pin the tensor-parallel degree (GPUs per pipeline stage); unset: the planner picks the fewest that fit."))
    pipeline_parallel: int | None = Field(None, ge=1, le=64, description=(
        "Pin the pipeline-parallel degree (stages, one node each when a stage fills a node); unset: 1 on one "
        "node, the fewest nodes that fit beyond."))

    @model_validator(mode="after")
    def _type_or_memory(self) -> GPU:
        if not self.type and not self.memory:
            raise ValueError("set gpu.type (a catalog name or cpu) or gpu.memory (a custom GPU)")
        return self


class KVCache(_Model):
    """The paged KV cache."""

    dtype: KVDtype = Field("auto", description="KV cache dtype; auto: the compute dtype, fp8 if more room is needed.")
    block_size: Literal[8, 16, 32] = Field(16, description="Tokens per KV block.")
    host_memory: str | None = Field(None, pattern=r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$", description=(
        "Host memory (RAM) for the host KV tier, e.g. 16Gi: prefix blocks evicted from the GPU and preempted "
        "sequences wait there instead of being recomputed. The pod's memory request grows by it; a memory "
        "request given in runtime.resources must hold it. Unset: no tier."))


class Serving(_Model):
    """What each replica must serve at once."""

    model_config = cel_rules(cel(
        "!has(self.maxNumSeqs) || !has(self.maxBatchedTokens) || self.maxBatchedTokens >= self.maxNumSeqs",
        "serving.maxBatchedTokens must be >= serving.maxNumSeqs: each running sequence needs a token per step"))

    max_context_length: int | None = Field(None, ge=1, description=(
        "Longest prompt + completion; defaults to the model's."))
    concurrency: int = Field(1, ge=1, description="Sequences at full context each replica must hold at once.")
    max_batched_tokens: int | None = Field(None, ge=1, description="Token budget of one engine step (chunked prefill).")
    max_num_seqs: int | None = Field(None, ge=1, description="Most sequences running at once per replica.")
    optimize: Literal["quality", "cost"] = Field("quality", description=(
        "quality: more GPUs before lower precision; cost: lower precision before more GPUs."))
    allow_offload: bool = Field(False, description=(
        "The last resort when nothing fits at any precision or GPU count: keep some layers' weights in host "
        "memory and stream them to the GPU every step (one node, no pipeline parallelism). Decode slows to what "
        "the host link carries (the plan predicts it); the pod's memory request grows by the offloaded bytes."))

    @model_validator(mode="after")
    def _batch_holds_seqs(self) -> Serving:
        if self.max_num_seqs and self.max_batched_tokens and self.max_batched_tokens < self.max_num_seqs:
            raise ValueError(f"serving.maxBatchedTokens ({self.max_batched_tokens}) must be >= "
                             f"serving.maxNumSeqs ({self.max_num_seqs}): each running sequence needs a "
                             "token per step")
        return self


# With no pod left only KEDA, querying Prometheus for the demand in front of the pods, sees new requests.
SCALE_TO_ZERO = ("autoscaling.minReplicas 0 needs mode keda: with no pod running, neither an HPA nor the "
                 "operator (which reads the pods' KV-cache use) can see new demand")


class Autoscaling(_Model):
    """Replicas that follow KV-cache utilisation."""

    model_config = cel_rules(
        cel("self.minReplicas <= self.maxReplicas", "autoscaling.minReplicas must be <= autoscaling.maxReplicas"),
        cel("!self.enabled || self.mode == 'keda' || self.minReplicas >= 1", SCALE_TO_ZERO),
    )

    enabled: bool = Field(False, description="Scale replicas on KV-cache utilisation.")
    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(4, ge=1, description="Most replicas.")
    target_kv_cache_utilization: float = Field(0.7, gt=0, le=1, alias="targetKVCacheUtilization",
                                               description="Average KV-cache use (0..1) to hold.")
    scale_up_stabilization_seconds: int = Field(0, ge=0, description="Window before scaling up.")
    scale_down_stabilization_seconds: int = Field(300, ge=0, description="Window before scaling down.")
    mode: Literal["operator", "hpa", "keda"] = Field("operator", description=(
        "Who scales: the operator (reads the pods' KV-cache use and writes spec.replicas), an HPA "
        "(prometheus-adapter serving kv_cache_usage_perc) or KEDA (Prometheus; the only mode that scales to zero)."))

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.minReplicas ({self.min_replicas}) must be <= "
                             f"autoscaling.maxReplicas ({self.max_replicas})")
        if self.enabled and self.mode != "keda" and self.min_replicas < 1:
            raise ValueError(SCALE_TO_ZERO)
        return self


class EnvVar(_Model):
    """An environment variable of the runtime container (as in a pod spec)."""

    model_config = cel_rules(cel("!(has(self.value) && has(self.valueFrom))",
                                 "set env value or valueFrom, not both"))

    name: str = Field(min_length=1, description="Variable name.")
    value: str | None = Field(None, description="Literal value.")
    value_from: dict[str, Any] | None = Field(None, description=(
        "Source of the value: secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef, as in a pod spec."))

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"env {self.name}: set value or valueFrom, not both")
        return self


class Resources(_Model):
    """Extra compute resources of the runtime container; GPUs come from the plan."""

    requests: dict[str, Quantity] = Field(default_factory=dict, description="Requests, e.g. cpu: 4, memory: 32Gi.")
    limits: dict[str, Quantity] = Field(default_factory=dict, description=(
        "Limits; for gpu.type cpu, limits.memory is the memory the plan sizes the model into."))


class Toleration(_Model):
    """A pod toleration (as in a pod spec)."""

    key: str | None = Field(None, description="Taint key; unset with operator Exists tolerates every taint.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value, for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(None, description=(
        "Taint effect to tolerate; unset: all effects."))
    toleration_seconds: int | None = Field(None, ge=0, description="For NoExecute: how long the pod stays bound.")


class Runtime(_Model):
    """The runtime pods: image, extra resources and scheduling."""

    image: str | None = Field(None, min_length=1, description=(
        f"Runtime container image; default: the operator's (KVPILOT_RUNTIME_IMAGE, else {DEFAULT_IMAGE})."))
    resources: Resources | None = Field(None, description="Extra requests/limits (cpu, memory).")
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Extra node selector labels.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Pod tolerations.")
    extra_args: list[str] = Field(default_factory=list, description="Extra runtime arguments.")


class LLMDeploymentSpec(_Model):
    """The desired state: a model, its GPUs and what it must serve."""

    model: ModelSource = Field(description="The model and where its weights come from.")
    gpu: GPU = Field(description="The accelerator of each pod.")
    quantization: Quantization = Field("auto", description="Weight quantization; auto picks by the policy.")
    kv_cache: KVCache = Field(default_factory=KVCache, description="The paged KV cache.")
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1, description="Fraction of each GPU's memory to use.")
    serving: Serving = Field(default_factory=Serving, description="Context length and concurrency per replica.")
    replicas: int = Field(1, ge=0, description="Replicas (ignored while autoscaling is enabled).")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Replicas on KV-cache utilisation.")
    runtime: Runtime = Field(default_factory=Runtime, description="The runtime pods.")


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN)
    namespace: str | None = None


class LLMDeployment(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")
    api_version: Literal["kvpilot.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["LLMDeployment"]
    metadata: Metadata
    spec: LLMDeploymentSpec


def describe_errors(err: ValidationError, prefix: str = "") -> str:
    """pydantic's errors as `field.path: what is wrong (got value)`, one per line."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        message = e["msg"].removeprefix("Value error, ")
        got = "" if e["type"] in ("missing", "value_error") else f" (got {e['input']!r})"
        lines.append(f"{path or 'manifest'}: {message}{got}")
    return "; ".join(lines)


def parse_spec(spec: dict[str, Any]) -> LLMDeploymentSpec:
    try:
        return LLMDeploymentSpec.model_validate(spec)
    except ValidationError as err:
        raise SpecError(describe_errors(err, "spec")) from None


def parse_manifest(data: Any) -> LLMDeployment:
    if not isinstance(data, dict):
        raise SpecError("manifest: expected a YAML mapping with apiVersion, kind, metadata and spec")
    try:
        return LLMDeployment.model_validate(data)
    except ValidationError as err:
        raise SpecError(describe_errors(err)) from None


def load_manifest(path: str | Path) -> LLMDeployment:
    """Read one LLMDeployment from a YAML file, with errors that name the file and the field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"{path}: cannot read ({err.strerror})") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None
    deployments = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if len(deployments) != 1:
        raise SpecError(f"{path}: expected one {KIND}, found {len(deployments)}")
    try:
        return parse_manifest(deployments[0])
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None
