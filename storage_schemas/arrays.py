"""The one table of cache arrays: names, shapes, dtypes, chunking and codecs.

Every array is shaped ``[rows, views, *inner]`` with ``rows = num_shards * S`` and
``S`` (``rows_per_shard``) the largest input-tar sample count rounded up to the chunk
size. A sample's row is ``shard_index * S + position``. One Zarr shard covers
``(S, 1, *inner)``: exactly one work unit (input tar, view), written whole by one writer.
Inside it, chunks of ``chunk_rows`` rows suit the trainer's sequential read of a unit.
Writer and reader both build the layout from :func:`cache_arrays`; no array name is
spelled anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .views import NO_OP, RAND_OPS, OpRecord, ViewRecipe, ViewRecord

LABEL = "label"  # [R, V] int32, class label (-1: no sample)
VALID = "valid"  # [R, V] uint8, 1 where the row holds a cached sample
PRED_TOP1 = "pred_top1"  # [R, V] int32, teacher's top-1 class
LOGITS_TOPK_VALUES = "logits_topk_values"  # [R, V, k] fp16 raw logits, descending
LOGITS_TOPK_INDICES = "logits_topk_indices"  # [R, V, k] int16|int32 class indices
LOGITS_LOGSUMEXP = "logits_logsumexp"  # [R, V] fp32, logsumexp over all classes (T=1)
LOGITS_FULL = "logits_full"  # [R, V, C] fp16 raw logits
VIEW_CROP = "view_crop"  # [R, V, 4] fp32 (x0, y0, w, h) fractions of the source image
VIEW_FLIP = "view_flip"  # [R, V] uint8
VIEW_OPS = "view_ops"  # [R, V, max_ops] int8 code into RAND_OPS, -1 = none
VIEW_OP_MAGS = "view_op_mags"  # [R, V, max_ops] fp32 signed magnitude
VIEW_ERASE = "view_erase"  # [R, V, max_erase, 4] fp32 boxes, w = 0 means none
VIEW_NOISE_SEED = "view_noise_seed"  # [R, V] uint32
VIEW_FINGERPRINT = "view_fingerprint"  # [R, V, 3*f*f] fp16, teacher input avg-pooled
FEATURE_PREFIX = "feat_"

CODEC_ZSTD_LEVEL = 3


def feature_array(tap: str) -> str:
    """``[R, V, N, D]`` fp16 or int8 tokens of tap ``tap``."""
    return f"{FEATURE_PREFIX}{tap}"


def feature_scale_array(tap: str) -> str:
    """``[R, V, N]`` fp32 per-token scale of an int8 tap: value = int8 * scale."""
    return f"{FEATURE_PREFIX}{tap}_scale"


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dtype: str
    inner: tuple[int, ...]
    fill: Any
    target: str  # which target it belongs to, for per-target byte accounting

    def shape(self, num_rows: int, num_views: int) -> tuple[int, ...]:
        return (num_rows, num_views, *self.inner)

    def shard_shape(self, rows_per_shard: int) -> tuple[int, ...]:
        return (rows_per_shard, 1, *self.inner)

    def chunk_shape(self, chunk_rows: int) -> tuple[int, ...]:
        return (chunk_rows, 1, *self.inner)


def rows_per_shard(max_count: int, chunk_rows: int) -> int:
    """``S``: the largest tar's sample count rounded up to whole chunks (at least one)."""
    return max(1, -(-max_count // chunk_rows)) * chunk_rows


def index_dtype(num_classes: int) -> str:
    return "int16" if num_classes <= 32767 else "int32"


def cache_arrays(
    recipe: ViewRecipe,
    *,
    logits_mode: str | None,
    logits_k: int,
    num_classes: int,
    features: list[tuple[str, int, int, str]],
    fingerprint_size: int,
) -> list[ArraySpec]:
    """The arrays of a cache. ``features`` holds ``(tap, tokens N, dim D, "fp16"|"int8")``."""
    specs = [
        ArraySpec(LABEL, "int32", (), -1, "meta"),
        ArraySpec(VALID, "uint8", (), 0, "meta"),
        ArraySpec(PRED_TOP1, "int32", (), -1, "meta"),
        ArraySpec(VIEW_CROP, "float32", (4,), 0.0, "view"),
        ArraySpec(VIEW_FLIP, "uint8", (), 0, "view"),
        ArraySpec(VIEW_NOISE_SEED, "uint32", (), 0, "view"),
        ArraySpec(VIEW_FINGERPRINT, "float16", (3 * fingerprint_size**2,), 0.0, "view"),
    ]
    if recipe.max_ops:
        specs += [
            ArraySpec(VIEW_OPS, "int8", (recipe.max_ops,), NO_OP, "view"),
            ArraySpec(VIEW_OP_MAGS, "float32", (recipe.max_ops,), 0.0, "view"),
        ]
    if recipe.max_erase:
        specs.append(ArraySpec(VIEW_ERASE, "float32", (recipe.max_erase, 4), 0.0, "view"))
    if logits_mode == "topk":
        k = min(logits_k, num_classes)
        specs += [
            ArraySpec(LOGITS_TOPK_VALUES, "float16", (k,), 0.0, "logits"),
            ArraySpec(LOGITS_TOPK_INDICES, index_dtype(num_classes), (k,), 0, "logits"),
            ArraySpec(LOGITS_LOGSUMEXP, "float32", (), 0.0, "logits"),
        ]
    elif logits_mode == "full":
        specs.append(ArraySpec(LOGITS_FULL, "float16", (num_classes,), 0.0, "logits"))
    elif logits_mode is not None:
        raise ValueError(f"logits mode {logits_mode!r}: expected 'topk', 'full' or none")
    for tap, n, d, dtype in features:
        if dtype == "fp16":
            specs.append(ArraySpec(feature_array(tap), "float16", (n, d), 0.0, f"feature:{tap}"))
        elif dtype == "int8":
            specs.append(ArraySpec(feature_array(tap), "int8", (n, d), 0, f"feature:{tap}"))
            specs.append(ArraySpec(feature_scale_array(tap), "float32", (n,), 0.0, f"feature:{tap}"))
        else:
            raise ValueError(f"feature dtype {dtype!r} for tap {tap!r}: expected 'fp16' or 'int8'")
    return specs


def zarr_codecs() -> dict[str, Any]:
    """Codec chain for every array: zstd, then a crc32c checksum on each stored chunk."""
    import zarr.codecs as zc

    return {"compressors": [zc.ZstdCodec(level=CODEC_ZSTD_LEVEL), zc.Crc32cCodec()]}


# --- view records <-> array rows ------------------------------------------------------


def encode_views(records: list[ViewRecord | None], recipe: ViewRecipe) -> dict[str, np.ndarray]:
    """Pack view records (``None`` = empty row) into the ``view_*`` arrays' rows ``[n, ...]``."""
    n = len(records)
    out = {
        VIEW_CROP: np.zeros((n, 4), np.float32),
        VIEW_FLIP: np.zeros((n,), np.uint8),
        VIEW_NOISE_SEED: np.zeros((n,), np.uint32),
    }
    if recipe.max_ops:
        out[VIEW_OPS] = np.full((n, recipe.max_ops), NO_OP, np.int8)
        out[VIEW_OP_MAGS] = np.zeros((n, recipe.max_ops), np.float32)
    if recipe.max_erase:
        out[VIEW_ERASE] = np.zeros((n, recipe.max_erase, 4), np.float32)
    for i, r in enumerate(records):
        if r is None:
            continue
        out[VIEW_CROP][i] = r.crop
        out[VIEW_FLIP][i] = r.flip
        out[VIEW_NOISE_SEED][i] = r.noise_seed
        if len(r.ops) > recipe.max_ops or len(r.erase) > recipe.max_erase:
            raise ValueError(
                f"view record has {len(r.ops)} ops / {len(r.erase)} erase boxes, recipe allows "
                f"{recipe.max_ops} / {recipe.max_erase}"
            )
        for j, op in enumerate(r.ops):
            out[VIEW_OPS][i, j] = RAND_OPS.index(op.name)
            out[VIEW_OP_MAGS][i, j] = op.magnitude
        for j, box in enumerate(r.erase):
            out[VIEW_ERASE][i, j] = box
    return out


def decode_view(rows: dict[str, np.ndarray], i: int) -> ViewRecord:
    """Rebuild the :class:`ViewRecord` at index ``i`` of arrays as :func:`encode_views` made."""
    ops = ()
    if VIEW_OPS in rows:
        ops = tuple(
            OpRecord(name=RAND_OPS[int(code)], magnitude=float(mag))
            for code, mag in zip(rows[VIEW_OPS][i], rows[VIEW_OP_MAGS][i], strict=True)
            if code != NO_OP
        )
    erase = ()
    if VIEW_ERASE in rows:
        erase = tuple(tuple(float(x) for x in box) for box in rows[VIEW_ERASE][i] if box[2] > 0)
    return ViewRecord(
        crop=tuple(float(x) for x in rows[VIEW_CROP][i]),
        flip=bool(rows[VIEW_FLIP][i]),
        ops=ops,
        erase=erase,
        noise_seed=int(rows[VIEW_NOISE_SEED][i]),
    )
