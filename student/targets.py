"""Teacher targets of a batch, decoded from cache arrays — the one place that reads them.

Cached rows and the online teacher (``pipeline.targets.extract_targets`` on live
outputs) both arrive here as the same arrays, so cached and online KD see identical
targets by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.targets import dequantize_int8
from storage_schemas import arrays as A
from storage_schemas.manifest import Manifest


@dataclass
class TeacherTargets:
    """Teacher outputs for a batch of B views, fp32 on the training device.

    Logits come either full (``logits`` [B, C]) or as top-k (``topk_values`` [B, k] raw
    logits, ``topk_indices`` [B, k] int64, ``logsumexp`` [B]: the teacher's log-softmax at
    T=1 on a kept class c is ``value - logsumexp``). ``features[tap]`` is [B, N, D] tokens,
    ``grids[tap]`` their (H, W). ``num_classes`` is C either way.
    """

    num_classes: int
    logits: torch.Tensor | None = None
    topk_values: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    logsumexp: torch.Tensor | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    grids: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    @property
    def has_logits(self) -> bool:
        return self.logits is not None or self.topk_values is not None

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], m: Manifest, device: str | torch.device = "cpu",
                    taps: list[str] | None = None) -> TeacherTargets:
        """Decode the rows of a batch (``[B, ...]`` per array, as read from the cache); targets
        whose arrays are absent from ``arrays`` (not read) are left empty."""

        def t(name: str, dtype=torch.float32) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(arrays[name])).to(device=device, dtype=dtype)

        out = cls(num_classes=m.teacher.num_classes)
        # Decode what the rows hold: a reader that asked for features only gets no logits.
        if A.LOGITS_FULL in arrays:
            out.logits = t(A.LOGITS_FULL)
        elif A.LOGITS_TOPK_VALUES in arrays:
            out.topk_values = t(A.LOGITS_TOPK_VALUES)
            out.topk_indices = t(A.LOGITS_TOPK_INDICES, torch.int64)
            out.logsumexp = t(A.LOGITS_LOGSUMEXP)
        for f in m.features:
            if (taps is not None and f.name not in taps) or A.feature_array(f.name) not in arrays:
                continue
            if f.dtype == "int8":
                out.features[f.name] = dequantize_int8(t(A.feature_array(f.name), torch.int8),
                                                       t(A.feature_scale_array(f.name)))
            else:
                out.features[f.name] = t(A.feature_array(f.name))
            out.grids[f.name] = tuple(f.grid) if f.grid else None
        return out
