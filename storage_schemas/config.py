"""Typed configuration of the caching job (``kdcache cache CONFIG.yaml``).

YAML holds values only; every model forbids unknown keys, so a typo fails before any
work starts, naming the key.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .codecs import TOKEN_CODECS
from .taps import TapSpec
from .views import ViewRecipe

# Credentials and endpoints: usable by the job, never stored (the model excludes them from every dump,
# so neither the manifest nor a cache's identity can hold them).
_SECRET = {"exclude": True, "description": "fsspec options (credentials, endpoint); never stored"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputConfig(_Strict):
    """ImageNet-style WebDataset tars: ``KEY.{jpg,jpeg,png,webp}`` + ``KEY.cls`` (+ ``KEY.json``)."""

    urls: str | list[str] = Field(description="fsspec URL(s); brace patterns and globs allowed")
    storage_options: dict[str, Any] = Field(default_factory=dict, **_SECRET)
    on_bad_sample: Literal["error", "skip"] = "error"


class OutputConfig(_Strict):
    """Where the cache goes: an exact ``url``, or a ``root`` under which the job finds a cache with the
    same identity (reused, resumed, grown, or extended with new tars) or else creates one."""

    url: str | None = Field(None, description="where the Zarr cache goes (any fsspec URL: local path, s3://...)")
    root: str | None = Field(None, description="a folder of caches (any fsspec URL): reuse one with the same "
                                               "identity, else create ROOT/<teacher>-<identity>.zarr")
    storage_options: dict[str, Any] = Field(default_factory=dict, **_SECRET)
    # schema >= 1.7; since 1.8 "none" by default and always written (Manifest reads a 1.7 manifest without it as
    # zstd, the default then). How the arrays are stored, not what they hold: not in the identity.
    feature_compression: Literal["zstd", "none"] = Field(
        "none",
        description="the feature taps' arrays: none (the default) or zstd (level 3). fp16 teacher activations "
                    "shrink only ~8 % under zstd (int8 ~14 %), and decompressing them is most of what reading "
                    "them costs (ViT-L's three ViTKD taps, 1.2 MB a view: 2.7 ms a sample with zstd, 0.2 ms "
                    "without, read past Zarr's copies by pipeline.raw_shards; the student's 2-worker reader at "
                    "0.65-0.71 of images alone with zstd, 0.82-0.88 without, `python -m bench --scale`). zstd "
                    "trades that "
                    "read time for the disk. Every other array "
                    "stays zstd; every chunk keeps its crc32c checksum; a resumed or grown cache keeps the chain "
                    "it was created with (caches made before schema 1.8 without the key: zstd).")

    @model_validator(mode="after")
    def _one(self) -> OutputConfig:
        if (self.url is None) == (self.root is None):
            raise ValueError("give exactly one of output.url (this cache) or output.root (find or create one there)")
        return self


class TeacherConfig(_Strict):
    model: str = Field(description="timm model name, e.g. swin_large_patch4_window7_224")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to timm.create_model")
    checkpoint: str | None = Field(None, description="fsspec URL of .safetensors or torch weights")
    checkpoint_storage_options: dict[str, Any] = Field(default_factory=dict, **_SECRET)
    pretrained: bool = Field(False, description="use timm's pretrained weights (needs hub access)")
    input_size: int | None = Field(None, gt=0, description="square input side; default: model's pretrained_cfg")
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU"
    )
    stochastic_depth: bool = Field(
        False, exclude_if=lambda on: not on,  # off: the config dumps as before schema 1.5
        description="run the teacher's drop-path (model_kwargs.drop_path_rate) as the official ScaleKD and "
        "cls_KD trainers do (their teacher is in train mode), seeded per view; off: eval mode, as VanillaKD")

    @model_validator(mode="after")
    def _weights(self) -> TeacherConfig:
        if self.checkpoint and self.pretrained:
            raise ValueError("give either teacher.checkpoint or teacher.pretrained=true, not both")
        if self.stochastic_depth and not float(self.model_kwargs.get("drop_path_rate") or 0) > 0:
            raise ValueError("teacher.stochastic_depth: true needs the teacher's drop-path rate: set "
                             "teacher.model_kwargs.drop_path_rate (official: Swin-L 0.1, DeiT-III S/B/L 0.05/0.2/0.45)")
        return self


class LogitsConfig(_Strict):
    mode: Literal["topk", "full"] = "topk"
    k: int = Field(10, ge=1, description="classes kept per view in topk mode")


class TPPConfig(_Strict):
    """ScaleKD teacher parameter perception pack: the teacher's frozen tail."""

    tail: int = Field(1, ge=1, description="last blocks (ViT/DeiT/EVA) or last stages (Swin) to pack")


class TargetsConfig(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    logits: LogitsConfig | None = LogitsConfig()
    features: list[TapSpec] = Field(default_factory=list)
    feature_dtype: str = Field("fp16", description="how taps are stored: a token codec of storage_schemas.codecs")
    keep_prefix_tokens: bool = False
    tpp: TPPConfig | None = None
    fingerprint_size: int = Field(4, ge=1, le=16, description="teacher input avg-pooled to size×size per view")
    for_methods: list[str] = Field(
        default_factory=list, alias="for", exclude=True,
        description="KD methods to cache for (e.g. [vitkd, scalekd]): their taps, logits and TPP tail are added "
                    "to the lists above by `kdcache cache` before the job starts; not stored (the stored targets "
                    "are what was cached)")

    @field_validator("features")
    @classmethod
    def _unique(cls, v: list[TapSpec]) -> list[TapSpec]:
        names = [t.name for t in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate tap names: {sorted(dup)}")
        return v

    @field_validator("feature_dtype")
    @classmethod
    def _codec(cls, v: str) -> str:
        if v not in TOKEN_CODECS:
            raise ValueError(f"feature_dtype {v!r}: expected one of {', '.join(TOKEN_CODECS)}")
        return v


class JobConfig(_Strict):
    batch_size: int = Field(64, ge=1)
    num_actors: int | None = Field(None, ge=1, description="default: one per GPU, else one")
    cpus_per_actor: float = Field(1.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    chunk_rows: int = Field(64, ge=1, description="rows per Zarr chunk inside a unit's shard")
    max_retries: int = Field(3, ge=0, description="retries of a unit after a worker is lost")
    index_parallelism: int = Field(8, ge=1)
    lease_ttl_s: float = Field(120.0, gt=0, description="a writer's lease expires this long after its last heartbeat")


class CacheConfig(_Strict):
    input: InputConfig
    output: OutputConfig
    teacher: TeacherConfig
    views: ViewRecipe = ViewRecipe()
    targets: TargetsConfig = TargetsConfig()
    job: JobConfig = JobConfig()

    def public_dict(self) -> dict[str, Any]:
        """The config as stored in the manifest; credentials are excluded by the model itself."""
        return self.model_dump(mode="json")

    def secrets(self) -> dict[str, dict[str, Any]]:
        """Every storage option (what :meth:`public_dict` leaves out), for :meth:`with_secrets` on a worker."""
        return {"input": self.input.storage_options, "output": self.output.storage_options,
                "checkpoint": self.teacher.checkpoint_storage_options}

    def with_secrets(self, secrets: dict[str, dict[str, Any]]) -> CacheConfig:
        """This config (e.g. a manifest's, stored without credentials) with :meth:`secrets` put back."""
        return self.model_copy(update={
            "input": self.input.model_copy(update={"storage_options": dict(secrets.get("input", {}))}),
            "output": self.output.model_copy(update={"storage_options": dict(secrets.get("output", {}))}),
            "teacher": self.teacher.model_copy(
                update={"checkpoint_storage_options": dict(secrets.get("checkpoint", {}))}),
        })
