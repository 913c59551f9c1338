"""Teacher parameter perception pack: the teacher's frozen tail, stored without the rest of it.

ScaleKD (Fan et al., 2024), teacher parameter perception (TPP): the student's s3 features,
projected to the teacher's stage-3 width and grid, go through the teacher's *frozen* last
stage(s) and final norm; the result is distilled against the teacher's final features and
feeds the s4 projector, with gradients flowing through the frozen tail into the student.

The pack is what makes that possible without the teacher: the tail's tensors as
safetensors (keys as in the teacher's ``state_dict``) plus a JSON spec (timm name and
kwargs, which blocks/stages, input/output description) from which :func:`build_tail`
rebuilds exactly that tail with timm on the meta device and loads the tensors strictly.

Families: timm ``VisionTransformer`` (ViT, DeiT, DeiT-III), ``Eva`` (EVA, EVA02 with
rope) and ``SwinTransformer``. Only public modules are used (``model.blocks``,
``model.norm``, ``model.rope``, ``model.layers``), never hooks. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import fsspec
import safetensors.torch
import timm
import torch
from timm.models.eva import Eva
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from storage_schemas.layout import TPP_SPEC, TPP_WEIGHTS

__all__ = [
    "TeacherTail",
    "build_tail",
    "extract_tail",
    "load_pack",
    "save_pack",
    "tail_family",
    "tail_input_index",
]

SPEC_VERSION = 1
FAMILIES = ("vit", "eva", "swin")
# create_model arguments that concern weights or placement, not architecture: the tail's
# weights come from the pack and its device/dtype from build_tail, so they are not recorded.
_NON_ARCH_KWARGS = ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "device", "dtype")


def tail_family(model: nn.Module) -> str:
    """The TPP family of a timm model: ``"vit"`` | ``"eva"`` | ``"swin"``.

    Raises ``TypeError`` naming the supported classes for any other model.
    """
    if isinstance(model, Eva):
        return "eva"
    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, VisionTransformer):  # also DeiT (incl. distilled) and DeiT-III
        return "vit"
    raise TypeError(
        f"TPP pack: unsupported teacher {type(model).__module__}.{type(model).__name__}; supported "
        "families: vit (timm VisionTransformer: ViT, DeiT, DeiT-III), eva (timm Eva: EVA, EVA02), "
        "swin (timm SwinTransformer)"
    )


def _depth(model: nn.Module, family: str) -> int:
    return len(model.layers) if family == "swin" else len(model.blocks)


def tail_input_index(model: nn.Module, tail: int) -> int:
    """Block (ViT/EVA) or stage (Swin) index whose output feeds a tail of the last ``tail`` ones.

    Obtain the tail input with ``model.forward_intermediates(x, indices=[idx], norm=False,
    output_fmt='NLC', return_prefix_tokens=True)`` for ViT/EVA (then ``cat([prefix, spatial], 1)``,
    [B, P + H*W, C]) or ``output_fmt='NCHW'`` for Swin (then ``flatten(2).transpose(1, 2)``, [B, H*W, C]).
    """
    family = tail_family(model)
    depth = _depth(model, family)
    unit = "stages" if family == "swin" else "blocks"
    if not 1 <= tail < depth:
        raise ValueError(
            f"TPP tail={tail}: must be in [1, {depth - 1}] for this {family} teacher with {depth} {unit} "
            "(the tail's input is the output of an earlier one)"
        )
    return depth - tail - 1


def _tail_modules(model: nn.Module, family: str, tail: int) -> dict[str, nn.Module]:
    """Top-level tail modules named as in the model, so their state_dict keys are the model's."""
    depth = _depth(model, family)
    idx = range(depth - tail, depth)
    if family == "swin":
        parts: dict[str, nn.Module] = {"layers": nn.ModuleDict({str(i): model.layers[i] for i in idx})}
    else:
        parts = {"blocks": nn.ModuleDict({str(i): model.blocks[i] for i in idx})}
    parts["norm"] = model.norm
    if family == "eva" and model.rope is not None:
        # rope is shared by all blocks; its buffers are rebuilt, its params (mixed rope) packed
        parts["rope"] = model.rope
    return parts


def _describe(model: nn.Module, family: str, tail: int) -> dict[str, Any]:
    """Architecture-derived part of the spec; recomputed from the rebuilt model to check it."""
    depth = _depth(model, family)
    first = depth - tail
    idx = depth - tail - 1
    if family == "swin":
        stages = [model.layers[i] for i in range(first, depth)]
        h, w = stages[0].input_resolution
        oh, ow = stages[-1].output_resolution
        out_dim = stages[-1].blocks[-1].dim
        return {
            "depth": depth,
            "unit": "stage",
            "indices": list(range(first, depth)),
            "input_index": idx,
            "input": {
                "format": "NLC",  # stage input NHWC flattened row-major over H, W
                "tokens": h * w,
                "grid": [h, w],
                "dim": stages[0].dim,
                "prefix_tokens": 0,
                "tap": {"indices": [idx], "norm": False, "output_fmt": "NCHW", "return_prefix_tokens": False},
                "assemble": "x.flatten(2).transpose(1, 2)",
            },
            "output": {
                "format": "NLC",
                "tokens": oh * ow,
                "grid": [oh, ow],
                "dim": out_dim,
                "prefix_tokens": 0,
                "final_norm": type(model.norm).__name__,
            },
            "windows": [
                [list(b.window_size), list(b.shift_size)] for s in stages for b in s.blocks
            ],
        }
    gh, gw = model.patch_embed.grid_size
    prefix = int(model.num_prefix_tokens)
    rope = getattr(model, "rope", None)
    # ViT blocks keep the token layout: the tail's input and output are described alike.
    tokens = {"format": "NLC", "tokens": prefix + gh * gw, "grid": [gh, gw], "dim": model.embed_dim,
              "prefix_tokens": prefix}
    d = {
        "depth": depth,
        "unit": "block",
        "indices": list(range(first, depth)),
        "input_index": idx,
        "input": {
            **tokens,
            "accepts_without_prefix": True,
            "dynamic_img_size": bool(getattr(model, "dynamic_img_size", False)),
            "tap": {"indices": [idx], "norm": False, "output_fmt": "NLC", "return_prefix_tokens": prefix > 0},
            "assemble": "torch.cat([prefix, spatial], 1)" if prefix else "spatial",
        },
        "output": {**tokens, "final_norm": type(model.norm).__name__},
    }
    if family == "eva":
        d["rope"] = None if rope is None else {
            "type": type(rope).__name__,
            "mixed": bool(getattr(model, "rope_mixed", False)),
            "feat_shape": None if getattr(rope, "feat_shape", None) is None else list(rope.feat_shape),
        }
    return d


def _state_dict(parts: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for name, mod in parts.items():
        sd.update(mod.state_dict(prefix=f"{name}."))
    return sd


def _arch_kwargs(model_kwargs: dict) -> dict:
    kw = {k: v for k, v in model_kwargs.items() if k not in _NON_ARCH_KWARGS}
    try:
        # JSON round trip now, so tuple -> list surprises show at extraction, not at student time
        return json.loads(json.dumps(kw))
    except TypeError as e:
        raise ValueError(f"TPP pack: model_kwargs must be JSON-serialisable, got {model_kwargs!r}: {e}") from e


def _meta_model(model_name: str, model_kwargs: dict) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(model_name, pretrained=False, **model_kwargs)


def extract_tail(
    model: nn.Module, tail: int, *, model_name: str, model_kwargs: dict
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and spec of the teacher's last ``tail`` blocks (ViT/EVA) or stages (Swin) + final norm.

    ``model_name``/``model_kwargs`` must be what ``timm.create_model`` built ``model`` from
    (weight-only kwargs such as ``pretrained`` are dropped); this is checked by rebuilding the
    tail on the meta device and comparing keys, shapes and geometry.

    Returns ``(tensors, spec)``: tensors contiguous on CPU in their original dtype, keyed as in
    ``model.state_dict()`` (``blocks.11.attn.qkv.weight``, ``layers.3.downsample.reduction.weight``,
    ``norm.weight``, ``rope.freqs`` …); spec is JSON-serialisable (see :func:`build_tail`).
    """
    family = tail_family(model)
    tail_input_index(model, tail)  # validates tail against the depth
    kwargs = _arch_kwargs(model_kwargs)
    parts = _tail_modules(model, family, tail)
    live = _state_dict(parts)
    desc = _describe(model, family, tail)

    meta = _meta_model(model_name, kwargs)
    if tail_family(meta) != family:
        raise ValueError(f"TPP pack: {model_name!r} builds a {tail_family(meta)} model, the teacher is {family}")
    rebuilt = _state_dict(_tail_modules(meta, family, tail))
    want = {k: tuple(v.shape) for k, v in live.items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.items()}
    meta_desc = _describe(meta, family, tail)
    if want != got or meta_desc != desc:
        diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))[:8]
        fields = sorted(k for k in desc if meta_desc.get(k) != desc[k])
        raise ValueError(
            f"TPP pack: timm.create_model({model_name!r}, **{kwargs}) does not rebuild this teacher's tail "
            f"(differing keys/shapes: {diff or 'none'}; differing spec fields: {fields or 'none'}); "
            "pass the exact model name and kwargs the teacher was created with"
        )

    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in live.items()}
    dtypes = {v.dtype for v in tensors.values() if v.is_floating_point()}
    if len(dtypes) > 1:
        raise ValueError(f"TPP pack: the tail mixes floating dtypes {sorted(map(str, dtypes))}; cast the teacher first")
    dtype = str(dtypes.pop()).removeprefix("torch.") if dtypes else "float32"
    unit_attr = "layers" if family == "swin" else "blocks"
    num_params = sum(p.numel() for mod in parts.values() for p in mod.parameters())
    spec = {
        "spec_version": SPEC_VERSION,
        "method": "ScaleKD teacher parameter perception (TPP)",
        "family": family,
        "model_name": model_name,
        "model_kwargs": kwargs,
        "tail": tail,
        **desc,
        "modules": [f"{unit_attr}.{i}" for i in desc["indices"]] + [n for n in parts if n != unit_attr],
        "num_params": num_params,
        "num_tensors": len(tensors),
        "dtype": dtype,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }
    return tensors, spec


class TeacherTail(nn.Module):
    """The teacher's frozen tail (ScaleKD TPP): last blocks/stages + final norm, from a pack.

    ``forward(x)``: tokens ``[B, N, C]`` → final features after the final norm ``[B, N', C']``, NLC.

    * ViT/EVA: ``N = P + H*W`` (prefix tokens first, as the teacher fed the tail) gives
      ``[B, P + H*W, C]``, equal to the teacher's ``forward_intermediates`` final features;
      ``N = H*W`` (no prefix tokens: what ScaleKD's s3 CAP output path feeds) gives
      ``[B, H*W, C]``, exactly as if the prefix tokens did not exist.
    * Swin: ``N = H*W`` tokens of the first tail stage's input grid (NHWC flattened row-major)
      gives ``[B, H/2*W/2, 2C]`` per stage, after the final norm.

    Parameters are frozen (``requires_grad=False``) and the module always runs in eval mode
    (no dropout / drop-path / rope augmentation, as when the teacher filled the cache);
    gradients still flow to ``x``. Submodules are named as in the teacher, so
    ``state_dict()`` keys are the pack's keys.
    """

    def __init__(self, spec: dict, parts: dict[str, nn.Module]):
        super().__init__()
        self.spec = spec
        self.family: str = spec["family"]
        self.grid = tuple(spec["input"]["grid"])
        self.prefix_tokens: int = spec["input"]["prefix_tokens"]
        for name, mod in parts.items():
            self.add_module(name, mod)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> TeacherTail:
        # A frozen teacher never trains: keep eval semantics even inside student.train().
        return super().train(False)

    def _rope_embed(self) -> torch.Tensor | None:
        rope = getattr(self, "rope", None)
        if rope is None:
            return None
        # mirrors Eva._pos_embed (non-dynamic: cached feat_shape embed when the rope has one)
        if self.spec["input"]["dynamic_img_size"] or not hasattr(rope, "feat_shape"):
            return rope.get_embed(shape=list(self.grid))
        return rope.get_embed()

    def _forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        grid_tokens = self.grid[0] * self.grid[1]
        if N not in (grid_tokens, grid_tokens + self.prefix_tokens):
            raise ValueError(
                f"TeacherTail({self.spec['model_name']}): expected {grid_tokens + self.prefix_tokens} "
                f"(with {self.prefix_tokens} prefix) or {grid_tokens} tokens, got {N}"
            )
        rope = self._rope_embed() if self.family == "eva" else None
        pad = self.prefix_tokens if (N == grid_tokens and self.prefix_tokens and rope is not None) else 0
        mask = None
        if pad:
            # EVA attention rotates tokens [P:] only, so it needs P leading tokens. Placeholders
            # that no query may attend to leave every grid token's output exactly as without
            # prefix tokens (norms and MLPs are per token); they are dropped afterwards.
            x = torch.cat([x.new_zeros(B, pad, C), x], 1)
            mask = torch.ones(N + pad, N + pad, dtype=torch.bool, device=x.device)
            mask[:, :pad] = False
        mixed = bool(self.spec.get("rope") and self.spec["rope"]["mixed"])
        for i, blk in self.blocks.items():
            if self.family == "eva":
                x = blk(x, rope=rope[int(i)] if mixed else rope, attn_mask=mask)
            else:
                x = blk(x)
        return self.norm(x)[:, pad:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` tail-input tokens → ``[B, N', C']`` final features after the final norm."""
        if x.ndim != 3 or x.shape[-1] != self.spec["input"]["dim"]:
            raise ValueError(
                f"TeacherTail({self.spec['model_name']}): expected [B, N, {self.spec['input']['dim']}] "
                f"tokens, got {list(x.shape)}"
            )
        if self.family != "swin":
            return self._forward_tokens(x)
        B, N, C = x.shape
        h, w = self.grid
        if N != h * w:
            raise ValueError(f"TeacherTail({self.spec['model_name']}): expected {h}*{w}={h * w} tokens, got {N}")
        x = x.reshape(B, h, w, C)
        for stage in self.layers.values():
            x = stage(x)
        x = self.norm(x)
        return x.reshape(B, -1, x.shape[-1])


def _check_keys(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], spec: dict) -> None:
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    shape = sorted(k for k in expected.keys() & tensors.keys() if expected[k].shape != tensors[k].shape)
    if missing or extra or shape:
        raise ValueError(
            f"TPP pack for {spec['model_name']} (tail={spec['tail']}) does not match the rebuilt tail: "
            f"missing keys {missing[:8]}{' …' if len(missing) > 8 else ''}, "
            f"unexpected keys {extra[:8]}{' …' if len(extra) > 8 else ''}, "
            f"shape mismatch {[(k, list(tensors[k].shape), list(expected[k].shape)) for k in shape[:8]]}"
        )


def _reinit_non_persistent_buffers(tail: nn.Module, spec: dict) -> None:
    """Recompute buffers that are not in any state_dict (so neither in the pack).

    After ``to_empty`` they hold garbage: Swin ``attn.relative_position_index`` and shifted
    blocks' ``attn_mask``; EVA ``attn.k_bias`` (zeros) and the rope's ``bands`` / cached
    ``pos_embed``. timm modules that own such buffers implement ``init_non_persistent_buffers``
    (its convention since the meta-device init work), which computes them from the module's
    configuration. Any non-persistent buffer whose owner lacks it is refused rather than left
    uninitialised.
    """
    persistent = tail.state_dict().keys()
    owners = {name: mod for name, mod in tail.named_modules()}
    for mod in owners.values():
        if hasattr(mod, "init_non_persistent_buffers"):
            mod.init_non_persistent_buffers()
    for name, _ in tail.named_buffers():
        if name in persistent:
            continue
        owner = owners[name.rpartition(".")[0]]
        if not hasattr(owner, "init_non_persistent_buffers"):
            raise NotImplementedError(
                f"TPP pack for {spec['model_name']}: non-persistent buffer {name!r} of "
                f"{type(owner).__name__} has no init_non_persistent_buffers(); cannot rebuild it"
            )


def build_tail(tensors: dict[str, torch.Tensor], spec: dict, device: str | torch.device = "cpu") -> TeacherTail:
    """Rebuild the frozen tail from a pack with timm, without the rest of the teacher's weights.

    The full model is created on the meta device (no memory, no init cost), only the tail
    modules are kept, materialised with ``to_empty`` on ``device``, non-persistent buffers
    recomputed, cast to ``spec['dtype']`` and ``tensors`` loaded strictly (every tail key
    present, no other). Spec fields: ``family``, ``model_name``, ``model_kwargs``, ``tail``,
    ``depth``, ``unit`` ("block"/"stage"), ``indices``, ``input_index``, ``input``/``output``
    (format, tokens, grid, dim, prefix_tokens, tap …), ``num_params``, ``dtype``.
    """
    family = spec["family"]
    if family not in FAMILIES:
        raise ValueError(f"TPP pack: unknown family {family!r}; supported: {', '.join(FAMILIES)}")
    meta = _meta_model(spec["model_name"], spec["model_kwargs"])
    if tail_family(meta) != family:
        raise ValueError(f"TPP pack: {spec['model_name']!r} builds a {tail_family(meta)} model, spec says {family}")
    desc = _describe(meta, family, spec["tail"])
    stale = sorted(k for k, v in desc.items() if spec.get(k) != v)
    if stale:
        raise ValueError(
            f"TPP pack for {spec['model_name']}: this timm ({timm.__version__}) builds a tail that differs from "
            f"the spec (written with timm {spec.get('timm_version')}) in {stale}"
        )
    parts = _tail_modules(meta, family, spec["tail"])
    del meta  # only the tail modules stay referenced; the rest of the (meta) teacher goes
    tail = TeacherTail(spec, parts)
    _check_keys(tail.state_dict(), tensors, spec)
    dtype = getattr(torch, spec["dtype"])
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.dtype != dtype)
    if bad:
        raise ValueError(f"TPP pack for {spec['model_name']}: tensors {bad[:8]} are not {spec['dtype']}")

    tail.to_empty(device=device)
    # buffers first, in fp32 as create_model does, then cast: mirrors a teacher created and then
    # cast with .to(dtype) (e.g. the rope's cached pos_embed is rounded, its bands kept fp32)
    _reinit_non_persistent_buffers(tail, spec)
    if dtype != torch.float32:
        tail.to(dtype)
    tail.load_state_dict(tensors, strict=True)
    return tail


def _join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}"


def save_pack(fs: fsspec.AbstractFileSystem, root: str, tensors: dict[str, torch.Tensor], spec: dict) -> int:
    """Write the pack under cache ``root`` (``TPP_WEIGHTS`` safetensors + ``TPP_SPEC`` JSON); bytes written.

    The written spec carries ``weights_sha256`` so :func:`load_pack` detects a torn or mixed pack.
    """
    weights = safetensors.torch.save(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
        # One metadata key only: safetensors orders metadata through a hash map, so several
        # keys give different bytes run to run, and a rerun must write identical bytes.
        metadata={"kdcache": f"tpp model={spec['model_name']} tail={spec['tail']}"},
    )
    spec_bytes = json.dumps(
        {**spec, "weights_sha256": hashlib.sha256(weights).hexdigest()}, indent=1, sort_keys=True
    ).encode()
    weights_path, spec_path = _join(root, TPP_WEIGHTS), _join(root, TPP_SPEC)
    fs.makedirs(weights_path.rpartition("/")[0], exist_ok=True)
    with fs.open(weights_path, "wb") as f:
        f.write(weights)
    with fs.open(spec_path, "wb") as f:  # spec last: its sha names the weights it belongs to
        f.write(spec_bytes)
    return len(weights) + len(spec_bytes)


def load_pack(fs: fsspec.AbstractFileSystem, root: str, device: str | torch.device = "cpu") -> TeacherTail:
    """Read the pack under cache ``root`` and rebuild the frozen :class:`TeacherTail` on ``device``."""
    spec_path, weights_path = _join(root, TPP_SPEC), _join(root, TPP_WEIGHTS)
    if not fs.exists(spec_path):
        raise FileNotFoundError(f"TPP pack: no {TPP_SPEC} under {root!r}; was the cache built with targets.tpp?")
    if not fs.exists(weights_path):
        raise FileNotFoundError(f"TPP pack: {TPP_SPEC} but no {TPP_WEIGHTS} under {root!r}; the pack is incomplete")
    with fs.open(spec_path, "rb") as f:
        spec = json.loads(f.read())
    with fs.open(weights_path, "rb") as f:
        weights = f.read()
    sha = hashlib.sha256(weights).hexdigest()
    if spec.get("weights_sha256") not in (None, sha):
        raise ValueError(
            f"TPP pack under {root!r}: {TPP_WEIGHTS} has sha256 {sha}, {TPP_SPEC} expects {spec['weights_sha256']}"
        )
    return build_tail(safetensors.torch.load(weights), spec, device=device)
