"""Teacher parameter perception pack: the teacher's frozen tail, stored without the rest of it.

ScaleKD (Fan et al., 2024), teacher parameter perception (TPP): the student's s3 features,
projected to the teacher's stage-3 width and grid, go through the teacher's *frozen* last
stage(s) and final norm; the result is distilled against the teacher's final features and
feeds the s4 projector, with gradients flowing through the frozen tail into the student.

The pack is what makes that possible without the teacher: the tail's tensors as
safetensors (keys as in the teacher's ``state_dict``) plus a JSON spec
(:class:`storage_schemas.tpp_spec.TPPSpec`: timm name and kwargs, which blocks/stages,
input/output description) from which :func:`build_tail` rebuilds exactly that tail with timm
on the meta device and loads the tensors strictly. Beside it, per-channel statistics of the
tail's input over the cached views (:func:`load_input_stats`).

Families (one adapter each, :mod:`pipeline.tail_families`): timm ``VisionTransformer`` (ViT,
DeiT, DeiT-III), ``Eva`` (EVA, EVA02 with rope) and ``SwinTransformer``. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import safetensors
import safetensors.torch
import timm
import torch
from torch import nn

from storage_schemas.layout import TPP_SPEC, TPP_STATS, TPP_WEIGHTS
from storage_schemas.tpp_spec import TPPSpec

from .store import CacheStore
from .tail_families import family_named, family_of
from .tpp_files import save_input_stats, write_pack  # torch-free: the job's driver writes them

__all__ = ["TailInputStats", "TeacherTail", "build_tail", "extract_tail", "load_input_stats", "load_pack",
           "pack_weights", "save_input_stats", "save_pack", "tail_family", "tail_input_index"]

SPEC_VERSION = 1
METHOD = "ScaleKD teacher parameter perception (TPP)"
# create_model arguments that concern weights or placement, not architecture: the tail's
# weights come from the pack and its device/dtype from build_tail, so they are not recorded.
_NON_ARCH_KWARGS = ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "device", "dtype")


def tail_family(model: nn.Module) -> str:
    """The TPP family of a timm model: ``"vit"`` | ``"eva"`` | ``"swin"``.

    Raises ``TypeError`` naming the supported classes for any other model.
    """
    return family_of(model).name


def tail_input_index(model: nn.Module, tail: int) -> int:
    """Block (ViT/EVA) or stage (Swin) index whose output feeds a tail of the last ``tail`` ones.

    Obtain the tail input with ``model.forward_intermediates(x, indices=[idx], norm=False,
    output_fmt='NLC', return_prefix_tokens=True)`` for ViT/EVA (then ``cat([prefix, spatial], 1)``,
    [B, P + H*W, C]) or ``output_fmt='NCHW'`` for Swin (then ``flatten(2).transpose(1, 2)``, [B, H*W, C]).
    """
    family = family_of(model)
    depth = family.depth(model)
    if not 1 <= tail < depth:
        raise ValueError(
            f"TPP tail={tail}: must be in [1, {depth - 1}] for this {family.name} teacher with {depth} "
            f"{family.unit}s (the tail's input is the output of an earlier one)"
        )
    return depth - tail - 1


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
) -> tuple[dict[str, torch.Tensor], TPPSpec]:
    """Tensors and spec of the teacher's last ``tail`` blocks (ViT/EVA) or stages (Swin) + final norm.

    ``model_name``/``model_kwargs`` must be what ``timm.create_model`` built ``model`` from
    (weight-only kwargs such as ``pretrained`` are dropped); this is checked by rebuilding the
    tail on the meta device and comparing keys, shapes and geometry.

    Returns ``(tensors, spec)``: tensors contiguous on CPU in their original dtype, keyed as in
    ``model.state_dict()`` (``blocks.11.attn.qkv.weight``, ``layers.3.downsample.reduction.weight``,
    ``norm.weight``, ``rope.freqs`` …); spec without ``weights_sha256`` (see :func:`save_pack`).
    """
    family = family_of(model)
    tail_input_index(model, tail)  # validates tail against the depth
    kwargs = _arch_kwargs(model_kwargs)
    parts = family.tail_modules(model, tail)
    live = _state_dict(parts)
    desc = family.describe(model, tail)

    meta = _meta_model(model_name, kwargs)
    if family_of(meta) is not family:
        raise ValueError(f"TPP pack: {model_name!r} builds a {family_of(meta).name} model, the teacher is {family.name}")
    rebuilt = _state_dict(family.tail_modules(meta, tail))
    want = {k: tuple(v.shape) for k, v in live.items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.items()}
    meta_desc = family.describe(meta, tail)
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
    modules = [f"{family.container}.{i}" for i in desc["indices"]] + [n for n in parts if n != family.container]
    spec = TPPSpec(spec_version=SPEC_VERSION, method=METHOD, family=family.name, model_name=model_name,
                   model_kwargs=kwargs, tail=tail, **desc, modules=modules,
                   num_params=sum(p.numel() for mod in parts.values() for p in mod.parameters()),
                   num_tensors=len(tensors), dtype=dtype, timm_version=timm.__version__,
                   torch_version=torch.__version__.split("+")[0])
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
    ``state_dict()`` keys are the pack's keys. The family's adapter
    (:mod:`pipeline.tail_families`) runs the forward.
    """

    def __init__(self, spec: TPPSpec, parts: dict[str, nn.Module]):
        super().__init__()
        self.spec = spec
        self.family: str = spec.family
        self.adapter = family_named(spec.family)
        self.grid: tuple[int, int] = tuple(spec.input.grid)
        self.prefix_tokens: int = spec.input.prefix_tokens
        for name, mod in parts.items():
            self.add_module(name, mod)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> TeacherTail:
        # A frozen teacher never trains: keep eval semantics even inside student.train().
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` tail-input tokens → ``[B, N', C']`` final features after the final norm."""
        if x.ndim != 3 or x.shape[-1] != self.spec.input.dim:
            raise ValueError(
                f"TeacherTail({self.spec.model_name}): expected [B, N, {self.spec.input.dim}] "
                f"tokens, got {list(x.shape)}"
            )
        return self.adapter.forward(self, x)


def _check_keys(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], spec: TPPSpec) -> None:
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    shape = sorted(k for k in expected.keys() & tensors.keys() if expected[k].shape != tensors[k].shape)
    if missing or extra or shape:
        raise ValueError(
            f"TPP pack for {spec.model_name} (tail={spec.tail}) does not match the rebuilt tail: "
            f"missing keys {missing[:8]}{' …' if len(missing) > 8 else ''}, "
            f"unexpected keys {extra[:8]}{' …' if len(extra) > 8 else ''}, "
            f"shape mismatch {[(k, list(tensors[k].shape), list(expected[k].shape)) for k in shape[:8]]}"
        )


def _reinit_non_persistent_buffers(tail: nn.Module, spec: TPPSpec) -> None:
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
                f"TPP pack for {spec.model_name}: non-persistent buffer {name!r} of "
                f"{type(owner).__name__} has no init_non_persistent_buffers(); cannot rebuild it"
            )


def build_tail(tensors: dict[str, torch.Tensor], spec: TPPSpec, device: str | torch.device = "cpu") -> TeacherTail:
    """Rebuild the frozen tail from a pack with timm, without the rest of the teacher's weights.

    The full model is created on the meta device (no memory, no init cost), only the tail
    modules are kept, materialised with ``to_empty`` on ``device``, non-persistent buffers
    recomputed, cast to ``spec.dtype`` and ``tensors`` loaded strictly (every tail key
    present, no other). The spec's architecture fields must equal what this timm builds.
    """
    family = family_named(spec.family)
    meta = _meta_model(spec.model_name, spec.model_kwargs)
    if family_of(meta) is not family:
        raise ValueError(f"TPP pack: {spec.model_name!r} builds a {family_of(meta).name} model, spec says {family.name}")
    desc = family.describe(meta, spec.tail)
    stale = sorted(k for k, v in desc.items() if getattr(spec, k) != v)
    if stale:
        raise ValueError(
            f"TPP pack for {spec.model_name}: this timm ({timm.__version__}) builds a tail that differs from "
            f"the spec (written with timm {spec.timm_version}) in {stale}"
        )
    parts = family.tail_modules(meta, spec.tail)
    del meta  # only the tail modules stay referenced; the rest of the (meta) teacher goes
    tail = TeacherTail(spec, parts)
    _check_keys(tail.state_dict(), tensors, spec)
    dtype = getattr(torch, spec.dtype)
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.dtype != dtype)
    if bad:
        raise ValueError(f"TPP pack for {spec.model_name}: tensors {bad[:8]} are not {spec.dtype}")

    tail.to_empty(device=device)
    # buffers first, in fp32 as create_model does, then cast: mirrors a teacher created and then
    # cast with .to(dtype) (e.g. the rope's cached pos_embed is rounded, its bands kept fp32)
    _reinit_non_persistent_buffers(tail, spec)
    if dtype != torch.float32:
        tail.to(dtype)
    tail.load_state_dict(tensors, strict=True)
    return tail


# --- the pack in the cache store ------------------------------------------------------------


def pack_weights(tensors: dict[str, torch.Tensor], spec: TPPSpec) -> bytes:
    """The pack's ``TPP_WEIGHTS``: the tail's tensors (:func:`extract_tail`) as safetensors bytes, on CPU."""
    return safetensors.torch.save(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
        # One metadata key only: safetensors orders metadata through a hash map, so several
        # keys give different bytes run to run, and a rerun must write identical bytes.
        metadata={"kdcache": f"tpp model={spec.model_name} tail={spec.tail}"},
    )


def save_pack(store: CacheStore, tensors: dict[str, torch.Tensor], spec: TPPSpec) -> int:
    """Write the pack into ``store`` (``TPP_WEIGHTS`` safetensors, then ``TPP_SPEC`` JSON); bytes written.

    The written spec carries ``weights_sha256`` so :func:`load_pack` detects a torn or mixed pack
    (:func:`pipeline.tpp_files.write_pack`, which the job's driver calls with the bytes of :func:`pack_weights`).
    """
    return write_pack(store, pack_weights(tensors, spec), spec)


def load_pack(store: CacheStore, device: str | torch.device = "cpu") -> TeacherTail:
    """Read the pack from ``store`` and rebuild the frozen :class:`TeacherTail` on ``device``."""
    if not store.exists(TPP_SPEC):
        raise FileNotFoundError(f"TPP pack: no {TPP_SPEC} in {store.url!r}; was the cache built with targets.tpp?")
    if not store.exists(TPP_WEIGHTS):
        raise FileNotFoundError(f"TPP pack: {TPP_SPEC} but no {TPP_WEIGHTS} in {store.url!r}; the pack is incomplete")
    spec = TPPSpec.parse(store.read_bytes(TPP_SPEC), where=store.path(TPP_SPEC))
    weights = store.read_bytes(TPP_WEIGHTS)
    sha = hashlib.sha256(weights).hexdigest()
    if spec.weights_sha256 not in (None, sha):
        raise ValueError(
            f"TPP pack in {store.url!r}: {TPP_WEIGHTS} has sha256 {sha}, {TPP_SPEC} expects {spec.weights_sha256}"
        )
    return build_tail(safetensors.torch.load(weights), spec, device=device)


# --- statistics of the tail's input ---------------------------------------------------------


@dataclass(frozen=True)
class TailInputStats:
    """Per-channel statistics of the tail's input over every cached view (grid tokens, no prefix).

    ``mean``, ``std``: ``[C]`` float32 (population std); ``count``: tokens they are over.
    """

    mean: torch.Tensor
    std: torch.Tensor
    count: int


def load_input_stats(store: CacheStore) -> TailInputStats | None:
    """The statistics :func:`save_input_stats` wrote, or ``None`` when the cache has none."""
    if not store.exists(TPP_STATS):
        return None
    where = store.path(TPP_STATS)
    try:
        t = safetensors.torch.load(store.read_bytes(TPP_STATS))
    except safetensors.SafetensorError as e:
        raise ValueError(f"{where}: not a safetensors file: {e}") from e
    if sorted(t) != ["count", "mean", "std"] or t["mean"].ndim != 1 or t["std"].shape != t["mean"].shape \
            or t["count"].numel() != 1:
        shapes = {k: list(v.shape) for k, v in t.items()}
        raise ValueError(f"{where}: expected mean [C], std [C] and count [1], got {shapes}")
    return TailInputStats(mean=t["mean"].float(), std=t["std"].float(), count=int(t["count"]))
