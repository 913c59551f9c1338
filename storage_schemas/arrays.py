"""The table of cache arrays: names, shapes, dtypes, chunking and the Zarr codec chain.

Every array is shaped ``[rows, views, *inner]`` with ``rows = num_tars * S`` and ``S``
(``rows_per_shard``) the largest input tar's sample count rounded up to the chunk size. A
sample's row is ``tar_index * S + position``. One Zarr shard covers ``(S, 1, *inner)``: exactly
one work unit (input tar, view), written whole by one writer. Inside it, chunks of
``chunk_rows`` rows suit the trainer's sequential read of a unit. Writer and reader both build
the layout from :func:`cache_arrays`: the fixed arrays (label, valid, prediction, view records)
are named here, each target's arrays by its codec (:mod:`storage_schemas.codecs`); no array name
is spelled anywhere else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .views import MIX_MODES, NO_OP, NO_PARTNER, RAND_OPS, MixRecord, OpRecord, ViewRecipe, ViewRecord

LABEL = "label"  # [R, V] int32, class label (-1: no sample)
VALID = "valid"  # [R, V] uint8, 1 where the row holds a cached sample
PRED_TOP1 = "pred_top1"  # [R, V] int32, teacher's top-1 class
VIEW_CROP = "view_crop"  # [R, V, 4] fp32 (x0, y0, w, h) fractions of the source image
VIEW_FLIP = "view_flip"  # [R, V] uint8
VIEW_OPS = "view_ops"  # [R, V, max_ops] int8 code into RAND_OPS, -1 = none
VIEW_OP_MAGS = "view_op_mags"  # [R, V, max_ops] fp32 signed magnitude
VIEW_ERASE = "view_erase"  # [R, V, max_erase, 4] fp32 boxes, w = 0 means none
VIEW_NOISE_SEED = "view_noise_seed"  # [R, V] uint32
# mixed views (schema >= 1.6, only when the recipe has ``mix``; a cache without them reads as unmixed)
VIEW_MIX_PARTNER = "view_mix_partner"  # [R, V] int32 partner's position in the same tar, -1 = none
VIEW_MIX_MODE = "view_mix_mode"  # [R, V] uint8 code into MIX_MODES (0 none, 1 mixup, 2 cutmix)
VIEW_MIX_LAM = "view_mix_lam"  # [R, V] fp32 applied λ (weight of the sample's own image and label)
VIEW_MIX_BOX = "view_mix_box"  # [R, V, 4] fp32 CutMix box (x0, y0, w, h) fractions of the output, else zeros
VIEW_FINGERPRINT = "view_fingerprint"  # [R, V, 3*f*f] fp16, teacher input avg-pooled
VIEW_MIX_ARRAYS = (VIEW_MIX_PARTNER, VIEW_MIX_MODE, VIEW_MIX_LAM, VIEW_MIX_BOX)  # -> MixRecord
VIEW_RECORD_ARRAYS = (VIEW_CROP, VIEW_FLIP, VIEW_OPS, VIEW_OP_MAGS, VIEW_ERASE, VIEW_NOISE_SEED,
                      *VIEW_MIX_ARRAYS)  # -> ViewRecord

CODEC_ZSTD_LEVEL = 3


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


def cache_arrays(recipe: ViewRecipe, codecs: Iterable[Any], fingerprint_size: int) -> list[ArraySpec]:
    """The arrays of a cache: label/valid/prediction, the view records, and each target codec's
    (``storage_schemas.codecs``: anything with ``arrays()``)."""
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
    if recipe.mix is not None:
        specs += [
            ArraySpec(VIEW_MIX_PARTNER, "int32", (), NO_PARTNER, "view"),
            ArraySpec(VIEW_MIX_MODE, "uint8", (), 0, "view"),
            ArraySpec(VIEW_MIX_LAM, "float32", (), 1.0, "view"),
            ArraySpec(VIEW_MIX_BOX, "float32", (4,), 0.0, "view"),
        ]
    for codec in codecs:
        specs += codec.arrays()
    return specs


def zarr_codecs(compress: bool = True) -> dict[str, Any]:
    """Codec chain of an array: zstd (unless ``compress`` is false: ``output.feature_compression: none`` for the
    taps' arrays, schema >= 1.7), then a crc32c checksum on each stored chunk. A reader needs nothing of this:
    Zarr reads each array's chain from its metadata."""
    import zarr.codecs as zc

    return {"compressors": ([zc.ZstdCodec(level=CODEC_ZSTD_LEVEL)] if compress else []) + [zc.Crc32cCodec()]}


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
    if recipe.mix is not None:
        out[VIEW_MIX_PARTNER] = np.full((n,), NO_PARTNER, np.int32)
        out[VIEW_MIX_MODE] = np.zeros((n,), np.uint8)
        out[VIEW_MIX_LAM] = np.ones((n,), np.float32)
        out[VIEW_MIX_BOX] = np.zeros((n, 4), np.float32)
    for i, r in enumerate(records):
        if r is None:
            continue
        if (r.mix is None) != (recipe.mix is None):
            got = "lacks a mix but the recipe mixes" if r.mix is None else "has a mix but the recipe does not mix"
            raise ValueError(f"view record {i} {got}")
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
        if r.mix is not None:
            out[VIEW_MIX_PARTNER][i] = r.mix.partner
            out[VIEW_MIX_MODE][i] = MIX_MODES.index(r.mix.mode)
            out[VIEW_MIX_LAM][i] = r.mix.lam
            out[VIEW_MIX_BOX][i] = r.mix.box
    return out


def decode_view(rows: dict[str, np.ndarray], i: int | None = None) -> ViewRecord:
    """Rebuild the :class:`ViewRecord` at index ``i`` of arrays as :func:`encode_views` made them, or
    (``i`` None) from one sample's rows."""
    r = {n: rows[n] if i is None else rows[n][i] for n in VIEW_RECORD_ARRAYS if n in rows}
    ops = ()
    if VIEW_OPS in r:
        ops = tuple(
            OpRecord(name=RAND_OPS[int(code)], magnitude=float(mag))
            for code, mag in zip(r[VIEW_OPS], r[VIEW_OP_MAGS], strict=True)
            if code != NO_OP
        )
    erase = ()
    if VIEW_ERASE in r:
        erase = tuple(tuple(float(x) for x in box) for box in r[VIEW_ERASE] if box[2] > 0)
    mix = None  # a cache without the mix arrays (schema < 1.6, or a recipe without mix) is unmixed
    if VIEW_MIX_MODE in r:
        mix = MixRecord(partner=int(r[VIEW_MIX_PARTNER]), mode=MIX_MODES[int(r[VIEW_MIX_MODE])],
                        lam=float(r[VIEW_MIX_LAM]), box=tuple(float(x) for x in r[VIEW_MIX_BOX]))
    return ViewRecord(
        crop=tuple(float(x) for x in r[VIEW_CROP]),
        flip=bool(r[VIEW_FLIP]),
        ops=ops,
        erase=erase,
        noise_seed=int(r[VIEW_NOISE_SEED]),
        mix=mix,
    )
