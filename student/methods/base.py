"""The KD method contract: what a method needs (data), what it receives, what it returns.

A method is one small file holding one :class:`KDMethod` subclass registered with
:func:`register`. From its options alone, before anything is built, it states what it needs
from the teacher as :class:`Needs` (logits? which taps, as :class:`~storage_schemas.taps.TapSpec`?
the TPP tail?), so the trainer checks a cache once, before step 0 (:func:`check_cache`), and
``kdcache cache --for METHODS`` derives a cache's targets (:func:`needs_of`). Built, it names the
student intermediates it reads (:meth:`KDMethod.student_indices`), receives the student's
outputs as a :class:`StudentOutput` and the teacher's as :class:`student.targets.TeacherTargets`,
and returns a dict of named losses that are **already weighted** (timm ``task`` style: the
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
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, ValidationError
from timm.layers import LayerNorm2d
from torch import nn

from pipeline.teacher import num_feature_levels
from pipeline.tpp import TailInputStats, TeacherTail
from storage_schemas.codecs import LogitsInfo
from storage_schemas.errors import CacheMismatchError, ConfigError
from storage_schemas.manifest import Manifest
from storage_schemas.taps import TapInfo, TapSpec, find_serving
from student.targets import TeacherTargets

__all__ = [
    "KDMethod",
    "MethodOptions",
    "Needs",
    "StudentInfo",
    "StudentOutput",
    "TeacherContext",
    "build_methods",
    "check_cache",
    "method_names",
    "needs_of",
    "register",
    "student_forward",
    "student_info",
    "union_needs",
]


class MethodOptions(BaseModel):
    """Base of every method's ``Options``: unknown keys are refused, naming the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def tap_spec_value(v: Any) -> Any:
    r"""``mode="before"`` validator for options holding :class:`TapSpec`\ s: a bare name says which tap to
    take by convention only, so it is refused with the form to write instead."""
    if isinstance(v, str):
        raise ValueError(f"a teacher tap is the point it is taken at, not a name: write "
                         f"{{name: {v}, index: <block or stage index>}} (add norm: true for the final features "
                         "after the final norm)")
    if isinstance(v, (list, tuple)):
        return [tap_spec_value(x) for x in v]
    return v


@dataclass(frozen=True)
class Needs:
    """What methods need from the teacher, as data, known from their options before they are built."""

    logits: bool = False
    taps: tuple[TapSpec, ...] = ()
    tpp: bool = False

    def __or__(self, other: Needs) -> Needs:
        taps = list(self.taps)
        for t in other.taps:  # a point asked twice (under any name) is one tap
            if not any((u.index, u.norm) == (t.index, t.norm) for u in taps):
                taps.append(t)
        return Needs(logits=self.logits or other.logits, taps=tuple(taps), tpp=self.tpp or other.tpp)


def union_needs(items: Iterable[Needs]) -> Needs:
    """Union of several :class:`Needs`; order of first request kept."""
    out = Needs()
    for it in items:
        out = out | it
    return out


def check_cache(needs: Needs, manifest: Manifest) -> None:
    """Raise :class:`~storage_schemas.errors.CacheMismatchError` before anything is built if the cache lacks
    something the methods need, naming each missing target and the cache config that would provide it."""
    problems = []
    if needs.logits and manifest.logits is None:
        problems.append("teacher logits (cache with targets.logits: {mode: topk, k: 10} or {mode: full})")
    for spec in needs.taps:
        if manifest.tap_serving(spec) is None:
            problems.append(f"feature tap {spec.name!r} (cache with targets.features: [..., {spec.yaml()}])")
    if needs.tpp and manifest.tpp is None:
        problems.append("the ScaleKD TPP pack (cache with targets.tpp: {tail: 1})")
    if problems:
        have = [f"{t.name}@{t.index}{'+norm' if t.norm else ''}" for t in manifest.features]
        raise CacheMismatchError(
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
    layernorm2d: bool = False  # normalises its maps with LayerNorm2d (ConvNeXt), not BatchNorm

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
            raise ConfigError(f"student index {index} out of range for {self.num_levels} levels")
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
        raise ConfigError(f"student indices {list(indices)} out of range for {levels} levels")
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
        layernorm2d=any(isinstance(m, LayerNorm2d) for m in model.modules()),
    )


def feature_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H*W, C] tokens, row-major over (H, W) like the teacher's patch tokens."""
    return x.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------- teacher side


@dataclass
class TeacherContext:
    """What a method may know about the teacher at construction: the number of classes, the cached
    taps (``manifest.features``; ``num_levels`` resolves negative indices), the frozen TPP tail
    (``pipeline.tpp.load_pack``) and the statistics of the tail's input (``pipeline.tpp.load_input_stats``)."""

    num_classes: int
    taps: Sequence[TapInfo] = ()
    num_levels: int | None = None
    tail: TeacherTail | None = None
    tail_stats: TailInputStats | None = None
    logits: LogitsInfo | None = None  # how the cache stores logits (None: none, or not known here)
    stochastic_depth: bool = False  # the cache's teacher ran its drop-path (teacher.stochastic_depth)

    @classmethod
    def from_manifest(cls, manifest: Manifest, tail: TeacherTail | None = None,
                      tail_stats: TailInputStats | None = None) -> TeacherContext:
        return cls(num_classes=manifest.teacher.num_classes, taps=list(manifest.features),
                   num_levels=manifest.num_levels, tail=tail, tail_stats=tail_stats, logits=manifest.logits,
                   stochastic_depth=manifest.teacher.stochastic_depth)

    def tap(self, spec: TapSpec, who: str) -> TapInfo:
        """The cached tap at the point ``spec`` names (see :meth:`~storage_schemas.taps.TapInfo.serves`)."""
        found = find_serving(list(self.taps), spec, self.num_levels)
        if found is None:
            raise CacheMismatchError(
                f"{who} needs teacher tap {spec.name!r} (index {spec.index}{', after the final norm' if spec.norm else ''}); "
                f"the cache has {[t.name for t in self.taps]} (cache with targets.features: [..., {spec.yaml()}])")
        return found


def tap_tokens(targets: TeacherTargets, info: TapInfo) -> torch.Tensor:
    """Cached tap ``info.name`` as [B, H*W, D] patch tokens (prefix tokens dropped if cached)."""
    if info.name not in targets.features:
        raise KeyError(f"teacher targets lack tap {info.name!r}; have {sorted(targets.features)}")
    return targets.features[info.name][:, info.prefix_tokens:]


# --------------------------------------------------------------------------- methods


class KDMethod(nn.Module):
    """Base of every KD method: ``Options`` (pydantic, published defaults), :meth:`requires` (from the
    options), :meth:`student_indices` (once built) and
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

    def step_generator(self, device: torch.device | str, draw: int = 0, draws: int = 1) -> torch.Generator:
        """A generator for draw ``draw`` (of ``draws``) of this step, seeded by (the options' ``seed``,
        distributed rank, ``step``, ``draw``): a run and its resume draw the same."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        g = torch.Generator(device=device)
        g.manual_seed((((self.opts.seed * 1_000_003 + rank) * 1_000_003 + self.step) * draws + draw) % (2**63))
        return g

    @classmethod
    def requires(cls, opts: MethodOptions) -> Needs:
        """What this method, with options ``opts``, needs from the teacher (nothing by default)."""
        return Needs()

    def student_indices(self) -> tuple[int, ...]:
        """The student's ``forward_intermediates`` indices this method reads (resolved, non-negative)."""
        return ()

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
        raise ConfigError(f"unknown KD method(s) {unknown or [spec]} in {spec!r}; valid: {', '.join(method_names())}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"KD method(s) {dup} given twice in {spec!r}")
    return names


def method_options(spec: str | Sequence[str], options: Mapping[str, Mapping[str, Any]] | None
                   ) -> list[tuple[type[KDMethod], MethodOptions]]:
    """``"ce+kd+vitkd"`` → each method's class and options, in that order, each from ``options[name]``
    (validated against its ``Options``; missing keys take the published defaults)."""
    names = _parse(spec)
    options = dict(options or {})
    stray = sorted(set(options) - set(names))
    if stray:
        raise ConfigError(f"method_options given for {stray}, which are not in the methods {spec!r}")
    out = []
    for n in names:
        cls = _REGISTRY[n]
        try:
            out.append((cls, cls.Options.model_validate(dict(options.get(n) or {}))))
        except ValidationError as e:  # one line per problem, no pydantic banner: it ends the CLI's one-line error
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) + ': ' if err['loc'] else ''}"
                f"{'unknown key' if err['type'] == 'extra_forbidden' else err['msg'].removeprefix('Value error, ')}"
                for err in e.errors())
            raise ConfigError(f"method_options.{n}: {problems}") from None
    return out


def needs_of(spec: str | Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None) -> Needs:
    """What the methods ``spec`` with ``options`` need from the teacher, without building them."""
    return union_needs(cls.requires(opts) for cls, opts in method_options(spec, options))


def build_methods(
    spec: str | Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None,
    student: StudentInfo,
    teacher: TeacherContext,
) -> nn.ModuleList:
    """``"ce+kd+vitkd"`` → the methods in that order, built for ``student`` from ``teacher``'s cache."""
    return nn.ModuleList(cls(opts, student, teacher) for cls, opts in method_options(spec, options))
