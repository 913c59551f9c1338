"""ViTKD (Yang et al., "ViTKD: Practical Guidelines for ViT feature knowledge distillation",
2022), reference/methods.md "ViTKD"; official code yzd-v/cls_KD ``ViTKDLoss``.

Taps, teacher and student alike, patch tokens only: the outputs of blocks 0 and 1 (after
the FFN residual, no norm; teacher taps ``{index: 0}``/``{index: 1}``, student ``forward_intermediates``
indices 0 and 1) and the last block after the final norm (teacher tap ``{index: -1, norm: true}``;
student ``StudentOutput.final_tokens``). The cache serves them under any names.

- Shallow mimicking: ``L_lr = α Σ_{l∈{0,1}} ‖W_l F^S_l − F^T_l‖² / B``, ``W_l`` a
  Linear(Ds→Dt) per layer (identity when the widths match), sum-reduced, α = 3e-5.
- Deep generation: ``x = Linear(Ds→Dt)(F^S_last)``; a fraction λ = 0.5 of the tokens of each
  sample is replaced by a learnable mask token (init 0); tokens → grid; ``G`` = Conv3x3 →
  ReLU → Conv3x3 (Dt→Dt); ``L_gen = β Σ M ⊙ (G(x) − F^T)² / B`` over masked positions M,
  β = 3e-6. The official code also divides by λ (``divide_by_lambda``, default true, so the
  published β applies unchanged).

Masking picks exactly ``N − int(N (1 − λ))`` tokens per sample (as the official code) from a
``torch.Generator`` seeded with (``seed``, distributed rank, ``step``): the trainer sets the
optimizer step with ``set_step`` before each forward, so a run and its resume draw the same
masks; without it, the method counts its own training forwards.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from storage_schemas.errors import ConfigError
from storage_schemas.taps import TapSpec
from student.targets import TeacherTargets

from .base import (
    KDMethod,
    MethodOptions,
    Needs,
    StudentInfo,
    StudentOutput,
    TeacherContext,
    feature_tokens,
    register,
    tap_spec_value,
    tap_tokens,
)


class ViTKDOptions(MethodOptions):
    alpha: float = Field(3e-5, ge=0, description="shallow mimicking weight")
    beta: float = Field(3e-6, ge=0, description="deep generation weight")
    mask_ratio: float = Field(0.5, gt=0, lt=1, description="λ, fraction of masked tokens per sample")
    divide_by_lambda: bool = Field(True, description="L_gen / λ, as the official code")
    shallow_taps: tuple[TapSpec, ...] = (TapSpec(name="block0", index=0), TapSpec(name="block1", index=1))
    student_shallow: tuple[int, ...] = Field((0, 1), description="student forward_intermediates indices")
    deep_tap: TapSpec = TapSpec(name="final", index=-1, norm=True)
    seed: int = 0

    _taps = field_validator("shallow_taps", "deep_tap", mode="before")(tap_spec_value)

    @model_validator(mode="after")
    def _pairs(self) -> ViTKDOptions:
        if len(self.shallow_taps) != len(self.student_shallow):
            raise ValueError(f"shallow_taps {self.shallow_taps} and student_shallow {self.student_shallow} "
                             "must pair up one to one")
        return self


def _linear_or_identity(ds: int, dt: int) -> nn.Module:
    return nn.Identity() if ds == dt else nn.Linear(ds, dt)


@register("vitkd")
class ViTKD(KDMethod):
    """ViTKD: shallow mimicking of blocks 0/1 plus masked generation of the last block."""

    Options = ViTKDOptions

    def __init__(self, opts: ViTKDOptions, student: StudentInfo, teacher: TeacherContext) -> None:
        super().__init__(opts, student, teacher)
        who = "ViTKD"
        self.shallow = [teacher.tap(t, who) for t in opts.shallow_taps]
        self.deep = teacher.tap(opts.deep_tap, who)
        self.student_idx = tuple(student.resolve(i) for i in opts.student_shallow)
        for f, i in zip(self.shallow, self.student_idx, strict=True):
            c, h, w = student.shapes[i]
            if h * w != f.tokens - f.prefix_tokens:
                raise ConfigError(f"ViTKD: student level {i} has {h}x{w} tokens, teacher tap {f.name!r} "
                                 f"{f.tokens - f.prefix_tokens} patch tokens; the grids must match")
        n, ds = student.final_tokens
        if self.deep.grid is None or n != self.deep.grid[0] * self.deep.grid[1]:
            raise ConfigError(f"ViTKD: student has {n} final tokens, teacher tap {self.deep.name!r} grid "
                             f"{self.deep.grid}; the token grids must match")
        dt = self.deep.dim
        self.align_shallow = nn.ModuleList(
            _linear_or_identity(student.shapes[i][0], f.dim) for f, i in zip(self.shallow, self.student_idx, strict=True)
        )
        self.align_deep = _linear_or_identity(ds, dt)
        self.mask_token = nn.Parameter(torch.zeros(dt))
        self.generation = nn.Sequential(
            nn.Conv2d(dt, dt, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(dt, dt, 3, padding=1)
        )

    @classmethod
    def requires(cls, opts: ViTKDOptions) -> Needs:
        return Needs(taps=(*opts.shallow_taps, opts.deep_tap))

    def student_indices(self) -> tuple[int, ...]:
        return self.student_idx

    def random_mask(self, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
        """[B, N] bool, True on the ``N − int(N (1 − λ))`` masked tokens of each sample."""
        g = self.step_generator(device)
        keep = int(tokens * (1 - self.opts.mask_ratio))
        order = torch.rand(batch, tokens, generator=g, device=device).argsort(1)
        return torch.ones(batch, tokens, dtype=torch.bool, device=device).scatter(1, order[:, :keep], False)

    def forward(self, out: StudentOutput, targets: TeacherTargets, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        B = out.logits.shape[0]
        loss_lr = out.logits.new_zeros((), dtype=torch.float32)
        for f, i, align in zip(self.shallow, self.student_idx, self.align_shallow, strict=True):
            s = align(feature_tokens(out.features[i]))
            loss_lr = loss_lr + (s.float() - tap_tokens(targets, f).float()).pow(2).sum()
        x = self.align_deep(out.final_tokens)
        _, N, D = x.shape
        m = self.random_mask(B, N, x.device)
        x = torch.where(m[..., None], self.mask_token.to(x.dtype), x)
        h, w = self.deep.grid
        g = self.generation(x.transpose(1, 2).reshape(B, D, h, w)).flatten(2).transpose(1, 2)
        diff = (g.float() - tap_tokens(targets, self.deep).float()).pow(2) * m[..., None]
        loss_gen = diff.sum() / B * self.opts.beta
        if self.opts.divide_by_lambda:
            loss_gen = loss_gen / self.opts.mask_ratio
        if self.training:
            self.step += 1
        return {"loss_vitkd_lr": self.opts.alpha * loss_lr / B, "loss_vitkd_gen": loss_gen}
