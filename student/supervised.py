"""Plain supervised training of a timm classifier on WebDataset shards (no KD).

Trains the demo's teacher and is the no-KD baseline's core until the KD trainer lands.
Views come from the same sampler the cache uses (``pipeline.views``): epoch ``e``
uses view index ``e``, so every epoch sees fresh, reproducible augmentations.
Samples are decoded into memory once: meant for small data sets such as the digits.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm.auto import tqdm

from pipeline.shards import Sample, expand_urls, iter_samples
from pipeline.views import apply_view, sample_view
from storage_schemas.views import ViewRecipe

from .evaluate import evaluate, sample_batches


def load_samples(urls: str | list[str], storage_options: dict | None = None) -> list[Sample]:
    """Every sample of ``urls``, decoded, in order (``Sample.tar`` is the tar's index in ``urls``)."""
    return [s for t, url in enumerate(expand_urls(urls, storage_options))
            for s in iter_samples(url, storage_options, tar=t)]


def top1(model: torch.nn.Module, samples: list[Sample], *, size: int, mean, std, crop_pct: float = 1.0) -> float:
    """Top-1 accuracy (percent) on in-memory samples with the centre-crop eval transform."""
    return evaluate(model, sample_batches(samples, size=size, mean=mean, std=std, crop_pct=crop_pct))["top1"]


def train_classifier(
    model: torch.nn.Module,
    train: list,
    val: list,
    *,
    recipe: ViewRecipe,
    size: int,
    mean,
    std,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.1,
    warmup_epochs: int = 1,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> dict:
    """Train with AdamW + cosine (timm), label-smoothed CE; returns per-epoch loss and val top-1."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(train) // batch_size)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=epochs, warmup_epochs=warmup_epochs,
                                   step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    history = []
    step = 0
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", disable=not progress)
    for epoch in range(epochs):
        model.train()
        order = list(range(len(train)))
        rng.shuffle(order)
        losses = []
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            xs = []
            for j in idx:
                s = train[j]
                rec = sample_view(recipe, shard=s.tar, position=s.position, view=epoch, width=s.image.width,
                                  height=s.image.height)
                xs.append(apply_view(s.image, rec, recipe, size=size, mean=mean, std=std))
            x, y = torch.stack(xs), torch.tensor([train[j].label for j in idx])
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.3f}")
        acc = top1(model, val, size=size, mean=mean, std=std)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_top1": acc})
        bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.3f}", val_top1=f"{acc:.1f}")
    bar.close()
    return {"history": history, "val_top1": history[-1]["val_top1"] if history else None}
