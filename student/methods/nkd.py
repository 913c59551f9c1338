"""NKD: normalized KD (Yang et al., "From Knowledge Distillation to Self-Knowledge
Distillation", 2023), as used with ViTKD (reference/methods.md, "ViTKD").

``L_nkd = -mean_b(t_y log s_y) - γ T² mean_b Σ_{c≠y} t̂_c log ŝ_c``: the first term uses the
teacher's probability of the label ``t_y`` (T = 1) and the student's log-probability of it;
the second compares the two *non-target* distributions, ``t̂, ŝ = softmax`` over the classes
``c ≠ y`` at temperature T. T = 1, γ = 1 (ViTKD's setting; the official code's default is 1.5).

From top-k cached logits (see :mod:`student.methods.kd`): the teacher is known exactly on
the k kept classes, and the C - k others share the rest mass ``r``. ``t_y`` is exact when the
label is kept, else the equal share ``r / (C - k)``. The non-target softmax is taken over the
kept classes other than y plus one rest bucket (teacher: the rest, less y's share when y is
not kept; student: its mass on the unkept classes other than y), renormalised after removing
y. With k = C this is exactly the full-logit NKD.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from student.targets import TeacherTargets

from .base import KDMethod, MethodOptions, Needs, StudentInfo, StudentOutput, TeacherContext, register
from .kd import bucket_logits, check_topk, logit_buckets, xlogy_sum


class NKDOptions(MethodOptions):
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    gamma: float = Field(1.0, ge=0, description="weight of the non-target term")
    allow_topk_temperature: bool = Field(
        False, description="temperature ≠ 1 from top-k logits: take the unkept logits as equal (approximate)")


def hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B] class indices, or [B, C] class probabilities (mixup) → [B] int64 (argmax, as official)."""
    return labels.argmax(-1) if labels.ndim == 2 else labels.long()


@register("nkd")
class NKD(KDMethod):
    """NKD: target term at T = 1 plus γ T² · CE between the non-target distributions."""

    Options = NKDOptions

    def __init__(self, opts: NKDOptions, student: StudentInfo, teacher: TeacherContext) -> None:
        super().__init__(opts, student, teacher)
        check_topk(teacher, opts.temperature, opts.allow_topk_temperature, "nkd")

    @classmethod
    def requires(cls, opts: NKDOptions) -> Needs:
        return Needs(logits=True)

    def forward(self, out: StudentOutput, targets: TeacherTargets, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        y = hard_labels(labels).to(out.logits.device)
        b = logit_buckets(out.logits, targets)
        # target term, T = 1
        s_y = b.s_logits.log_softmax(-1).gather(1, y[:, None]).squeeze(1)
        hit = b.index == y[:, None]
        kept_t = torch.where(hit, b.t_logp, -math.inf).logsumexp(-1)  # -inf where y is not kept
        share = b.t_rest - math.log(b.rest_count) if b.rest_count else torch.full_like(kept_t, -math.inf)
        t_y = torch.where(hit.any(-1), kept_t, share).exp()
        loss_t = -(t_y * s_y).mean()
        # non-target term at T, over the buckets without y
        T = self.opts.temperature
        t, s = bucket_logits(b, T, exclude=y)
        loss_non = -self.opts.gamma * T * T * xlogy_sum(t.softmax(-1), s.log_softmax(-1)).mean()
        return {"loss_nkd": self.opts.weight * (loss_t + loss_non)}
