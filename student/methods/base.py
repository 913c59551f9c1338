"""The KD method contract: what a method needs (data), what it receives, what it returns.

A method is one small file holding one :class:`KDMethod` subclass registered with
:func:`register`. It declares its requests as :class:`Needs` (teacher logits? which cached
taps? the TPP tail? which student intermediates?), receives the student's outputs as a
:class:`StudentOutput` and the teacher's as :class:`student.targets.TeacherTargets`, and
returns a dict of named losses that are **already weighted** (timm ``task`` style: the
trainer sums the values and logs the keys). Projectors live inside the method, so the
method's ``.parameters()`` are all the extra trainable parameters.

Student outputs come only through timm's public interface: ``forward_intermediates``
(``norm=False``, ``output_fmt='NCHW'``, prefix tokens dropped) and ``forward_head`` on the
final features it returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from pipeline.teacher import num_feature_levels
from pipeline.tpp import TailInputStats, TeacherTail
from storage_schemas.manifest import FeatureInfo, Manifest
from student.targets import TeacherTargets

__all__ = [
    "KDMethod",
    "MethodOptions",
    "Needs",
    "StudentInfo",
    "StudentOutput",
    "TeacherContext",
    "build_methods",
    "check_against_manifest",
    "method_names",
    "register",
    "student_forward",
    "student_info",
    "union_needs",
]

# How the conventional tap names are cached, for error messages (cache config ``targets.features``).
TAP_HINTS = {
    "block0": "{name: block0, index: 0}",
    "block1": "{name: block1, index: 1}",
    "final": "{name: final, index: -1, norm: true}",
}


class MethodOptions(BaseModel):
    """Base of every method's ``Options``: unknown keys are refused, naming the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Needs:
    """What a method needs, as data. The trainer takes the union over its methods
    (:func:`union_needs`), checks it against the cache (:func:`check_against_manifest`) and
    asks the student for ``student_indices`` (``forward_intermediates`` indices, negative
    from the end)."""

    logits: bool = False
    taps: tuple[str, ...] = ()
    tpp: bool = False
    student_indices: tuple[int, ...] = ()

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            logits=self.logits or other.logits,
            taps=tuple(dict.fromkeys(self.taps + other.taps)),
            tpp=self.tpp or other.tpp,
            student_indices=tuple(dict.fromkeys(self.student_indices + other.student_indices)),
        )


def union_needs(items: Iterable[Needs | KDMethod]) -> Needs:
    """Union of the needs of methods (or of :class:`Needs`); order of first request kept."""
    out = Needs()
    for it in items:
        out = out | (it.needs() if isinstance(it, KDMethod) else it)
    return out


def check_against_manifest(needs: Needs, manifest: Manifest) -> None:
    """Raise ``ValueError`` before step 0 if the cache lacks something the methods need,
    naming each missing target and the cache config that would provide it."""
    problems = []
    if needs.logits and manifest.logits is None:
        problems.append("teacher logits (cache with targets.logits: {mode: topk, k: 10} or {mode: full})")
    have = [f.name for f in manifest.features]
    for tap in needs.taps:
        if tap not in have:
            hint = TAP_HINTS.get(tap, f"{{name: {tap}, index: <block or stage>}}")
            problems.append(f"feature tap {tap!r} (cache with targets.features: [..., {hint}])")
    if needs.tpp and manifest.tpp is None:
        problems.append("the ScaleKD TPP pack (cache with targets.tpp: {tail: 1})")
    if problems:
        raise ValueError(
            f"the cache of teacher {manifest.teacher.model} (taps {have}, logits "
            f"{manifest.logits.mode if manifest.logits else None}, tpp {manifest.tpp is not None}) lacks: "
            + "; ".join(problems)
        )


# --------------------------------------------------------------------------- student side


@dataclass(frozen=True)
class StudentInfo:
    """Shapes of a timm student, from one dummy forward (:func:`student_info`).

    ``shapes[i]`` is ``(C, H, W)`` of ``forward_intermediates`` index ``i`` (NCHW, prefix tokens
    dropped); ``final_tokens`` is ``(N, D)`` of the final (normed) features as tokens.
    """

    shapes: tuple[tuple[int, int, int], ...]
    final_tokens: tuple[int, int]
    prefix_tokens: int = 0
    vit_like: bool = False  # final features are tokens [B, P + N, D] (ViT, DeiT, EVA, Mixer)

    @property
    def num_levels(self) -> int:
        return len(self.shapes)

    @property
    def isotropic(self) -> bool:
        """All levels share one shape (ViT/Mixer blocks), unlike a staged CNN/Swin pyramid."""
        return len(set(self.shapes)) == 1

    def resolve(self, index: int) -> int:
        i = index + self.num_levels if index < 0 else index
        if not 0 <= i < self.num_levels:
            raise ValueError(f"student index {index} out of range for {self.num_levels} levels")
        return i

    def shape(self, index: int) -> tuple[int, int, int]:
        return self.shapes[self.resolve(index)]


@dataclass
class StudentOutput:
    """One student forward: ``logits`` [B, K]; ``features[i]`` [B, C, H, W] per resolved index
    (``norm=False``, prefix tokens dropped); ``final`` as timm returns it (after the final
    norm: [B, P+N, D] ViT, [B, C, H, W] CNN, [B, H, W, C] Swin); ``final_tokens`` [B, N, D],
    the final features as tokens without prefix tokens (ViTKD's "last block after the norm")."""

    logits: torch.Tensor
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    final: torch.Tensor | None = None
    final_tokens: torch.Tensor | None = None


def _tokens(final: torch.Tensor, model: nn.Module) -> torch.Tensor:
    if final.ndim == 3:
        return final[:, int(getattr(model, "num_prefix_tokens", 0) or 0):]
    if getattr(model, "output_fmt", "NCHW") == "NHWC":
        return final.flatten(1, 2)
    return final.flatten(2).transpose(1, 2)


def student_forward(model: nn.Module, x: torch.Tensor, indices: Sequence[int] = ()) -> StudentOutput:
    """``x`` [B, 3, H, W] → :class:`StudentOutput` with features at ``indices`` (negatives allowed)."""
    levels = num_feature_levels(model)
    wanted = sorted({i + levels if i < 0 else i for i in indices})
    if any(not 0 <= i < levels for i in wanted):
        raise ValueError(f"student indices {list(indices)} out of range for {levels} levels")
    final, inters = model.forward_intermediates(
        x, indices=wanted or [levels - 1], norm=False, output_fmt="NCHW"
    )
    feats = dict(zip(wanted, inters, strict=True)) if wanted else {}
    return StudentOutput(logits=model.forward_head(final), features=feats, final=final,
                         final_tokens=_tokens(final, model))


@torch.no_grad()
def student_info(model: nn.Module, input_size: int | tuple[int, int]) -> StudentInfo:
    """Shapes of every ``forward_intermediates`` level from one forward of a zero image.

    Runs in eval mode (no BatchNorm statistics updated) and restores the model's mode.
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    p = next(model.parameters())
    x = torch.zeros(1, 3, h, w, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        levels = num_feature_levels(model)
        final, inters = model.forward_intermediates(x, indices=list(range(levels)), norm=False, output_fmt="NCHW")
    finally:
        model.train(was_training)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    tokens = _tokens(final, model)
    return StudentInfo(
        shapes=tuple(tuple(int(s) for s in t.shape[1:]) for t in inters),
        final_tokens=(int(tokens.shape[1]), int(tokens.shape[2])),
        prefix_tokens=prefix,
        vit_like=final.ndim == 3,
    )


def feature_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H*W, C] tokens, row-major over (H, W) like the teacher's patch tokens."""
    return x.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------- teacher side


@dataclass
class TeacherContext:
    """What a method may know about the teacher at construction: the number of classes,
    the cached taps (``manifest.features``), the frozen TPP tail (``pipeline.tpp.load_pack``)
    and the statistics of the tail's input (``pipeline.tpp.load_input_stats``)."""

    num_classes: int
    features: Sequence[FeatureInfo] = ()
    tail: TeacherTail | None = None
    tail_stats: TailInputStats | None = None

    @classmethod
    def from_manifest(cls, manifest: Manifest, tail: TeacherTail | None = None,
                      tail_stats: TailInputStats | None = None) -> TeacherContext:
        return cls(num_classes=manifest.teacher.num_classes, features=list(manifest.features), tail=tail,
                   tail_stats=tail_stats)

    def feature(self, name: str, who: str) -> FeatureInfo:
        for f in self.features:
            if f.name == name:
                return f
        hint = TAP_HINTS.get(name, f"{{name: {name}, index: <block or stage>}}")
        raise ValueError(
            f"{who} needs teacher tap {name!r}; the cache has {[f.name for f in self.features]} "
            f"(cache with targets.features: [..., {hint}])"
        )


def tap_tokens(targets: TeacherTargets, info: FeatureInfo) -> torch.Tensor:
    """Cached tap ``info.name`` as [B, H*W, D] patch tokens (prefix tokens dropped if cached)."""
    if info.name not in targets.features:
        raise KeyError(f"teacher targets lack tap {info.name!r}; have {sorted(targets.features)}")
    return targets.features[info.name][:, info.prefix_tokens:]


# --------------------------------------------------------------------------- methods


class KDMethod(nn.Module):
    """Base of every KD method: ``Options`` (pydantic, published defaults), ``needs()`` and
    ``forward(out, targets, labels) -> {"loss_<name>...": weighted scalar}``.

    ``labels`` is [B] int64 class indices (or [B, K] class probabilities where a method
    allows). ``step`` is the optimizer step, set by the trainer through :meth:`set_step`;
    methods with randomness seed it from the step so that runs and resumes repeat.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, opts: MethodOptions, student: StudentInfo, teacher: TeacherContext) -> None:
        super().__init__()
        self.opts = opts
        self.step = 0

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def needs(self) -> Needs:
        raise NotImplementedError

    def forward(self, out: StudentOutput, targets: TeacherTargets, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return repr(self.opts)


_REGISTRY: dict[str, type[KDMethod]] = {}


def register(name: str):
    """Class decorator: make a :class:`KDMethod` buildable as ``name`` in a method spec."""

    def deco(cls: type[KDMethod]) -> type[KDMethod]:
        if name in _REGISTRY:
            raise ValueError(f"KD method {name!r} registered twice ({_REGISTRY[name].__qualname__}, {cls.__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def _parse(spec: str | Sequence[str]) -> list[str]:
    names = [n.strip() for n in spec.split("+")] if isinstance(spec, str) else [n.strip() for n in spec]
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown or not names:
        raise ValueError(f"unknown KD method(s) {unknown or [spec]} in {spec!r}; valid: {', '.join(method_names())}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"KD method(s) {dup} given twice in {spec!r}")
    return names


def build_methods(
    spec: str | Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None,
    student: StudentInfo,
    teacher: TeacherContext,
) -> nn.ModuleList:
    """``"ce+kd+vitkd"`` → the methods in that order, each built from ``options[name]``
    (validated against its ``Options``; missing keys take the published defaults)."""
    names = _parse(spec)
    options = dict(options or {})
    stray = sorted(set(options) - set(names))
    if stray:
        raise ValueError(f"options given for {stray}, which are not in the methods {spec!r}")
    methods = []
    for n in names:
        cls = _REGISTRY[n]
        try:
            opts = cls.Options.model_validate(dict(options.get(n) or {}))
        except ValidationError as e:
            raise ValueError(f"options of KD method {n!r}: {e}") from e
        methods.append(cls(opts, student, teacher))
    return nn.ModuleList(methods)
