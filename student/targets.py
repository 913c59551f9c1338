"""Teacher targets of a batch, decoded from cache rows by the cache's own codecs.

Cached rows and the online teacher (``pipeline.targets.encode_targets`` on live outputs) both
arrive here as the same rows, so cached and online KD see identical targets by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from storage_schemas.codecs import LOGITS_TARGET, TokenCodec, TopK
from storage_schemas.manifest import Manifest


@dataclass
class TeacherTargets:
    """Teacher outputs for a batch of B views, fp32 on the training device.

    Logits come either full (``logits`` [B, C]) or as top-k (``topk``: raw logits, class indices and the
    logsumexp over all classes; ``topk.log_probs`` is the teacher's log-softmax at T = 1 on the kept
    classes). ``features[tap]`` is [B, N, D] tokens, ``grids[tap]`` their (H, W). ``num_classes`` is C
    either way.
    """

    num_classes: int
    logits: torch.Tensor | None = None
    topk: TopK | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    grids: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    @property
    def has_logits(self) -> bool:
        return self.logits is not None or self.topk is not None

    @classmethod
    def decode(cls, rows: Mapping[str, torch.Tensor], m: Manifest, device: str | torch.device | None = None,
               taps: Sequence[str] | None = None) -> TeacherTargets:
        """Decode a batch's rows (``[B, ...]`` per array name, torch) with the cache's codecs; targets whose
        arrays are absent from ``rows`` (not read), or taps not in ``taps``, are left empty."""
        out = cls(num_classes=m.teacher.num_classes)
        for codec in m.codecs():
            is_tap = isinstance(codec, TokenCodec)
            if not all(n in rows for n in codec.names) or (is_tap and taps is not None and codec.tap.name not in taps):
                continue
            mine = {n: rows[n] if device is None else rows[n].to(device, non_blocking=True) for n in codec.names}
            value = codec.decode(mine)
            if is_tap:
                out.features[codec.tap.name] = value
                out.grids[codec.tap.name] = tuple(codec.tap.grid) if codec.tap.grid else None
            elif codec.target == LOGITS_TARGET and isinstance(value, TopK):
                out.topk = value
            else:
                out.logits = value
        return out
