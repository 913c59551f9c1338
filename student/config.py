"""Typed configuration of the training job (``kdcache train CONFIG.yaml``). YAML holds values only."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage_schemas.views import ViewRecipe


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
    shuffle_buffer: int = Field(1024, ge=1)
    drop_uneven: bool = False
    input_storage_options: dict[str, Any] = Field(default_factory=dict)
    val_urls: str | list[str] | None = Field(None, description="validation tars (centre-crop eval)")
    eval_crop_pct: float = Field(0.875, gt=0, le=1)
    mixup: float = Field(0.0, ge=0, description="refused with a cache (not replayable); see refuse_mixup")
    cutmix: float = Field(0.0, ge=0)
    train_urls: str | list[str] | None = Field(
        None, description="without a cache: the training tars (supervised; epoch e uses view index e of data.views)")
    views: ViewRecipe | None = Field(None, description="without a cache: the view recipe (default: ViewRecipe())")

    @model_validator(mode="after")
    def _no_mixing(self) -> DataOptions:
        refuse_mixup(self.mixup, self.cutmix)
        if self.views is not None and self.views.mix is not None:
            # the data path replays one sample at a time: it cannot mix with a partner yet (issue 14, item 3)
            raise ValueError("data.views.mix: training on mixed views is not implemented yet (issue 14, item 3): "
                             "leave views.mix out of data.views")
        return self


def refuse_mixup(mixup: float, cutmix: float) -> None:
    """Raise ValueError when Mixup or CutMix is asked for: a cache cannot replay them.

    They blend two samples' pixels (and labels), so the teacher's output on the mixed image is not a
    function of its cached outputs on the two unmixed views: the logits are not linear in the input,
    and a feature map of a pasted box is not the pasted box of the feature maps. Interpolating cached
    targets would distil from targets the teacher never produced. As in TinyViT and ScaleKD, cached KD
    trains without them (the cached views keep RandAugment and random erasing)."""
    if mixup > 0 or cutmix > 0:
        raise ValueError(
            f"mixup={mixup}, cutmix={cutmix}: Mixup/CutMix cannot be used with cached teacher targets. They blend "
            "two images, and the teacher's logits and features on a blended image are not a blend of its cached "
            "outputs on the two unmixed views, so the cache holds no target for the mixed input. Set mixup=0 and "
            "cutmix=0 (the cached views already carry RandAugment and random erasing, as in TinyViT/ScaleKD), "
            "or train with --online-teacher to run the teacher on the mixed batch."
        )


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

    @model_validator(mode="after")
    def _source(self) -> TrainConfig:
        if (self.cache is None) == (self.data.train_urls is None):
            raise ValueError("give either cache (distil from it) or data.train_urls (supervised, no teacher)")
        if self.cache is not None and self.data.views is not None:
            raise ValueError("data.views is for training without a cache; a cache replays the views it holds")
        if self.cache is None and self.online_teacher is not None:
            raise ValueError("online_teacher runs the teacher a cache was built from: give cache too")
        return self
