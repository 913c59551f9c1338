"""A teacher's stochastic depth, drawn per view from a seed instead of the global RNG.

The official ScaleKD and cls_KD (ViTKD, NKD) trainers call ``teacher.eval()`` once and then
``model.train()`` every epoch, which puts the teacher back in train mode: its drop-path is
active while it produces targets (Swin-L 0.1, DeiT-III S/B/L 0.05/0.2/0.45) and the ScaleKD
TPP tail runs with it too (reference/methods.md, "What the official code does": teacher
mode). VanillaKD keeps its teacher in eval. ``teacher.stochastic_depth: true`` reproduces the
former, reproducibly:

* Only timm's ``DropPath`` modules are switched on. Dropout, BatchNorm and everything else stay
  in eval mode (Swin, ViT, DeiT-III and EVA teachers use no dropout or BatchNorm in these recipes).
* timm draws a drop-path mask from the global RNG, so a view's targets would depend on the batch
  it shared and the worker that ran it. Here the decision of every DropPath module for one view is
  a pure function of (seed, tar, position, view): the caching job, the online teacher and
  ``kdcache verify`` compute the same teacher outputs for the same view whatever the batching.
* The mask is applied as timm's ``drop_path`` does: the residual branch is zeroed per sample with
  probability ``drop_prob`` and the kept ones are divided by ``1 - drop_prob`` (``scale_by_keep``).

It is written here rather than through timm because timm's ``DropPath`` takes no generator and no
per-sample mask; a forward hook on each module (which in eval mode returns its input unchanged)
multiplies in the mask, so no timm internals are patched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from timm.layers import DropPath
from torch import nn

from storage_schemas.errors import ConfigError

# Separates this stream from the view recipe's, which is seeded by the same four words.
_TAG = 0x5D_D0


class StochasticDepth:
    """Drives the ``DropPath`` modules (``drop_prob > 0``) of ``model`` with given per-sample masks.

    Outside :meth:`masks` the model behaves as in eval mode (every branch kept, no scaling).
    """

    def __init__(self, model: nn.Module, where: str, *, required: bool = True) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, DropPath) and m.drop_prob > 0]
        if required and not self.modules:
            raise ConfigError(
                f"{where}: stochastic_depth is on, but the model has no drop-path (timm DropPath with "
                "drop_prob > 0); set its drop_path_rate in model_kwargs (official: Swin-L 0.1, DeiT-III S/B/L "
                "0.05/0.2/0.45) or turn stochastic_depth off")
        self.keep = torch.tensor([1.0 - float(m.drop_prob) for m in self.modules], dtype=torch.float64)
        if not all(getattr(m, "scale_by_keep", True) for m in self.modules):
            raise ConfigError(f"{where}: a DropPath module has scale_by_keep=False, which kdcache does not replay")
        self._masks: torch.Tensor | None = None
        for j, m in enumerate(self.modules):
            m.register_forward_hook(self._hook(j))

    def _hook(self, j: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if self._masks is None:
                return None
            scale = self._masks[:, j].to(device=out.device, dtype=out.dtype)
            return out * scale.view(-1, *([1] * (out.ndim - 1)))
        return hook

    @contextlib.contextmanager
    def masks(self, masks: torch.Tensor) -> Iterator[None]:
        """Within the block every DropPath module ``j`` multiplies sample ``b``'s branch by ``masks[b, j]``."""
        if masks.ndim != 2 or masks.shape[1] != len(self.modules):
            raise ValueError(f"drop-path masks of shape {list(masks.shape)}, expected [B, {len(self.modules)}]")
        self._masks = masks
        try:
            yield
        finally:
            self._masks = None

    def _scaled(self, uniform: torch.Tensor) -> torch.Tensor:
        """[B, n] uniforms in [0, 1) → 0 (dropped, probability ``drop_prob``) or ``1 / keep``."""
        keep = self.keep.to(uniform.device)
        return torch.where(uniform < keep, 1.0 / keep, 0.0).float()

    def view_masks(self, views: Sequence[tuple[int, int, int, int]]) -> torch.Tensor:
        """Masks of views named by (seed, tar, position, view): one seeded stream per view, so a view's
        decisions do not depend on the batch it is in."""
        u = np.stack([np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAG, *key]))).random(len(self.modules))
                      for key in views]) if views else np.zeros((0, len(self.modules)))
        return self._scaled(torch.from_numpy(u))

    def random_masks(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Masks for ``batch`` samples from ``generator`` (the TPP tail at training time)."""
        u = torch.rand(batch, len(self.modules), generator=generator, dtype=torch.float64,
                       device=generator.device)
        return self._scaled(u)
