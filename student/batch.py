"""A training batch: the replayed views, labels (and for mixed views the partners' labels and λ), decoded teacher
targets and where each sample came from.

:func:`collate_rows` runs in a DataLoader worker: it stacks tensors (which reach the main process
through shared memory: a reused slot of the loader's :class:`student.ring.BatchRing`, else a fresh segment)
and leaves the targets as stacked rows; :func:`received` copies a ring's batch out to the training device and
:func:`to_batch`, in the main process, decodes the targets with the cache's codecs there. Targets are torch
tensors from the stack on; they never go back to numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

from pipeline.tars import Sample
from storage_schemas.manifest import Manifest

from .ring import BatchRing
from .targets import TeacherTargets


class Batch(NamedTuple):
    """A decoded batch: ``x`` [B, 3, H, W], ``labels`` [B] int64, ``targets`` from the cache rows,
    then where each sample came from (for checks and resume)."""

    x: torch.Tensor
    labels: torch.Tensor
    targets: TeacherTargets
    keys: list[str]
    tars: torch.Tensor
    positions: torch.Tensor
    views: torch.Tensor
    consumers: list[int]
    num_consumers: int | None
    x_teacher: torch.Tensor | None = None  # the same views at the teacher's input (online teacher)
    lam: torch.Tensor | None = None  # [B] float32 weight of each sample's own image and label (1: unmixed)
    partner_labels: torch.Tensor | None = None  # [B] int64 label of each mix partner (the own label if unmixed)

    def soft_labels(self, num_classes: int) -> torch.Tensor:
        """[B, C] mixed labels (:func:`mix_labels`) of this batch, on the labels' device."""
        if self.lam is None or self.partner_labels is None:
            return mix_labels(self.labels, self.labels, torch.ones(len(self.labels)), num_classes)
        return mix_labels(self.labels, self.partner_labels, self.lam, num_classes)


def mix_labels(labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor, num_classes: int) -> torch.Tensor:
    """timm's ``mixup_target`` with the recorded λ: ``λ·onehot(y_a) + (1 − λ)·onehot(y_b)`` [B, C] float32, from
    ``labels`` y_a [B], ``partner_labels`` y_b [B] and ``lam`` [B] (``MixRecord.lam``, after ``correct_lam``).

    Without smoothing: the ``ce`` method smooths probability labels as ``(1 − ε)·q + ε/C``, which is
    ``λ·onehot(y_a, ε) + (1 − λ)·onehot(y_b, ε)``, timm's ``mixup_target(..., smoothing=ε)`` (so ``ce`` with
    ``loss: ce`` is timm's ``SoftTargetCrossEntropy`` on it, ``loss: bce`` its ``BinaryCrossEntropy``, as in
    VanillaKD's ``--bce-loss``; reference/methods.md, "Vanilla KD"). An unmixed view (λ = 1) is its one-hot label.
    """
    lam = lam.to(labels.device, torch.float32)[:, None]
    y_a = torch.nn.functional.one_hot(labels.long(), num_classes).float()
    y_b = torch.nn.functional.one_hot(partner_labels.to(labels.device).long(), num_classes).float()
    return y_a * lam + y_b * (1.0 - lam)


def stack(items: Sequence[torch.Tensor | np.ndarray | np.generic], shared: bool | None = None) -> torch.Tensor:
    """The stack of CPU tensors, arrays or scalars of one shape and dtype, as a tensor. ``shared`` (default: in a
    DataLoader worker) stacks straight into shared memory, as torch's ``default_collate`` does, so that the
    batch reaches the main process as it is: a stack in private memory is copied into a new shared segment on
    its way. Stacked by NumPy into the tensor's memory; on one thread, as in a worker, that is about a tenth
    less CPU than a private stack and its copy for a batch of 16 ViTKD tap rows at real size (19 MB fp16) and
    for 16 images at 224 px (``python -m bench.collate``); a reused ring slot (:mod:`student.ring`, the
    loader's way when it has workers) a quarter of it."""
    arrays = [a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in items]  # views, no copies
    first = torch.from_numpy(arrays[0])
    if shared is None:
        shared = get_worker_info() is not None
    if shared:
        storage = first._typed_storage()._new_shared(len(arrays) * first.numel(), device=first.device)
        out = first.new(storage).resize_(len(arrays), *first.shape)
    else:
        out = torch.empty((len(arrays), *first.shape), dtype=first.dtype)
    np.stack(arrays, out=out.numpy())
    return out


def collate_rows(samples: list[Sample], names: Sequence[str] = (), ring: BatchRing | None = None) -> dict:
    """DataLoader ``collate_fn``: stacks the samples' tensors and the rows of the target arrays ``names``
    (``[B, ...]`` torch tensors, not yet decoded: cheap in a worker; in a worker stacked straight into shared
    memory: :func:`stack`). With a ``ring`` (:class:`student.ring.BatchRing`) a worker stacks them into its next
    ring slot instead, and the batch carries ``"ring"``: the slot and its layout, which :func:`received` turns
    back into tensors in the main process."""
    if ring is not None and samples:
        arrays = {"x": [s.x for s in samples], **{ROW + n: [s.rows[n] for s in samples] for n in names}}
        if samples[0].x_teacher is not None:
            arrays["x_teacher"] = [s.x_teacher for s in samples]
        packed = ring.put({**arrays, **_scalars(samples)})
        if packed is not None:
            return {**_meta(samples), "ring": packed}
    scalars = {k: torch.from_numpy(v) for k, v in _scalars(samples).items()}
    return {
        "x": stack([s.x for s in samples]),
        "rows": {n: stack([s.rows[n] for s in samples]) for n in names} if samples else {},
        "x_teacher": stack([s.x_teacher for s in samples]) if samples and samples[0].x_teacher is not None
        else None,
        **scalars, **_meta(samples),
    }


ROW = "rows/"  # the ring field of a target array's rows
# the per-sample numbers a batch carries (:func:`_scalars`), none wider than 8 bytes: a ring slot's size
SCALARS = ("label", "tar", "position", "view", "lam", "partner_label")


def _scalars(samples: list[Sample]) -> dict[str, np.ndarray]:
    return {
        "label": np.array([s.label for s in samples], dtype=np.int64),
        "tar": np.array([s.tar for s in samples], dtype=np.int64),
        "position": np.array([s.position for s in samples], dtype=np.int64),
        "view": np.array([s.view for s in samples], dtype=np.int64),
        "lam": np.array([_lam(s) for s in samples], dtype=np.float32),
        "partner_label": np.array([s.label if s.partner is None else s.partner.label for s in samples],
                                  dtype=np.int64),
    }


def _meta(samples: list[Sample]) -> dict:
    return {
        "key": [s.key for s in samples],
        "consumer": [s.consumer or 0 for s in samples],
        "num_consumers": samples[0].num_consumers if samples else None,
    }


def received(raw: dict, ring: BatchRing | None, device: str | torch.device = "cpu", *,
             pin_memory: bool = False) -> dict:
    """:func:`collate_rows`' output as the main process receives it, with a batch that came through ``ring``
    copied out of its slot to ``device`` (and the slot freed): the same dict either way."""
    if "ring" not in raw:
        return raw
    if ring is None:
        raise ValueError("this batch came through a BatchRing: pass that ring to received()")
    got = ring.take(raw["ring"], device, pin_memory=pin_memory)
    out = {k: v for k, v in raw.items() if k != "ring"}
    out["rows"] = {k[len(ROW):]: v for k, v in got.items() if k.startswith(ROW)}
    out["x_teacher"] = None
    out.update({k: v for k, v in got.items() if not k.startswith(ROW)})
    return out


def _lam(s: Sample) -> float:
    mix = s.record.mix if s.record is not None else None
    return 1.0 if mix is None or mix.mode == "none" else mix.lam


def to_batch(raw: dict, m: Manifest | None, *, taps: Sequence[str] | None = None,
             device: str | torch.device = "cpu") -> Batch:
    """:func:`collate_rows`' output → :class:`Batch`, targets decoded with the cache's codecs on ``device``
    (no cache, ``m`` None: no targets)."""
    return Batch(
        x=raw["x"].to(device), labels=raw["label"].to(device),
        targets=TeacherTargets.decode(raw["rows"], m, device=device, taps=taps) if m else TeacherTargets(0),
        keys=raw["key"], tars=raw["tar"], positions=raw["position"], views=raw["view"],
        consumers=list(raw["consumer"]), num_consumers=raw["num_consumers"],
        x_teacher=None if raw.get("x_teacher") is None else raw["x_teacher"].to(device),
        lam=raw["lam"].to(device) if "lam" in raw else None,
        partner_labels=raw["partner_label"].to(device) if "partner_label" in raw else None,
    )
