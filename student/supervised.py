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

from pipeline.shards import expand_urls, iter_samples
from pipeline.views import apply_view, eval_view, sample_view
from storage_schemas.views import ViewRecipe


def load_samples(urls: str | list[str], storage_options: dict | None = None) -> list[tuple[int, int, object, int]]:
    """Every sample of ``urls`` as ``(shard, position, PIL image, label)``, in order."""
    out = []
    for shard, url in enumerate(expand_urls(urls, storage_options)):
        for s in iter_samples(url, storage_options):
            out.append((shard, s.position, s.image, s.label))
    return out


@torch.inference_mode()
def evaluate(model: torch.nn.Module, samples: list, *, size: int, mean, std, batch_size: int = 256,
             crop_pct: float = 1.0) -> float:
    """Top-1 accuracy in percent with the centre-crop eval transform."""
    model.eval()
    correct = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        x = torch.stack([eval_view(img, size=size, mean=mean, std=std, crop_pct=crop_pct) for _, _, img, _ in chunk])
        y = torch.tensor([label for *_, label in chunk])
        correct += int((model(x).argmax(-1) == y).sum())
    return 100.0 * correct / max(len(samples), 1)


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
                shard, pos, img, _ = train[j]
                rec = sample_view(recipe, shard=shard, position=pos, view=epoch, width=img.width, height=img.height)
                xs.append(apply_view(img, rec, recipe, size=size, mean=mean, std=std))
            x, y = torch.stack(xs), torch.tensor([train[j][3] for j in idx])
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.3f}")
        top1 = evaluate(model, val, size=size, mean=mean, std=std)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_top1": top1})
        bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses):.3f}", val_top1=f"{top1:.1f}")
    bar.close()
    return {"history": history, "val_top1": history[-1]["val_top1"] if history else None}
