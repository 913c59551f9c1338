"""ScaleKD (Fan et al., "ScaleKD: Strong Vision Transformers Could Be Excellent Teachers",
2024), reference/methods.md "ScaleKD"; official code deep-optimization/ScaleKD
(``FreqMaskingDistillLossv2``, ``AttentionProjector``, ``ClassificationDistiller``).

Attached at the student's last two stages s3, s4 (``student_indices``; default: the last
two levels of a staged CNN/Swin student, and blocks ``min(⌈3L/4⌉−1, L−2)`` and ``L−1`` of an
isotropic ViT/Mixer student with L blocks, e.g. 8 and 11 for 12 blocks, i.e. the ends of
its 3rd and 4th quarter, as a 4-stage pyramid would split it).

- CAP (:class:`CrossAttentionProjector`): student map → 3×3 conv + BN + ReLU (LayerNorm2d instead
  of BN for ConvNeXt students, as the official ``fmd_convnext.py``), + learnable
  positional embedding (C_s, H, W); every position is a key/value token. Queries: learnable
  (H_q·W_q, C_t) at s3, the TPP path output at s4 (both through Linear + ReLU first, the
  official ``proj_pos``; ``query_proj``). One cross-attention layer, Q: C_t→C_t, K/V:
  C_s→C_t, logits × head_dim^-0.5 × ``softmax_scale`` (5.0), output projection, no residual;
  then LayerNorm and FFN C_t→4C_t→C_t (ReLU) with identity shortcut. Output [B, H_q·W_q, C_t].
  Heads (:func:`official_heads`): the official configs' counts — CNN students of a Swin-L teacher 16
  (s3) / 24 (s4), Swin-B 8/16, Swin-S 3/6, keyed by the teacher's s3/s4 widths; isotropic token
  students (ViT, DeiT; Mixer by analogy: no official Mixer config was released) 8/8, ``fmd.py``'s
  default; any other teacher width // 64 (rounded down to a divisor). ``num_heads`` overrides.
- Student features: ``forward_intermediates`` without norm, except s4 of an isotropic student
  (ViT, Mixer) when it is the last block: that one is taken after the student's final norm, as the
  official ViT/Mixer backbones append it, so the final norm learns from ScaleKD too.
- DFM: ``L = α0 Σ‖n(S) − n(T)‖²/B + α1 Σ‖n(S − mean_hw S) − n(T − mean_hw T)‖²/B``, n = L2
  normalisation over channels per position; α = (0.08, 0.06). The official frequency view
  (DCT, zero the DC term, inverse DCT) is exactly the spatial-mean removal used here.
  Target: the teacher's final tokens after the final norm (teacher tap ``{index: -1, norm: true}``).
- TPP: the s3 CAP output (the tail's input width and grid, grid tokens without prefix) goes
  through the teacher's frozen tail (``pipeline.tpp.TeacherTail``), gets both DFM losses
  against the target and is the query of the s4 CAP (not detached). The official teacher is in
  train mode, so its tail's drop-path is on; for a cache of a ``teacher.stochastic_depth`` teacher
  the tail here drops paths too while training (same rates, masks seeded by (``seed``, rank,
  step, DFM view): a resume repeats them), never in evaluation.
- ``cap_norm_init``: ``"default"`` (LayerNorm weight 1, bias 0, as the official code) or
  ``"tail_stats"``, which initialises the output LayerNorm of both s3 CAPs (whose output feeds
  the frozen tail) with weight = the per-channel std and bias = the mean of the tail's input
  over the cached views (``pipeline.tpp.load_input_stats``), so the tail starts from inputs on
  the scale it was trained on (the FFN shortcut still adds to it). Not in the paper nor the
  official code; needs ``tpp`` and a cache with those statistics.

Wiring of the two views (as the official ``ClassificationDistiller.loss``): each DFM view has
its own CAP at each stage and its own path, ``S3 → CAP3_v → tail → L_v(s3)`` and
``→ query of CAP4_v(S4) → L_v(s4)``, so the tail runs once per view; the s4 CAP output is
compared with the target directly. With ``tpp: false`` (no pack in the cache) both CAPs
project straight to the target with learnable queries.

The frozen tail is held in the instance ``__dict__`` rather than registered as a submodule:
it never appears in ``parameters()``, ``state_dict()`` or ``modules()``, so neither the
optimizer nor checkpoints see it (it comes from the cache), while autograd still
differentiates through it into the CAPs and the student. It is moved to the input's device
on first use; its parameters have ``requires_grad=False`` and it stays in eval mode (its
drop-path, when on, is driven by ``pipeline.stochastic_depth``, not by the module's mode).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from pipeline.stochastic_depth import StochasticDepth
from pipeline.tpp import TailInputStats, TeacherTail
from storage_schemas.errors import CacheMismatchError, ConfigError
from storage_schemas.layout import TPP_STATS
from storage_schemas.taps import TapSpec
from student.targets import TeacherTargets

from .base import (
    KDMethod,
    MethodOptions,
    Needs,
    StudentInfo,
    StudentOutput,
    TeacherContext,
    register,
    tap_spec_value,
    tap_tokens,
)
from .projectors import CrossAttentionProjector, official_heads

VIEWS = ("spat", "freq")


def dfm_spatial(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Σ‖n(S) − n(T)‖² / B over [B, N, C] tokens, n = L2 normalisation over C per token."""
    return (F.normalize(s.float(), dim=-1) - F.normalize(t.float(), dim=-1)).pow(2).sum() / s.shape[0]


def dfm_frequency(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """:func:`dfm_spatial` after removing each channel's mean over the N positions (= zeroing the DCT DC term)."""
    return dfm_spatial(s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True))


DFM = {"spat": dfm_spatial, "freq": dfm_frequency}


class ScaleKDOptions(MethodOptions):
    alpha: tuple[float, float] = Field((0.08, 0.06), description="(spatial, frequency) DFM weights")
    target_tap: TapSpec = TapSpec(name="final", index=-1, norm=True)
    student_indices: tuple[int, int] | None = Field(None, description="s3, s4; None: see module docstring")
    tpp: bool = Field(True, description="teacher parameter perception through the cached frozen tail")
    softmax_scale: float = Field(5.0, gt=0, description="5.0 in every official CNN/MLP/ViT student config")
    num_heads: int | tuple[int, int] | None = Field(
        None, description="CAP heads, one count or (s3, s4); None: the official counts (see the module docstring)")
    query_proj: bool = Field(True, description="Linear + ReLU on the queries (official proj_pos)")
    cap_norm_init: Literal["default", "tail_stats"] = Field(
        "default", description="s3 CAP output LayerNorm init: default (official) or tail_stats (see module docstring)")
    seed: int = Field(0, description="seeds the TPP tail's drop-path in training (caches of a teacher.stochastic_depth "
                      "teacher)")

    _taps = field_validator("target_tap", mode="before")(tap_spec_value)


def default_student_indices(student: StudentInfo) -> tuple[int, int]:
    L = student.num_levels
    if L < 2:
        raise ConfigError(f"ScaleKD: the student has {L} feature level(s); it needs two")
    if student.isotropic:
        return min(math.ceil(3 * L / 4) - 1, L - 2), L - 1
    return L - 2, L - 1


@register("scalekd")
class ScaleKD(KDMethod):
    """ScaleKD feature losses: CAP + DFM at s3 and s4, with TPP through the frozen teacher tail."""

    Options = ScaleKDOptions

    def __init__(self, opts: ScaleKDOptions, student: StudentInfo, teacher: TeacherContext) -> None:
        super().__init__(opts, student, teacher)
        target = teacher.tap(opts.target_tap, "ScaleKD")
        if target.grid is None:
            raise CacheMismatchError(f"ScaleKD: teacher tap {target.name!r} has no token grid")
        self.target = target
        nt, ct = target.grid[0] * target.grid[1], target.dim
        idx = opts.student_indices or default_student_indices(student)
        self.s3_index, self.s4_index = (student.resolve(i) for i in idx)
        n3, c3 = nt, ct
        if opts.tpp:
            tail = teacher.tail
            if tail is None:
                raise CacheMismatchError("ScaleKD tpp=true needs the teacher's frozen tail (cache with targets.tpp: "
                                         "{tail: 1}; load it with pipeline.tpp.load_pack) or set scalekd.tpp=false")
            spec_in, spec_out = tail.spec.input, tail.spec.output
            if tuple(spec_out.grid) != tuple(target.grid) or spec_out.dim != ct:
                raise CacheMismatchError(f"ScaleKD: the TPP tail outputs grid {list(spec_out.grid)} x {spec_out.dim}, "
                                         f"the target tap {target.name!r} is {list(target.grid)} x {ct}")
            n3, c3 = spec_in.grid[0] * spec_in.grid[1], spec_in.dim
        self.__dict__["_tail"] = tail if opts.tpp else None  # unregistered: see module docstring
        # The official teacher is in train mode, its tail's drop-path too, when the cache's teacher was
        # (teacher.stochastic_depth): the same rates, masks drawn per step as in pipeline.stochastic_depth.
        self.__dict__["_tail_sd"] = (StochasticDepth(tail, "the TPP tail", required=False)
                                     if opts.tpp and teacher.stochastic_depth else None)

        h = opts.num_heads
        self.heads = official_heads(student, c3, ct) if h is None else (h, h) if isinstance(h, int) else tuple(h)
        # s4 of an isotropic student that is its last block: after the final norm (the official backbones)
        self.s4_normed = student.vit_like and student.isotropic and self.s4_index == student.num_levels - 1
        c4, *self.s4_hw = student.shapes[self.s4_index]
        if self.s4_normed and student.final_tokens != (self.s4_hw[0] * self.s4_hw[1], c4):
            raise ConfigError(f"ScaleKD: the student's final tokens {student.final_tokens} do not form its last "
                              f"block's map {student.shapes[self.s4_index]}")

        def cap(index: int, dim: int, n: int, heads: int, learn_query: bool) -> CrossAttentionProjector:
            return CrossAttentionProjector(student.shapes[index], dim, n, num_heads=heads,
                                           softmax_scale=opts.softmax_scale, learn_query=learn_query,
                                           query_proj=opts.query_proj, layernorm2d=student.layernorm2d)

        self.s3 = nn.ModuleDict({v: cap(self.s3_index, c3, n3, self.heads[0], True) for v in VIEWS})
        self.s4 = nn.ModuleDict({v: cap(self.s4_index, ct, nt, self.heads[1], not opts.tpp) for v in VIEWS})
        if opts.cap_norm_init == "tail_stats":
            self.init_cap_norm(teacher.tail_stats, c3)

    @torch.no_grad()
    def init_cap_norm(self, stats: TailInputStats | None, dim: int) -> None:
        """s3 CAPs' output LayerNorm: weight = std [C3], bias = mean [C3] of the tail's cached input."""
        if not self.opts.tpp:
            raise ConfigError("ScaleKD cap_norm_init='tail_stats' initialises the s3 CAPs that feed the TPP tail; "
                             "it needs scalekd.tpp=true (or set scalekd.cap_norm_init=default)")
        if stats is None:
            raise CacheMismatchError(f"ScaleKD cap_norm_init='tail_stats' needs the statistics of the TPP tail's input "
                             f"({TPP_STATS}, written when a cache with targets.tpp completes; loaded with "
                             "pipeline.tpp.load_input_stats); this cache has none: set scalekd.cap_norm_init=default")
        if stats.mean.shape != (dim,):
            raise CacheMismatchError(f"ScaleKD cap_norm_init='tail_stats': the statistics have {stats.mean.numel()} "
                             f"channels, the TPP tail takes {dim}")
        for v in VIEWS:
            self.s3[v].norm.weight.copy_(stats.std)
            self.s3[v].norm.bias.copy_(stats.mean)

    @property
    def tail(self) -> TeacherTail | None:
        return self.__dict__["_tail"]

    @classmethod
    def requires(cls, opts: ScaleKDOptions) -> Needs:
        return Needs(taps=(opts.target_tap,), tpp=opts.tpp)

    def student_indices(self) -> tuple[int, ...]:
        return (self.s3_index,) if self.s4_normed else (self.s3_index, self.s4_index)

    def s4_map(self, out: StudentOutput) -> torch.Tensor:
        """The student's s4 map [B, C, H, W]: its final tokens after the final norm when ``s4_normed``."""
        if not self.s4_normed:
            return out.features[self.s4_index]
        return out.final_tokens.transpose(1, 2).unflatten(-1, self.s4_hw)

    def run_tail(self, x: torch.Tensor, draw: int = 0) -> torch.Tensor:
        """[B, N3, C3] s3 CAP output → [B, Nt, Ct] through the frozen tail, differentiable in ``x``; with a
        stochastic-depth teacher, in training, its drop-path masks are draw ``draw`` of this step."""
        p = next(self.tail.parameters())
        if p.device != x.device:
            self.tail.to(x.device)
        sd = self.__dict__["_tail_sd"]
        if sd is None or not sd.modules or not self.training:
            return self.tail(x.to(p.dtype)).to(x.dtype)
        # each call its own draw (``draw``: the DFM view), as each train-mode forward of the official tail
        g = self.step_generator(x.device, draw, len(VIEWS))
        with sd.masks(sd.random_masks(x.shape[0], g)):
            return self.tail(x.to(p.dtype)).to(x.dtype)

    def forward(self, out: StudentOutput, targets: TeacherTargets, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        t = tap_tokens(targets, self.target)
        s3, s4 = out.features[self.s3_index], self.s4_map(out)
        losses = {}
        for i, v in enumerate(VIEWS):
            y3 = self.s3[v](s3)
            if self.tail is not None:
                y3 = self.run_tail(y3, i)
            y4 = self.s4[v](s4, y3 if self.tail is not None else None)
            losses[f"loss_scalekd_s3_{v}"] = self.opts.alpha[i] * DFM[v](y3, t)
            losses[f"loss_scalekd_s4_{v}"] = self.opts.alpha[i] * DFM[v](y4, t)
        return losses
