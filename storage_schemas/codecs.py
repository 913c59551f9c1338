"""Target codecs: how each teacher target is stored in a cache and read back — the one place.

A codec owns the arrays of one target (names, inner shapes, dtypes, fill: :class:`ArraySpec`),
``encode``s the teacher's fp32 output of a batch into rows of those arrays (and measures what the
encoding lost), and ``decode``s rows back to fp32. The caching job, the trainer (cached and
online teacher alike), ``verify``, ``inspect``, ``ls`` and ``export-wds`` all go through these
objects, so cached and live targets are the same numbers by construction. A new storage format
is one class here, registered with :func:`token_codec` (taps) or in ``LOGITS_CODECS``, plus its
tests; the cache config accepts it by its registered name.

- logits, top-k (``topk``): the k largest raw logits (fp16, descending), their class indices
  (int16 while C ≤ 32767), the fp32 logsumexp over *all* classes, so ``p_c = exp(z_c − lse)``
  is the teacher's softmax at T = 1 on every kept class (FKD/TinyViT keep top-k probabilities;
  raw logits + lse also rebuild other temperatures over the kept classes), and (schema ≥ 1.4) the
  log of the probability mass on the classes *not* kept, computed from the fp32 logits: 4 bytes
  that make k kept classes + one rest bucket exact at T = 1. Rebuilt from the fp16 kept values
  instead, ``1 − Σ p`` loses the rest of a peaked teacher (top-1 ≈ 0.94, top-10 ≈ 0.99) to rounding.
- logits, full (``full``): all C raw logits, fp16.
- tap tokens ``[N, D]``: ``fp16``, or ``int8`` with one fp32 scale per token (symmetric absmax,
  ``x ≈ q · scale``, ``scale = max|x| / 127``).

Torch is imported inside the methods: the schema package stays importable (``kdcache --help``,
``ls``) without torch's start-up cost; after the first call the import is a dictionary lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from .arrays import ArraySpec
from .taps import TapInfo

if TYPE_CHECKING:
    import torch

LOGITS_TOPK_VALUES = "logits_topk_values"  # [R, V, k] fp16 raw logits, descending
LOGITS_TOPK_INDICES = "logits_topk_indices"  # [R, V, k] int16|int32 class indices
LOGITS_LOGSUMEXP = "logits_logsumexp"  # [R, V] fp32, logsumexp over all classes (T=1)
LOGITS_REST_LOGMASS = "logits_rest_logmass"  # [R, V] fp32, log of the mass on the classes not kept (T=1)
# ``logits_rest_logmass`` when no class is left out (k = C): log 0, as the most negative float32 (finite, so
# that ``verify``'s finiteness check and any reader's exp() need no special case).
NO_REST = -3.4028234663852886e38
LOGITS_FULL = "logits_full"  # [R, V, C] fp16 raw logits
FEATURE_PREFIX = "feat_"  # tap NAME: feat_NAME [R, V, N, D]; int8 also feat_NAME_scale [R, V, N]
LOGITS_TARGET = "logits"


class FidelityAcc(BaseModel):
    """Fidelity of a stored target against the fp32 teacher output, accumulated over rows."""

    model_config = ConfigDict(extra="forbid")

    count: int = 0
    cosine_sum: float = 0.0
    cosine_min: float = 1.0
    rel_err_sum: float = 0.0
    rel_err_max: float = 0.0

    def merge(self, other: FidelityAcc) -> FidelityAcc:
        return FidelityAcc(
            count=self.count + other.count,
            cosine_sum=self.cosine_sum + other.cosine_sum,
            cosine_min=min(self.cosine_min, other.cosine_min),
            rel_err_sum=self.rel_err_sum + other.rel_err_sum,
            rel_err_max=max(self.rel_err_max, other.rel_err_max),
        )

    def summary(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {
            "cosine_mean": self.cosine_sum / n,
            "cosine_min": self.cosine_min,
            "rel_err_mean": self.rel_err_sum / n,
            "rel_err_max": self.rel_err_max,
        }


def fidelity(ref: torch.Tensor, approx: torch.Tensor) -> FidelityAcc:
    """Per-row cosine similarity and relative L2 error of ``approx`` against fp32 ``ref`` [B, ...]."""
    import torch.nn.functional as F

    r = ref.reshape(ref.shape[0], -1).double()
    a = approx.reshape(approx.shape[0], -1).double()
    cos = F.cosine_similarity(r, a, dim=1, eps=1e-12)
    rel = (a - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-12)
    return FidelityAcc(count=r.shape[0], cosine_sum=float(cos.sum()), cosine_min=float(cos.min()),
                       rel_err_sum=float(rel.sum()), rel_err_max=float(rel.max()))


class Codec:
    """One stored target. ``target`` is its key in stats, fidelity and summaries."""

    target: str

    def arrays(self) -> list[ArraySpec]:
        """The arrays it stores, ``[R, V, *inner]`` each."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], FidelityAcc]:
        """fp32 teacher output of a batch ``[B, ...]`` → rows ``[B, *inner]`` per array (on ``x``'s device,
        in the stored dtype) and the fidelity of what is stored against ``x``."""
        raise NotImplementedError

    def decode(self, rows: Mapping[str, torch.Tensor]) -> Any:
        """Rows of this codec's arrays (torch, any device) → the target in fp32."""
        raise NotImplementedError

    def describe(self) -> str:
        """What is stored, for ``kdcache inspect``."""
        raise NotImplementedError

    def label(self) -> str:
        """A short name for listings (``kdcache ls``)."""
        raise NotImplementedError

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.arrays()]


# ------------------------------------------------------------------------------------------ logits


class LogitsInfo(BaseModel):
    """How a cache stores logits (manifest ``logits``): ``mode`` names the codec in ``LOGITS_CODECS``."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["topk", "full"]
    k: int
    num_classes: int
    rest_logmass: bool = False  # top-k: the mass on the unkept classes is stored (schema ≥ 1.4)

    def codec(self) -> Codec:
        return LOGITS_CODECS[self.mode](self)


def index_dtype(num_classes: int) -> str:
    return "int16" if num_classes <= 32767 else "int32"


@dataclass
class TopK:
    """Decoded top-k logits of B views: ``values`` [B, k] raw logits, ``indices`` [B, k] int64,
    ``logsumexp`` [B] over all classes, all fp32; ``rest_logmass`` [B], the log of the teacher's mass on
    the classes not kept (None for caches written before schema 1.4)."""

    values: torch.Tensor
    indices: torch.Tensor
    logsumexp: torch.Tensor
    rest_logmass: torch.Tensor | None = None

    @property
    def log_probs(self) -> torch.Tensor:
        """[B, k] teacher log-softmax at T = 1 on the kept classes: ``value − logsumexp``."""
        return self.values - self.logsumexp.unsqueeze(-1)


class TopKLogits(Codec):
    target = LOGITS_TARGET

    def __init__(self, info: LogitsInfo) -> None:
        self.k, self.num_classes, self.rest = min(info.k, info.num_classes), info.num_classes, info.rest_logmass

    def arrays(self) -> list[ArraySpec]:
        rest = [ArraySpec(LOGITS_REST_LOGMASS, "float32", (), 0.0, self.target)] if self.rest else []
        return [ArraySpec(LOGITS_TOPK_VALUES, "float16", (self.k,), 0.0, self.target),
                ArraySpec(LOGITS_TOPK_INDICES, index_dtype(self.num_classes), (self.k,), 0, self.target),
                ArraySpec(LOGITS_LOGSUMEXP, "float32", (), 0.0, self.target), *rest]

    def encode(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], FidelityAcc]:
        """Fidelity compares the teacher's probabilities rebuilt from what is stored with the fp32 softmax
        over all classes (classes not kept count as zero)."""
        import torch

        x = x.float()
        values, indices = x.topk(self.k, dim=-1)  # sorted, descending
        lse = torch.logsumexp(x, -1)
        stored = values.half()
        rebuilt = torch.zeros_like(x).scatter_(-1, indices, (stored.float() - lse.unsqueeze(-1)).exp())
        rows = {LOGITS_TOPK_VALUES: stored, LOGITS_TOPK_INDICES: indices.to(getattr(torch, index_dtype(self.num_classes))),
                LOGITS_LOGSUMEXP: lse}
        if self.rest:
            if self.k < self.num_classes:  # logsumexp over the unkept logits, relative to all: log Σ_unkept p
                unkept = x.scatter(-1, indices, float("-inf"))
                rows[LOGITS_REST_LOGMASS] = torch.logsumexp(unkept, -1) - lse
            else:
                rows[LOGITS_REST_LOGMASS] = torch.full_like(lse, NO_REST)
        return rows, fidelity(x.softmax(-1), rebuilt)

    def decode(self, rows: Mapping[str, torch.Tensor]) -> TopK:
        import torch

        rest = rows[LOGITS_REST_LOGMASS].float() if self.rest else None
        return TopK(values=rows[LOGITS_TOPK_VALUES].float(), indices=rows[LOGITS_TOPK_INDICES].to(torch.int64),
                    logsumexp=rows[LOGITS_LOGSUMEXP].float(), rest_logmass=rest)

    def describe(self) -> str:
        return f"fp16 logits top-{self.k} + indices + fp32 logsumexp"

    def label(self) -> str:
        return f"logits:top{self.k}"


class FullLogits(Codec):
    target = LOGITS_TARGET

    def __init__(self, info: LogitsInfo) -> None:
        self.num_classes = info.num_classes

    def arrays(self) -> list[ArraySpec]:
        return [ArraySpec(LOGITS_FULL, "float16", (self.num_classes,), 0.0, self.target)]

    def encode(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], FidelityAcc]:
        x = x.float()
        stored = x.half()
        return {LOGITS_FULL: stored}, fidelity(x.softmax(-1), stored.float().softmax(-1))

    def decode(self, rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return rows[LOGITS_FULL].float()

    def describe(self) -> str:
        return "fp16 logits"

    def label(self) -> str:
        return "logits:all"


LOGITS_CODECS: dict[str, Callable[[LogitsInfo], Codec]] = {"topk": TopKLogits, "full": FullLogits}


# ------------------------------------------------------------------------------------------ taps


class TokenCodec(Codec):
    """Tokens ``[N, D]`` of one tap, stored in the dtype the subclass is registered as."""

    dtype: str = ""

    def __init__(self, tap: TapInfo) -> None:
        self.tap = tap
        self.target = tap.target
        self.array = f"{FEATURE_PREFIX}{tap.name}"

    def describe(self) -> str:
        return self.dtype

    def label(self) -> str:
        return f"{self.target}:{self.dtype}"


TOKEN_CODECS: dict[str, type[TokenCodec]] = {}


def token_codec(dtype: str) -> Callable[[type[TokenCodec]], type[TokenCodec]]:
    """Class decorator: store taps as ``targets.feature_dtype: DTYPE``."""

    def deco(cls: type[TokenCodec]) -> type[TokenCodec]:
        cls.dtype = dtype
        TOKEN_CODECS[dtype] = cls
        return cls

    return deco


@token_codec("fp16")
class FP16Tokens(TokenCodec):
    def arrays(self) -> list[ArraySpec]:
        return [ArraySpec(self.array, "float16", (self.tap.tokens, self.tap.dim), 0.0, self.target)]

    def encode(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], FidelityAcc]:
        stored = x.half()
        return {self.array: stored}, fidelity(x, stored.float())

    def decode(self, rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return rows[self.array].float()


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] fp32 → (int8 [..., D], fp32 scale [...]) with symmetric per-token absmax scaling."""
    import torch

    scale = x.abs().amax(-1) / 127.0
    q = torch.round(x / scale.clamp_min(1e-12).unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale.float()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`: [..., D] int8 and [...] scale → fp32."""
    return q.float() * scale.float().unsqueeze(-1)


@token_codec("int8")
class Int8Tokens(TokenCodec):
    @property
    def scale_array(self) -> str:
        return f"{self.array}_scale"

    def arrays(self) -> list[ArraySpec]:
        return [ArraySpec(self.array, "int8", (self.tap.tokens, self.tap.dim), 0, self.target),
                ArraySpec(self.scale_array, "float32", (self.tap.tokens,), 0.0, self.target)]

    def encode(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], FidelityAcc]:
        q, scale = quantize_int8(x)
        return {self.array: q, self.scale_array: scale}, fidelity(x, dequantize_int8(q, scale))

    def decode(self, rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_int8(rows[self.array], rows[self.scale_array])


def tap_codec(tap: TapInfo) -> TokenCodec:
    if tap.dtype not in TOKEN_CODECS:
        raise ValueError(f"tap {tap.name!r}: storage dtype {tap.dtype!r} is not known to this kdcache "
                         f"(known: {', '.join(TOKEN_CODECS)}); upgrade kdcache to read this cache")
    return TOKEN_CODECS[tap.dtype](tap)


def codecs_of(logits: LogitsInfo | None, taps: list[TapInfo]) -> list[Codec]:
    """Every stored target's codec: logits (if cached) first, then each tap, in order."""
    return ([logits.codec()] if logits else []) + [tap_codec(t) for t in taps]
