"""Ground-truth classification loss, the ``L_gt`` / ``L_cls`` term every KD recipe adds
(reference/methods.md): cross-entropy with label smoothing 0.1 (ViTKD, ScaleKD with weight
0.5) or timm-style binary cross-entropy (VanillaKD's strong recipes, ``loss: bce``).

- ``ce``: ``-mean_b Σ_c q_c log softmax(z)_c``, ``q = (1 - ε) onehot(y) + ε / C``
  (``torch.nn.functional.cross_entropy(label_smoothing=ε)``); [B, C] probability labels
  (mixup) are smoothed the same way.
- ``bce``: as timm's ``BinaryCrossEntropy``: targets ``off = ε / C``, ``on = 1 - ε + off``
  (probability labels: ``q (1 - ε) + ε / C``), optionally binarised at ``bce_target_thresh``;
  ``BCEWithLogits`` averaged over batch and classes, or summed over classes (``bce_sum``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from student.targets import TeacherTargets

from .base import KDMethod, MethodOptions, StudentOutput, register


class CEOptions(MethodOptions):
    weight: float = Field(1.0, ge=0, description="1.0 (VanillaKD, ViTKD); 0.5 in ScaleKD")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    loss: Literal["ce", "bce"] = "ce"
    bce_target_thresh: float | None = Field(None, gt=0, lt=1, description="bce: binarise targets above it")
    bce_sum: bool = Field(False, description="bce: sum over classes instead of mean")


@register("ce")
class CE(KDMethod):
    """Label-smoothed cross-entropy (or timm-style BCE) against the ground-truth labels."""

    Options = CEOptions

    def forward(self, out: StudentOutput, targets: TeacherTargets, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        z = out.logits.float()
        eps = self.opts.label_smoothing
        if self.opts.loss == "ce":
            loss = F.cross_entropy(z, labels if labels.ndim == 2 else labels.long(), label_smoothing=eps)
            return {"loss_ce": self.opts.weight * loss}
        C = z.shape[-1]
        if labels.ndim == 1:
            q = torch.full_like(z, eps / C).scatter_(1, labels.long()[:, None], 1.0 - eps + eps / C)
        else:
            q = labels.float() * (1.0 - eps) + eps / C
        if self.opts.bce_target_thresh is not None:
            q = (q > self.opts.bce_target_thresh).to(z.dtype)
        per = F.binary_cross_entropy_with_logits(z, q, reduction="none")
        loss = per.sum(-1).mean() if self.opts.bce_sum else per.mean()
        return {"loss_ce": self.opts.weight * loss}
