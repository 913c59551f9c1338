"""One adapter per teacher family for the TPP pack (``pipeline.tpp``): what the tail is and how it runs.

An adapter knows, for its timm model class: how deep the model is, which top-level modules
form the tail of the last ``tail`` blocks/stages (named as in the model, so their
``state_dict`` keys are the model's), the architecture-derived part of the spec, and the
tail's forward over tokens. Only public modules are used (``model.blocks``, ``model.norm``,
``model.rope``, ``model.layers``), never hooks.

Families: ``vit`` (timm ``VisionTransformer``: ViT, DeiT, DeiT-III), ``eva`` (timm ``Eva``:
EVA, EVA02 and other rope ViTs) and ``swin`` (timm ``SwinTransformer``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from timm.models.eva import Eva
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from storage_schemas.tpp_spec import RopeInfo, TailInput, TailOutput, TailTap

if TYPE_CHECKING:
    from .tpp import TeacherTail

__all__ = ["TailFamily", "family_named", "family_of", "register_family"]


class TailFamily:
    """Base of the family adapters; stateless, one registered instance per family."""

    name: ClassVar[str]  # the spec's ``family``
    model_class: ClassVar[type[nn.Module]]
    support: ClassVar[str]  # for the unsupported-teacher message
    container: ClassVar[str]  # the model attribute holding the blocks/stages
    unit: ClassVar[str]  # "block" | "stage"

    def depth(self, model: nn.Module) -> int:
        return len(getattr(model, self.container))

    def tail_modules(self, model: nn.Module, tail: int) -> dict[str, nn.Module]:
        """Top-level tail modules named as in the model: the last ``tail`` blocks/stages, the final norm."""
        depth = self.depth(model)
        seq = getattr(model, self.container)
        return {self.container: nn.ModuleDict({str(i): seq[i] for i in range(depth - tail, depth)}),
                "norm": model.norm}

    def describe(self, model: nn.Module, tail: int) -> dict[str, Any]:
        """Architecture-derived spec fields (``TPPSpec`` field -> value); recomputed from a rebuilt
        model to check it against the teacher or a stored spec."""
        depth = self.depth(model)
        return {"depth": depth, "unit": self.unit, "indices": list(range(depth - tail, depth)),
                "input_index": depth - tail - 1}

    def forward(self, tail: TeacherTail, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` tail-input tokens (already checked to be 3-d of width C) → ``[B, N', C']``."""
        raise NotImplementedError


_REGISTRY: dict[str, TailFamily] = {}


def register_family(cls: type[TailFamily]) -> type[TailFamily]:
    """Class decorator: make ``cls`` the adapter of its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"TPP family {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def family_of(model: nn.Module) -> TailFamily:
    """The adapter of a timm model. Where several match (a subclass of another family's class),
    the one whose class is nearest in the model's MRO wins, whatever the registration order.

    Raises ``TypeError`` naming the supported classes for any other model.
    """
    mro = type(model).__mro__
    found = [f for f in _REGISTRY.values() if isinstance(model, f.model_class)]
    if not found:
        raise TypeError(
            f"TPP pack: unsupported teacher {type(model).__module__}.{type(model).__name__}; supported "
            f"families: {', '.join(f.support for f in _REGISTRY.values())}"
        )
    return min(found, key=lambda f: mro.index(f.model_class))


def family_named(name: str) -> TailFamily:
    if name not in _REGISTRY:
        raise ValueError(f"TPP pack: unknown family {name!r}; supported: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _check_tokens(tail: TeacherTail, n: int, allowed: tuple[int, ...], expected: str) -> None:
    if n not in allowed:
        raise ValueError(f"TeacherTail({tail.spec.model_name}): expected {expected} tokens, got {n}")


@register_family
class ViTFamily(TailFamily):
    """timm ``VisionTransformer`` (ViT, DeiT incl. distilled, DeiT-III): blocks keep the token layout."""

    name = "vit"
    model_class = VisionTransformer
    support = "vit (timm VisionTransformer: ViT, DeiT, DeiT-III)"
    container = "blocks"
    unit = "block"

    def describe(self, model: nn.Module, tail: int) -> dict[str, Any]:
        d = super().describe(model, tail)
        gh, gw = model.patch_embed.grid_size
        prefix = int(model.num_prefix_tokens)
        # the tail's input and output are described alike
        tokens = dict(format="NLC", tokens=prefix + gh * gw, grid=(gh, gw), dim=model.embed_dim, prefix_tokens=prefix)
        tap = TailTap(indices=[d["input_index"]], norm=False, output_fmt="NLC", return_prefix_tokens=prefix > 0)
        d["input"] = TailInput(**tokens, accepts_without_prefix=True,
                               dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)), tap=tap,
                               assemble="torch.cat([prefix, spatial], 1)" if prefix else "spatial")
        d["output"] = TailOutput(**tokens, final_norm=type(model.norm).__name__)
        return d

    def rope_embed(self, tail: TeacherTail) -> torch.Tensor | None:
        return None

    def run_block(self, tail: TeacherTail, i: str, blk: nn.Module, x: torch.Tensor, rope: torch.Tensor | None,
                  mask: torch.Tensor | None) -> torch.Tensor:
        return blk(x)

    def forward(self, tail: TeacherTail, x: torch.Tensor) -> torch.Tensor:
        """``N = P + H*W`` (prefix first, as the teacher fed the tail) or ``N = H*W`` (no prefix tokens)."""
        B, N, C = x.shape
        grid_tokens = tail.grid[0] * tail.grid[1]
        with_prefix = grid_tokens + tail.prefix_tokens
        _check_tokens(tail, N, (grid_tokens, with_prefix),
                      f"{with_prefix} (with {tail.prefix_tokens} prefix) or {grid_tokens}")
        rope = self.rope_embed(tail)
        pad = tail.prefix_tokens if (N == grid_tokens and tail.prefix_tokens and rope is not None) else 0
        mask = None
        if pad:
            # EVA attention rotates tokens [P:] only, so it needs P leading tokens. Placeholders
            # that no query may attend to leave every grid token's output exactly as without
            # prefix tokens (norms and MLPs are per token); they are dropped afterwards.
            x = torch.cat([x.new_zeros(B, pad, C), x], 1)
            mask = torch.ones(N + pad, N + pad, dtype=torch.bool, device=x.device)
            mask[:, :pad] = False
        for i, blk in tail.blocks.items():
            x = self.run_block(tail, i, blk, x, rope, mask)
        return tail.norm(x)[:, pad:]


@register_family
class EvaFamily(ViTFamily):
    """timm ``Eva`` (EVA, EVA02, rope ViTs): ViT blocks plus the shared rotary embedding."""

    name = "eva"
    model_class = Eva
    support = "eva (timm Eva: EVA, EVA02)"

    def tail_modules(self, model: nn.Module, tail: int) -> dict[str, nn.Module]:
        parts = super().tail_modules(model, tail)
        if model.rope is not None:
            # rope is shared by all blocks; its buffers are rebuilt, its params (mixed rope) packed
            parts["rope"] = model.rope
        return parts

    def describe(self, model: nn.Module, tail: int) -> dict[str, Any]:
        d = super().describe(model, tail)
        rope = getattr(model, "rope", None)
        d["rope"] = None if rope is None else RopeInfo(
            type=type(rope).__name__,
            mixed=bool(getattr(model, "rope_mixed", False)),
            feat_shape=None if getattr(rope, "feat_shape", None) is None else list(rope.feat_shape),
        )
        return d

    def rope_embed(self, tail: TeacherTail) -> torch.Tensor | None:
        rope = getattr(tail, "rope", None)
        if rope is None:
            return None
        # mirrors Eva._pos_embed (non-dynamic: cached feat_shape embed when the rope has one)
        if tail.spec.input.dynamic_img_size or not hasattr(rope, "feat_shape"):
            return rope.get_embed(shape=list(tail.grid))
        return rope.get_embed()

    def run_block(self, tail: TeacherTail, i: str, blk: nn.Module, x: torch.Tensor, rope: torch.Tensor | None,
                  mask: torch.Tensor | None) -> torch.Tensor:
        mixed = tail.spec.rope is not None and tail.spec.rope.mixed
        return blk(x, rope=rope[int(i)] if mixed else rope, attn_mask=mask)


@register_family
class SwinFamily(TailFamily):
    """timm ``SwinTransformer``: stages (patch merging + blocks) over an NHWC grid."""

    name = "swin"
    model_class = SwinTransformer
    support = "swin (timm SwinTransformer)"
    container = "layers"
    unit = "stage"

    def describe(self, model: nn.Module, tail: int) -> dict[str, Any]:
        d = super().describe(model, tail)
        stages = [model.layers[i] for i in d["indices"]]
        h, w = stages[0].input_resolution
        oh, ow = stages[-1].output_resolution
        tap = TailTap(indices=[d["input_index"]], norm=False, output_fmt="NCHW", return_prefix_tokens=False)
        # stage input NHWC flattened row-major over H, W
        d["input"] = TailInput(format="NLC", tokens=h * w, grid=(h, w), dim=stages[0].dim, prefix_tokens=0, tap=tap,
                               assemble="x.flatten(2).transpose(1, 2)")
        d["output"] = TailOutput(format="NLC", tokens=oh * ow, grid=(oh, ow), dim=stages[-1].blocks[-1].dim,
                                 prefix_tokens=0, final_norm=type(model.norm).__name__)
        d["windows"] = [(tuple(b.window_size), tuple(b.shift_size)) for s in stages for b in s.blocks]
        return d

    def forward(self, tail: TeacherTail, x: torch.Tensor) -> torch.Tensor:
        """``N = H*W`` tokens of the first tail stage's input grid → ``[B, H/2*W/2, 2C]`` per stage."""
        B, N, C = x.shape
        h, w = tail.grid
        _check_tokens(tail, N, (h * w,), f"{h}*{w}={h * w}")
        x = x.reshape(B, h, w, C)
        for stage in tail.layers.values():
            x = stage(x)
        x = tail.norm(x)
        return x.reshape(B, -1, x.shape[-1])
