"""Vanilla KD (Hinton et al. 2015; at scale: VanillaKD, Hao et al. 2023), from cached logits.

``L_kd = T² · mean_b Σ_c p_t log(p_t / p_s)``, ``p = softmax(z / T)``, T = 1
(reference/methods.md, "Vanilla KD"). ``soft_ce`` swaps the KL for the soft cross-entropy
``-T² · mean_b Σ_c p_t log p_s`` (same gradients; ScaleKD uses it with weight 0.5).

Top-k cached logits (``TeacherTargets.topk``) keep, per view, the k largest raw teacher
logits, the logsumexp over all C classes and the log of the mass on the unkept classes, so
``p_t(c) = exp(z_c - lse)`` is exact for the kept classes at T = 1 and the classes not kept carry
the known mass ``r`` (stored from the fp32 logits; caches before schema 1.4 lack it, and ``r`` is
then rebuilt as ``1 - Σ_kept p_t`` from the fp16 values — for a peaked teacher that loses most of
``r`` to rounding, so those caches train with a warning) but unknown individual values. Both distributions are compared over the same K + 1
**buckets**: the k kept classes and one "rest" bucket (teacher: ``r``; student: its total
probability on the C - k classes not kept). At T = 1 this is exact coarse-graining: the loss
is the KL between the bucketed distributions, which by the chain rule equals the full KL
minus ``r · KL(p_t(·|rest) ‖ p_s(·|rest))``: never larger than the full-logit loss, equal to it
when k = C, and blind only to how the student spreads mass *inside* the rest.
For T ≠ 1 the teacher's rest mass at temperature T cannot be known, so the C - k unkept
teacher logits are taken as equal (each class gets ``r / (C - k)`` at T = 1, the maximum-entropy
choice given ``r``); the rest bucket's teacher logit is then ``log(C - k) + log(r / (C - k)) / T``.
This is exact only when the unkept teacher logits are in fact equal; measured against full logits
its gradients are far off (cosine 0.24–0.76 at T = 4), so it is refused unless asked for
(``allow_topk_temperature``), naming the exact alternative: a cache with all logits. Every seed
recipe uses T = 1.

What is logged: with top-k logits ``loss_kd`` is the loss over the k + 1 buckets — at T = 1 the full
KL less the teacher-weighted KL inside the rest, so ≤ the full-logit value and not comparable with
a full-logit run's log (the official code's); with all logits it is the full loss.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from pydantic import Field

from storage_schemas.errors import ConfigError
from student.targets import TeacherTargets

from .base import KDMethod, MethodOptions, Needs, StudentInfo, StudentOutput, TeacherContext, register

__all__ = ["KD", "LogitBuckets", "bucket_logits", "check_topk", "logit_buckets", "xlogy_sum"]

log = logging.getLogger(__name__)


@dataclass
class LogitBuckets:
    """Teacher and student logits over the teacher's kept classes (all C for full logits).

    ``index`` [B, K] kept classes; ``t_logp`` [B, K] exact teacher log-probs at T = 1;
    ``t_rest`` [B] log of the teacher's mass on the ``rest_count = C - K`` other classes
    (``-inf`` when none); ``s_logits`` [B, C] student logits, fp32.
    """

    index: torch.Tensor
    t_logp: torch.Tensor
    t_rest: torch.Tensor
    rest_count: int
    s_logits: torch.Tensor


def logit_buckets(s_logits: torch.Tensor, targets: TeacherTargets) -> LogitBuckets:
    """Student logits [B, C] and the cached teacher logits (full or top-k) → :class:`LogitBuckets`."""
    s = s_logits.float()
    B, C = s.shape
    if targets.num_classes != C:
        raise ConfigError(f"student has {C} classes, the teacher's logits {targets.num_classes}")
    if targets.logits is not None:
        index = torch.arange(C, device=s.device).expand(B, C)
        t_logp = targets.logits.float().log_softmax(-1)
        return LogitBuckets(index, t_logp, t_logp.new_full((B,), -math.inf), 0, s)
    if targets.topk is None:
        raise ValueError("teacher targets hold no logits (cache with targets.logits)")
    t_logp = targets.topk.log_probs
    k = t_logp.shape[1]
    if targets.topk.rest_logmass is not None:  # stored from the fp32 logits (schema ≥ 1.4): exact
        return LogitBuckets(targets.topk.indices, t_logp, targets.topk.rest_logmass.float(), C - k, s)
    # an older cache: the rest rebuilt from the fp16 kept values (see OLD_CACHE_REST); rounding can make the
    # kept mass exceed 1 by a hair, the rest is then empty
    rest = (1.0 - t_logp.double().exp().sum(-1)).clamp_min(0.0).float() if k < C else t_logp.new_zeros(B)
    return LogitBuckets(targets.topk.indices, t_logp, rest.log(), C - k, s)


def bucket_logits(
    b: LogitBuckets, temperature: float, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student logits over K + 1 buckets (kept classes, rest) at temperature T.

    ``log_softmax`` of either gives that model's bucket log-probs at T. ``exclude`` [B] removes
    one class per row from both (NKD's non-target distribution): its bucket if kept, else one
    equal share of the teacher's rest and that class from the student's rest.
    """
    T = float(temperature)
    B, C = b.s_logits.shape
    t_kept = b.t_logp / T
    s_kept = b.s_logits.gather(1, b.index) / T
    m = torch.full((B,), b.rest_count, device=b.s_logits.device, dtype=torch.float32)
    rest_mask = None
    if b.rest_count:
        rest_mask = torch.ones(B, C, dtype=torch.bool, device=b.s_logits.device).scatter(1, b.index, False)
    if exclude is not None:
        ex = exclude.view(B, 1)
        hit = b.index == ex
        t_kept = t_kept.masked_fill(hit, -math.inf)
        s_kept = s_kept.masked_fill(hit, -math.inf)
        if rest_mask is not None:
            m = m - rest_mask.gather(1, ex).squeeze(1).float()
            rest_mask = rest_mask.scatter(1, ex, False)
    if rest_mask is None:
        t_rest = s_rest = b.t_logp.new_full((B,), -math.inf)
    else:
        share = b.t_rest - math.log(b.rest_count)  # each unkept class's teacher log-prob at T = 1
        t_rest = torch.where(m > 0, m.clamp_min(1).log() + share / T, -math.inf)
        s_rest = (b.s_logits / T).masked_fill(~rest_mask, -math.inf).logsumexp(-1)
    return torch.cat([t_kept, t_rest[:, None]], 1), torch.cat([s_kept, s_rest[:, None]], 1)


def xlogy_sum(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``Σ_j p_j log q_j`` per row [B], with ``0 · log 0 = 0`` (empty buckets)."""
    return torch.where(p > 0, p * log_q.clamp_min(torch.finfo(log_q.dtype).min), 0.0).sum(-1)


OLD_CACHE_REST = ("%s: this cache stores no rest mass (written before schema 1.4); the teacher's mass on the "
                  "unkept classes is rebuilt from fp16 values and is inexact for a peaked teacher. Rebuild the cache "
                  "(kdcache cache) for exact top-k KD.")


def check_topk(teacher: TeacherContext, temperature: float, allow_topk_temperature: bool, who: str) -> None:
    """Refuse T ≠ 1 with top-k cached logits unless asked for; warn when the cache lacks the rest mass."""
    lg = teacher.logits
    if lg is None or lg.mode != "topk" or lg.k >= lg.num_classes:
        return
    if temperature != 1 and not allow_topk_temperature:
        raise ConfigError(
            f"{who}.temperature={temperature:g} with top-{lg.k} cached logits: the teacher's {lg.num_classes - lg.k} "
            "unkept logits are unknown, and no rest bucket recovers the loss at T ≠ 1 (gradient cosine to full "
            "logits 0.24–0.76 at T = 4). Cache all logits (targets.logits: {mode: full}) for exact KD at any "
            f"temperature, use temperature 1, or set method_options.{who}.allow_topk_temperature: true to accept "
            "the equal-unkept-logits approximation")
    if not lg.rest_logmass:
        log.warning(OLD_CACHE_REST, who)


class KDOptions(MethodOptions):
    weight: float = Field(1.0, ge=0, description="VanillaKD: 1.0; ScaleKD: 0.5 (with soft_ce)")
    temperature: float = Field(1.0, gt=0)
    soft_ce: bool = Field(False, description="soft cross-entropy -Σ p_t log p_s instead of KL")
    allow_topk_temperature: bool = Field(
        False, description="temperature ≠ 1 from top-k logits: take the unkept logits as equal (approximate)")


@register("kd")
class KD(KDMethod):
    """Logit KD: T² · mean_b KL(p_t ‖ p_s) (or soft CE), from full or top-k cached logits."""

    Options = KDOptions

    def __init__(self, opts: KDOptions, student: StudentInfo, teacher: TeacherContext) -> None:
        super().__init__(opts, student, teacher)
        check_topk(teacher, opts.temperature, opts.allow_topk_temperature, "kd")

    @classmethod
    def requires(cls, opts: KDOptions) -> Needs:
        return Needs(logits=True)

    def forward(self, out: StudentOutput, targets: TeacherTargets, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        T = self.opts.temperature
        t, s = bucket_logits(logit_buckets(out.logits, targets), T)
        t_logp, s_logp = t.log_softmax(-1), s.log_softmax(-1)
        p = t_logp.exp()
        per_row = -xlogy_sum(p, s_logp)
        if not self.opts.soft_ce:
            per_row = per_row + xlogy_sum(p, t_logp)
        return {"loss_kd": self.opts.weight * T * T * per_row.mean()}
