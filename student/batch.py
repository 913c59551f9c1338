"""A training batch: the replayed views, labels, decoded teacher targets and where each sample came from.

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


def collate_rows(samples: list[Sample], names: Sequence[str] = ()) -> dict:
    """DataLoader ``collate_fn``: stacks the samples' tensors and the rows of the target arrays ``names``
    (``[B, ...]`` torch tensors, not yet decoded: cheap in a worker)."""
    return {
        "x": torch.stack([s.x for s in samples]),
        "label": torch.tensor([s.label for s in samples], dtype=torch.int64),
        "rows": {n: torch.from_numpy(np.stack([s.rows[n] for s in samples])) for n in names} if samples else {},
        "key": [s.key for s in samples],
        "tar": torch.tensor([s.tar for s in samples]),
        "position": torch.tensor([s.position for s in samples]),
        "view": torch.tensor([s.view for s in samples]),
        "consumer": [s.consumer or 0 for s in samples],
        "num_consumers": samples[0].num_consumers if samples else None,
        "x_teacher": torch.stack([s.x_teacher for s in samples]) if samples and samples[0].x_teacher is not None
        else None,
    }


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
    )
