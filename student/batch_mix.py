"""timm's batch-mode Mixup/CutMix with the teacher in the loop (``--online-teacher`` on a cache of unmixed views).

A cache can hold targets for a mixed image only if it was built with the mix (``views.mix``, replayed by the
dataset, :mod:`pipeline.views`). With the teacher in the loop there is no such limit: the teacher sees whatever
the student sees, so ``data.mixup`` / ``data.cutmix`` on an unmixed cache with ``online_teacher`` mix each batch
as timm's training script does (``timm.data.Mixup``, mode ``batch``: one λ and mode per batch, sample i mixed
with sample B−1−i, λ corrected to the pasted area for CutMix), before the teacher and the student see it. This is
the online reference the cached mixed views are compared with (README, "Training from mixed caches"; the
VanillaKD recipes of reference/methods.md mix this way).

The student's and the teacher's inputs are the same views at two normalisations; timm's ``Mixup`` mixes one
tensor, so both are stacked on the channel axis and mixed by one call (mixing is per pixel and the same affine
normalisation commutes with it), which needs the two inputs at one size. Each step's λ, mode and box come from
NumPy's global generator (where timm draws them), reseeded with (seed, rank, step) and restored afterwards: a step's
mix is the same after a resume, each DDP rank draws its own (as timm's per-rank seeds do), and nothing else's
random stream moves.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup

from storage_schemas.errors import ConfigError


class BatchMix:
    """``BatchMix(mixup, cutmix, num_classes, seed, rank)(x, x_teacher, labels, step)`` → mixed ``x``, ``x_teacher`` and
    [B, C] labels (timm's ``mixup_target`` without smoothing; the ``ce`` method smooths soft labels itself, see
    :func:`student.batch.mix_labels`)."""

    def __init__(self, mixup: float, cutmix: float, num_classes: int, seed: int, rank: int = 0) -> None:
        self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.0, num_classes=num_classes)
        self.seed, self.rank = seed, rank

    @staticmethod
    def check_sizes(student_size: int, teacher_size: int) -> None:
        if student_size != teacher_size:
            raise ConfigError(f"data.mixup/data.cutmix with the online teacher mix the student's and the teacher's "
                              f"inputs as one batch, which needs one size: the student's input is {student_size} px, "
                              f"the teacher's {teacher_size} px; set student.input_size: {teacher_size}, or build a "
                              "cache with views.mix and train from it")

    def __call__(self, x: torch.Tensor, x_teacher: torch.Tensor, labels: torch.Tensor,
                 step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        both = torch.cat([x, x_teacher.to(x.device, x.dtype)], dim=1)
        even = len(both) - len(both) % 2  # timm pairs i with B-1-i; an odd batch's last sample stays unmixed
        state = np.random.get_state()
        np.random.seed([self.seed, self.rank, step])
        try:
            mixed, soft = self.mix(both[:even], labels[:even])  # mixes both[:even] in place
        finally:
            np.random.set_state(state)
        if even < len(both):
            rest = torch.nn.functional.one_hot(labels[even:].long(), soft.shape[1]).to(soft)
            soft = torch.cat([soft, rest])
        c = x.shape[1]
        return both[:, :c], both[:, c:], soft
