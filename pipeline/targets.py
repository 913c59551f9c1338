"""Target extraction and compression: teacher outputs → the arrays of one work unit.

Written once and used by the caching job and by the trainer's online-teacher path.
Formats (see ``storage_schemas.arrays``):

- logits, top-k: the k largest raw logits (fp16, descending) with their class indices
  and the fp32 logsumexp over *all* classes, so that for every kept class
  ``p_c = exp(z_c - lse)`` is the teacher's softmax at T=1 (FKD/TinyViT keep top-k
  probabilities; keeping raw logits and lse also lets a student rebuild any temperature
  over the kept classes).
- logits, full: all raw logits in fp16.
- features: tokens [N, D] in fp16, or int8 with one fp32 scale per token
  (symmetric absmax: ``x ≈ q * scale``, ``scale = max|x| / 127``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from storage_schemas import arrays as A
from storage_schemas.manifest import FidelityAcc

from .teacher import TeacherOutput


def fidelity(ref: torch.Tensor, approx: torch.Tensor) -> FidelityAcc:
    """Per-row cosine similarity and relative L2 error of ``approx`` against fp32 ``ref`` [B, ...]."""
    r = ref.reshape(ref.shape[0], -1).double()
    a = approx.reshape(approx.shape[0], -1).double()
    cos = F.cosine_similarity(r, a, dim=1, eps=1e-12)
    rel = (a - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-12)
    return FidelityAcc(
        count=r.shape[0],
        cosine_sum=float(cos.sum()),
        cosine_min=float(cos.min()),
        rel_err_sum=float(rel.sum()),
        rel_err_max=float(rel.max()),
    )


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] fp32 → (int8 [..., D], fp32 scale [...]) with symmetric per-token absmax scaling."""
    scale = x.abs().amax(-1) / 127.0
    q = torch.round(x / scale.clamp_min(1e-12).unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale.float()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`: [..., D] int8 and [...] scale → fp32."""
    return q.float() * scale.float().unsqueeze(-1)


def topk_log_probs(values: torch.Tensor, logsumexp: torch.Tensor) -> torch.Tensor:
    """Teacher log-softmax at T=1 on the kept classes: ``values`` [B, k], ``logsumexp`` [B] → [B, k]."""
    return values.float() - logsumexp.float().unsqueeze(-1)


def compress_logits(logits: torch.Tensor, mode: str, k: int) -> tuple[dict[str, np.ndarray], FidelityAcc]:
    """[B, C] fp32 logits → cache arrays for ``mode`` ('topk'|'full') and their fidelity.

    Fidelity compares the teacher's probabilities rebuilt from what is stored with the
    fp32 softmax, over all classes (top-k: classes not kept count as zero).
    """
    logits = logits.float()
    probs = logits.softmax(-1)
    if mode == "full":
        stored = logits.half()
        rebuilt = stored.float().softmax(-1)
        return {A.LOGITS_FULL: stored.cpu().numpy()}, fidelity(probs, rebuilt)
    k = min(k, logits.shape[-1])
    values, indices = logits.topk(k, dim=-1)  # sorted, descending
    lse = torch.logsumexp(logits, -1)
    stored = values.half()
    rebuilt = torch.zeros_like(probs).scatter_(-1, indices, topk_log_probs(stored, lse).exp())
    index_dtype = np.dtype(A.index_dtype(logits.shape[-1]))
    out = {
        A.LOGITS_TOPK_VALUES: stored.cpu().numpy(),
        A.LOGITS_TOPK_INDICES: indices.cpu().numpy().astype(index_dtype),
        A.LOGITS_LOGSUMEXP: lse.cpu().numpy().astype(np.float32),
    }
    return out, fidelity(probs, rebuilt)


def compress_features(tap: str, x: torch.Tensor, dtype: str) -> tuple[dict[str, np.ndarray], FidelityAcc]:
    """[B, N, D] fp32 tokens → arrays of tap ``tap`` in ``dtype`` ('fp16'|'int8') and fidelity."""
    if dtype == "fp16":
        stored = x.half()
        return {A.feature_array(tap): stored.cpu().numpy()}, fidelity(x, stored.float())
    if dtype == "int8":
        q, scale = quantize_int8(x)
        out = {A.feature_array(tap): q.cpu().numpy(), A.feature_scale_array(tap): scale.cpu().numpy()}
        return out, fidelity(x, dequantize_int8(q, scale))
    raise ValueError(f"feature dtype {dtype!r}: expected 'fp16' or 'int8'")


def input_fingerprint(x: torch.Tensor, size: int) -> np.ndarray:
    """Teacher input [B, 3, H, W] → [B, 3*size*size] fp16 area-averaged thumbnail.

    Stored per view so that ``verify`` and the trainer can check that a replayed view is
    the view the teacher saw (replay fidelity), at a few bytes per view.
    """
    return F.adaptive_avg_pool2d(x.float(), size).flatten(1).half().cpu().numpy()


def extract_targets(
    out: TeacherOutput,
    *,
    logits_mode: str | None,
    logits_k: int,
    feature_dtype: str,
) -> tuple[dict[str, np.ndarray], dict[str, FidelityAcc]]:
    """All cache arrays of a batch (except view records and labels) and per-target fidelity."""
    arrays: dict[str, np.ndarray] = {A.PRED_TOP1: out.logits.argmax(-1).cpu().numpy().astype(np.int32)}
    fid: dict[str, FidelityAcc] = {}
    if logits_mode is not None:
        a, fid["logits"] = compress_logits(out.logits, logits_mode, logits_k)
        arrays.update(a)
    for tap, x in out.features.items():
        a, fid[f"feature:{tap}"] = compress_features(tap, x, feature_dtype)
        arrays.update(a)
    return arrays, fid
