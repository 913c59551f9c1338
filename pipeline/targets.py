"""Target extraction: teacher outputs of a batch → the rows of every stored target, through the
cache's codecs (:mod:`storage_schemas.codecs`).

Written once and used by the caching job, the trainer's online teacher and ``verify``: what a
live teacher produces is encoded exactly as the cache stores it, so the two can be compared, or
substituted for each other, value for value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from storage_schemas import arrays as A
from storage_schemas.codecs import Codec, FidelityAcc, TokenCodec

from .teacher import TeacherOutput


def input_fingerprint(x: torch.Tensor, size: int) -> torch.Tensor:
    """Teacher input [B, 3, H, W] → [B, 3*size*size] fp16 area-averaged thumbnail.

    Stored per view so that ``verify`` and the trainer can check that a replayed view is
    the view the teacher saw (replay fidelity), at a few bytes per view.
    """
    return F.adaptive_avg_pool2d(x.float(), size).flatten(1).half()


def encode_targets(out: TeacherOutput, codecs: Sequence[Codec]) -> tuple[dict[str, torch.Tensor], dict[str, FidelityAcc]]:
    """Rows ``[B, ...]`` of the teacher's prediction and of every codec's arrays (on the teacher's device,
    in the stored dtypes), and each target's fidelity. Token codecs take their tap from ``out.features``,
    the others the logits."""
    rows: dict[str, torch.Tensor] = {A.PRED_TOP1: out.logits.argmax(-1).to(torch.int32)}
    fid: dict[str, FidelityAcc] = {}
    for codec in codecs:
        x = out.features[codec.tap.name] if isinstance(codec, TokenCodec) else out.logits
        r, fid[codec.target] = codec.encode(x)
        rows.update(r)
    return rows, fid


def to_numpy(rows: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: t.cpu().numpy() for n, t in rows.items()}
