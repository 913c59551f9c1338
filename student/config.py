"""Typed configuration of the training job (``kdcache train CONFIG.yaml``). YAML holds values only."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage_schemas.errors import ConfigError
from storage_schemas.views import MixRecipe, ViewRecipe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheRef(_Strict):
    """The cache to train from: its ``url``, or its identity (``id``, 6+ leading hex digits as
    ``kdcache ls`` shows) under a ``root`` of caches."""

    url: str | None = Field(None, description="the cache (any fsspec URL); opened read-only")
    root: str | None = Field(None, description="a folder of caches (any fsspec URL), with id")
    id: str | None = Field(None, description="identity (or a unique prefix of 6+ hex digits) of a cache under root")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    allow_partial: bool = Field(False, description="train on the completed units of an unfinished cache")

    @model_validator(mode="after")
    def _one(self) -> CacheRef:
        if (self.url is None) == (self.root is None and self.id is None) or (self.root is None) != (self.id is None):
            raise ValueError("name the cache either by cache.url, or by cache.root and cache.id (its identity, "
                             "see kdcache ls ROOT)")
        return self


class StudentModel(_Strict):
    model: str = Field(description="timm model name")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    input_size: int | None = Field(None, gt=0, description="default: model_kwargs.img_size, else pretrained_cfg")
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


class DataOptions(_Strict):
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    view_policy: Literal["cycle", "random"] = "cycle"
    max_views: int | None = Field(None, ge=1, description="use only the first N cached views (same as an N-view cache)")
    aug_repeats: int = Field(1, ge=1, description="repeated augmentation: each sample R times per epoch, each time "
                                                  "through another cached view (view_policy cycle, R <= views)")
    shuffle_buffer: int = Field(1024, ge=1)
    drop_uneven: bool = False
    input_storage_options: dict[str, Any] = Field(default_factory=dict)
    val_urls: str | list[str] | None = Field(None, description="validation tars (centre-crop eval)")
    eval_crop_pct: float = Field(0.875, gt=0, le=1)
    mixup: float | None = Field(None, ge=0, description="Mixup α; omitted: as the cache's views.mix (must match it); "
                                                       "with online_teacher on an unmixed cache: timm's batch Mixup")
    cutmix: float | None = Field(None, ge=0, description="CutMix α; omitted: as the cache's views.mix (must match it); "
                                                        "with online_teacher on an unmixed cache: timm's batch CutMix")
    train_urls: str | list[str] | None = Field(
        None, description="without a cache: the training tars (supervised; epoch e uses view index e of data.views)")
    views: ViewRecipe | None = Field(None, description="without a cache: the view recipe (default: ViewRecipe())")

    @model_validator(mode="after")
    def _no_mixing(self) -> DataOptions:
        if self.views is not None and self.views.mix is not None:
            # TarDataset streams no cache index and draws no partners (mixing supervised runs is not built)
            raise ValueError("data.views.mix: supervised training (data.train_urls, no cache) does not mix views; "
                             "leave views.mix out of data.views, or train from a cache of mixed views")
        return self


def check_mix(url: str, mix: MixRecipe | None, mixup: float | None, cutmix: float | None, *,
              online: bool = False) -> bool:
    """Raise ConfigError unless ``data.mixup``/``data.cutmix`` agree with the cache's mix recipe ``mix``; return
    whether batches are mixed in the trainer (timm's batch Mixup, :mod:`student.batch_mix`).

    A cache can only be trained from with the mixes it holds: the teacher's output on a mixed image is not a mix
    of its outputs on the two images, so a cache of unmixed views has no target for a mixed input, and a mixed
    cache's targets belong to its own λ, mode and box, which the student replays (reference/methods.md:
    "Teacher sees exactly the student's input"). Omitted values mean "as cached"; given, each must equal the
    cache's ``views.mix`` α (0 for a cache without ``views.mix``); the error names the caching config key that
    provides the mix. With the teacher in the loop (``online``) an unmixed cache may be mixed per batch: the
    teacher then sees the mixed batch itself."""
    have = (0.0, 0.0) if mix is None else (mix.mixup_alpha, mix.cutmix_alpha)
    asked = (have[0] if mixup is None else mixup, have[1] if cutmix is None else cutmix)
    if asked == have:
        return False
    if mix is None and online:
        return True
    want = f"views.mix: {{mixup_alpha: {asked[0]}, cutmix_alpha: {asked[1]}}}"
    if mix is None:
        raise ConfigError(f"data.mixup={asked[0]}, data.cutmix={asked[1]}: the cache {url} holds unmixed views (its "
                         "caching config has no views.mix), and the teacher's outputs on a mixed image are not a mix "
                         f"of its outputs on the two: build a cache with {want} in its caching config, train with the "
                         "teacher in the loop (--online-teacher, which mixes each batch as timm does), or leave "
                         "data.mixup and data.cutmix out")
    fields = ", ".join(f"{k}={v}" for k, v in mix.model_dump(mode="json").items())
    raise ConfigError(f"data.mixup={asked[0]}, data.cutmix={asked[1]} do not match the cache {url}, which replays "
                     f"the mixes it was built with (views.mix: {fields}): leave data.mixup and data.cutmix out (= as "
                     f"cached), or build a cache with {want} in its caching config")


class OptimOptions(_Strict):
    opt: str = Field("adamw", description="timm optimizer name: adamw, lamb, sgd, …")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0)
    sched: str = Field("cosine", description="timm scheduler name: cosine, multistep, step, …")
    epochs: int = Field(10, ge=1)
    warmup_epochs: int = Field(1, ge=0)
    warmup_lr: float = Field(1e-5, ge=0, description="learning rate the warmup starts from (timm)")
    min_lr: float = Field(1e-6, ge=0)
    decay_milestones: list[int] = Field([90, 180, 270], description="multistep: epochs where lr *= decay_rate")
    decay_rate: float = Field(0.1, gt=0)
    clip_grad: float | None = Field(None, gt=0)


class OnlineTeacher(_Strict):
    """Run the teacher live instead of reading its targets (comparison and equivalence runs)."""

    checkpoint: str = Field(description="the cached teacher's weights (fsspec URL); must match the cache's sha256")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    views: Literal["cached", "fresh"] = Field(
        "cached", description="cached: the stored view records (equivalence); fresh: new views every epoch")


class RayOptions(_Strict):
    """``kdcache train --ray``: the same trainer as DDP ranks on Ray Train workers (``ray.train.torch.TorchTrainer``)."""

    num_workers: int = Field(2, ge=1, description="DDP ranks, each a Ray Train worker (one GPU each with use_gpu)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL; else CPU workers with gloo")
    resources_per_worker: dict[str, float] | None = Field(
        None, description="Ray resources of each worker, e.g. {CPU: 8, GPU: 1} (default: 1 CPU, and 1 GPU with use_gpu)")
    max_failures: int = Field(3, ge=-1, description="restarts of the worker group from the last checkpoint after a "
                                                    "worker or node dies (-1: no limit)")
    storage_path: str | None = Field(
        None, description="where Ray Train keeps the run's checkpoints (last.pt) and state: a folder every node can "
                          "reach or a pyarrow URL (s3://…); default OUTPUT/ray. Rerunning with the same output "
                          "and storage resumes from its last checkpoint")


class TrainConfig(_Strict):
    cache: CacheRef | None = Field(None, description="the cache to distil from; none: supervised training on "
                                                     "data.train_urls (methods that need no teacher, e.g. ce)")
    student: StudentModel
    methods: str | list[str] = Field("ce+kd", description="KD methods composed with '+', e.g. ce+kd+vitkd")
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per method, by name")
    data: DataOptions = DataOptions()
    optim: OptimOptions = OptimOptions()
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the student (timm ModelEmaV3)")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on the CPU)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    online_teacher: OnlineTeacher | None = None
    output: str = Field(description="folder for checkpoints, metrics.jsonl, curves.png, config.yaml")
    log_every: int = Field(10, ge=1, description="steps between metrics lines")
    checkpoint_every: int | None = Field(None, ge=1, description="also checkpoint every N steps (exact mid-epoch resume)")
    ray: RayOptions | None = Field(None, description="run on Ray Train (also: kdcache train --ray); see RayOptions")

    @model_validator(mode="after")
    def _source(self) -> TrainConfig:
        if (self.cache is None) == (self.data.train_urls is None):
            raise ValueError("give either cache (distil from it) or data.train_urls (supervised, no teacher)")
        if self.cache is not None and self.data.views is not None:
            raise ValueError("data.views is for training without a cache; a cache replays the views it holds")
        if self.cache is None and self.online_teacher is not None:
            raise ValueError("online_teacher runs the teacher a cache was built from: give cache too")
        if self.cache is None and self.data.aug_repeats > 1:
            raise ValueError(f"data.aug_repeats={self.data.aug_repeats}: repeated augmentation serves a cache's "
                             "views; supervised training (data.train_urls, no cache) draws one fresh view per epoch")
        if self.cache is None and (self.data.mixup or self.data.cutmix):
            raise ValueError(f"data.mixup={self.data.mixup}, data.cutmix={self.data.cutmix}: supervised training "
                             "(data.train_urls, no cache) does not mix views; mixed views come from a cache built "
                             "with views.mix in its caching config")
        return self
