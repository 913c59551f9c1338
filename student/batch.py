"""A training batch: the replayed views, labels (and for mixed views the partners' labels and λ), decoded teacher
targets and where each sample came from.

:func:`collate_rows` runs in a DataLoader worker: it stacks tensors (which reach the main process
through shared memory) and leaves the targets as stacked rows; :func:`to_batch` runs in the main
process and decodes them with the cache's codecs on the training device. Targets are torch tensors
from the stack on; they never go back to numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

from pipeline.tars import Sample
from storage_schemas.manifest import Manifest

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
    for 16 images at 224 px (``python -m bench.collate``)."""
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


def collate_rows(samples: list[Sample], names: Sequence[str] = ()) -> dict:
    """DataLoader ``collate_fn``: stacks the samples' tensors and the rows of the target arrays ``names``
    (``[B, ...]`` torch tensors, not yet decoded: cheap in a worker; in a worker stacked straight into shared
    memory: :func:`stack`)."""
    return {
        "x": stack([s.x for s in samples]),
        "label": torch.tensor([s.label for s in samples], dtype=torch.int64),
        "rows": {n: stack([s.rows[n] for s in samples]) for n in names} if samples else {},
        "key": [s.key for s in samples],
        "tar": torch.tensor([s.tar for s in samples]),
        "position": torch.tensor([s.position for s in samples]),
        "view": torch.tensor([s.view for s in samples]),
        "consumer": [s.consumer or 0 for s in samples],
        "num_consumers": samples[0].num_consumers if samples else None,
        "x_teacher": stack([s.x_teacher for s in samples]) if samples and samples[0].x_teacher is not None
        else None,
        "lam": torch.tensor([_lam(s) for s in samples], dtype=torch.float32),
        "partner_label": torch.tensor([s.label if s.partner is None else s.partner.label for s in samples],
                                      dtype=torch.int64),
    }


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
