"""Evaluation: top-1/top-5 of a classifier with timm's centre-crop eval transform, one function for the
trainer, ``kdcache eval`` and the demo's teacher.

Batches come from validation tars (:func:`eval_loader`, split round robin over DDP ranks and
DataLoader workers) or from samples already in memory (:func:`sample_batches`); :func:`evaluate`
counts over any iterable of ``(x, labels)`` and sums the counts over DDP ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.stages import prefetch_map
from pipeline.tars import Sample, expand_urls, iter_samples
from pipeline.views import eval_view


class EvalDataset(IterableDataset):
    """``(x [3, H, W], label)`` of validation tars with timm's centre-crop eval transform
    (``pipeline.views.eval_view``); no cache. Tars are split round robin over ranks and workers."""

    def __init__(self, urls: str | list[str], *, size: int | tuple[int, int], mean: tuple[float, float, float],
                 std: tuple[float, float, float], crop_pct: float = 0.875, interpolation: str = "bicubic",
                 storage_options: dict | None = None, num_classes: int | None = None,
                 rank: int | None = None, world_size: int | None = None, threads: int = 2) -> None:
        self.urls = expand_urls(urls, storage_options)  # fails fast in the main process
        self.storage_options = dict(storage_options or {})
        self.size, self.mean, self.std, self.crop_pct, self.interpolation = size, mean, std, crop_pct, interpolation
        self.num_classes, self.threads = num_classes, max(1, threads)
        ddp = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if ddp else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if ddp else 1)

    def _samples(self, urls: list[str]) -> Iterator[Sample]:
        for url in urls:
            yield from iter_samples(url, self.storage_options, num_classes=self.num_classes)

    def _view(self, s: Sample) -> tuple[torch.Tensor, int]:
        x = eval_view(s.image, size=self.size, mean=self.mean, std=self.std, crop_pct=self.crop_pct,
                      interpolation=self.interpolation)
        return x, s.label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        N, w = (info.num_workers, info.id) if info is not None else (1, 0)
        mine = self.urls[self.rank * N + w::self.world_size * N]
        yield from prefetch_map(self._view, self._samples(mine), workers=self.threads, lookahead=4 * self.threads)


def eval_loader(urls: str | list[str], size: int | tuple[int, int], mean: tuple[float, float, float],
                std: tuple[float, float, float], batch_size: int, crop_pct: float = 0.875, *,
                interpolation: str = "bicubic", num_workers: int = 0, storage_options: dict | None = None,
                num_classes: int | None = None, rank: int | None = None,
                world_size: int | None = None) -> DataLoader:
    """Batches ``(x [B, 3, H, W], labels [B])`` over validation tars; under DDP each rank sees
    its share of the tars (:func:`evaluate` sums the counts over ranks)."""
    ds = EvalDataset(urls, size=size, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation,
                     storage_options=storage_options, num_classes=num_classes, rank=rank, world_size=world_size)
    return DataLoader(ds, batch_size=batch_size, num_workers=num_workers)


def sample_batches(samples: Sequence[Sample], *, size: int, mean, std, batch_size: int = 256,
                   crop_pct: float = 1.0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(x, labels)`` of decoded samples held in memory, with the same eval transform."""
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        x = torch.stack([eval_view(s.image, size=size, mean=mean, std=std, crop_pct=crop_pct) for s in chunk])
        yield x, torch.tensor([s.label for s in chunk])


@torch.inference_mode()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1/top-5 (percent) and the sample count ``n`` over ``batches``, summed over DDP ranks; the model
    runs in eval mode and gets its mode back."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@5, total
    for x, y in batches:
        logits = model(x.to(device))
        top5 = logits.topk(min(5, logits.shape[-1]), -1).indices.cpu()
        counts += torch.tensor([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(-1).sum(), len(y)],
                               dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    model.train(was_training)
    n = max(float(counts[2]), 1.0)
    return {"top1": 100 * float(counts[0]) / n, "top5": 100 * float(counts[1]) / n, "n": int(counts[2])}
