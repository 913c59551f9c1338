"""The teacher: any timm model, its taps and logits from one forward pass.

Used by the caching job and, unchanged, by the trainer's ``--online-teacher`` path, so
that cached and live targets come from one implementation. Outputs come only through
timm's public interface: ``forward_intermediates`` for the taps and the final
(normed) features, ``forward_head`` for the logits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import fsspec
import timm
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from timm.data import resolve_model_data_config

from storage_schemas.config import TeacherConfig
from storage_schemas.errors import CacheMismatchError, ConfigError
from storage_schemas.manifest import Manifest
from storage_schemas.taps import TapInfo, TapSpec

from .stochastic_depth import StochasticDepth

RANDOM_INIT_SEED = 0  # a teacher with neither checkpoint nor pretrained weights is seeded, so reruns agree


@dataclass
class TeacherOutput:
    """One batch of teacher outputs, fp32.

    ``logits`` [B, C]; ``features[tap]`` [B, N, D] tokens (prefix tokens first when kept);
    ``tail_input`` [B, N_in, C_in] tokens feeding the TPP tail (prefix tokens included for
    ViT-like teachers, as the teacher itself feeds them) or None.
    """

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    tail_input: torch.Tensor | None = None


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return f.read()


def load_state_dict(url: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or torch files read with ``weights_only=True`` (never pickle)."""
    data = read_bytes(url, storage_options)
    if url.endswith(".safetensors"):
        return st_load(data)
    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for non-weights content
        raise ConfigError(
            f"{url}: not a safetensors file (name it *.safetensors) and not loadable as torch weights "
            f"with weights_only=True: {e}"
        ) from e
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    return sd


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 of the model's weights as safetensors bytes: a stable identity of the weights."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return hashlib.sha256(st_save(sd)).hexdigest()


def resolve_input(model: torch.nn.Module, model_kwargs: dict, input_size: int | None, mean, std
                  ) -> tuple[int, tuple[float, float, float], tuple[float, float, float]]:
    """Square input side, mean and std of a timm model: the configured values, else
    ``model_kwargs['img_size']`` for the side, else the model's pretrained config."""
    data_cfg = resolve_model_data_config(model)
    img = model_kwargs.get("img_size")
    size = int(input_size or (img if isinstance(img, int) else data_cfg["input_size"][-1]))
    return (size, tuple(float(m) for m in (mean or data_cfg["mean"])),
            tuple(float(s) for s in (std or data_cfg["std"])))


def num_feature_levels(model: torch.nn.Module) -> int:
    """How many indices ``forward_intermediates`` accepts (blocks for ViT, stages for Swin/CNN)."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ConfigError(f"{type(model).__name__} has no feature_info: timm cannot take intermediates from it")
    return len(info)


class Teacher:
    """A timm teacher in eval mode with its data config and requested taps.

    Args:
        cfg: which model and weights; input size, mean and std default to the model's
            pretrained config (``resolve_model_data_config``), ``model_kwargs['img_size']``
            overriding the input size.
        taps: feature taps; ``norm=True`` taps are the final features after the final norm.
        keep_prefix_tokens: keep cls/register tokens at the front of ViT-like taps.
        tail_input_index: block/stage whose output feeds the TPP tail (``pipeline.tpp``).

    With ``cfg.stochastic_depth`` the drop-path modules run as in the official recipes' train-mode
    teacher, each view's decisions seeded by its (seed, tar, position, view): every call then names
    its views (``pipeline.stochastic_depth``).
    """

    @classmethod
    def from_manifest(cls, m: Manifest, checkpoint: str | None = None, storage_options: dict | None = None, *,
                      device: str | torch.device = "cpu", where: str = "the cache") -> Teacher:
        """The teacher a cache was built from, with the cache's taps (and TPP tail input), loaded from
        ``checkpoint`` (default: the checkpoint the cache's config names). Refused unless its weights are
        the ones the cache was built from (sha256 of the weights, whatever file holds them)."""
        tc = m.config.teacher
        if checkpoint is not None:
            tc = tc.model_copy(update={"checkpoint": checkpoint, "pretrained": False})
        tc = tc.model_copy(update={"checkpoint_storage_options": dict(storage_options or {})})
        taps = [TapSpec(name=t.name, index=t.index, norm=t.norm) for t in m.features]
        teacher = cls(tc, taps, keep_prefix_tokens=m.config.targets.keep_prefix_tokens,
                      tail_input_index=m.tpp.spec.input_index if m.tpp else None, device=device)
        if teacher.weights_sha256 != m.teacher.weights_sha256:
            raise CacheMismatchError(
                f"teacher {tc.checkpoint or '(timm pretrained weights)'}: weights sha256 {teacher.weights_sha256[:12]}…, "
                f"{where} was built from {m.teacher.weights_sha256[:12]}…; pass the checkpoint the cache was made "
                "with (for a caching job: restore it, or cache to a new output URL)")
        return teacher

    def __init__(
        self,
        cfg: TeacherConfig,
        taps: list[TapSpec] = (),
        *,
        keep_prefix_tokens: bool = False,
        tail_input_index: int | None = None,
        device: str | torch.device = "cpu",
        model: torch.nn.Module | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        if model is None:
            model = self._create(cfg)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.weights_sha256 = state_dict_sha256(self.model)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        self.keep_prefix_tokens = keep_prefix_tokens
        self.input_size, self.mean, self.std = resolve_input(self.model, cfg.model_kwargs, cfg.input_size,
                                                             cfg.mean, cfg.std)
        self.num_classes = int(self.model.num_classes)
        self.num_levels = num_feature_levels(self.model)
        self.taps = [self._resolve(t) for t in taps]
        self.tail_input_index = tail_input_index
        self.autocast_dtype = self._autocast_dtype(cfg.precision)
        self.stochastic_depth = StochasticDepth(self.model, f"teacher {cfg.model}") if cfg.stochastic_depth else None

    @staticmethod
    def _create(cfg: TeacherConfig) -> torch.nn.Module:
        if not cfg.checkpoint and not cfg.pretrained:
            torch.manual_seed(RANDOM_INIT_SEED)
        try:
            model = timm.create_model(cfg.model, pretrained=cfg.pretrained, **cfg.model_kwargs)
        except RuntimeError as e:
            raise ConfigError(f"teacher.model {cfg.model!r}: timm could not create it: {e}") from e
        if cfg.checkpoint:
            sd = load_state_dict(cfg.checkpoint, cfg.checkpoint_storage_options)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ConfigError(
                    f"teacher.checkpoint {cfg.checkpoint} does not fit {cfg.model} "
                    f"{cfg.model_kwargs}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
                )
        return model

    def _resolve(self, tap: TapSpec) -> TapSpec:
        try:
            index = tap.resolve(self.num_levels)
        except ValueError as e:
            raise ConfigError(f"targets.features: {e} of {self.cfg.model}") from e
        return tap.model_copy(update={"index": index})

    def _autocast_dtype(self, precision: str) -> torch.dtype | None:
        if precision == "fp32" or (precision == "auto" and self.device.type != "cuda"):
            return None
        if precision == "fp16":
            return torch.float16
        return torch.bfloat16

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, views: Sequence[tuple[int, int, int, int]] | None = None) -> TeacherOutput:
        """``x`` [B, 3, H, W] normalised → logits, taps and TPP tail input, all fp32.

        ``views``: (recipe seed, tar, position, view) of each row, which seeds its drop-path decisions
        when the teacher runs with stochastic depth (required then, unused otherwise).
        """
        x = x.to(self.device, non_blocking=True)
        sd = contextlib.nullcontext()
        if self.stochastic_depth is not None:
            if views is None or len(views) != len(x):
                raise ValueError(f"teacher {self.cfg.model} runs with stochastic depth: give the (seed, tar, "
                                 f"position, view) of each of the {len(x)} rows")
            sd = self.stochastic_depth.masks(self.stochastic_depth.view_masks(views))
        wanted = sorted({t.index for t in self.taps if not t.norm} | (
            {self.tail_input_index} if self.tail_input_index is not None else set()))
        kwargs = {"indices": wanted or [self.num_levels - 1], "norm": False, "output_fmt": "NCHW"}
        if self.num_prefix_tokens:
            kwargs["return_prefix_tokens"] = True
        amp = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with amp, sd:
            final, inters = self.model.forward_intermediates(x, **kwargs)
            logits = self.model.forward_head(final)
        by_index = {}
        for idx, inter in zip(kwargs["indices"], inters, strict=True):
            spatial, prefix = inter if isinstance(inter, tuple) else (inter, None)
            by_index[idx] = (spatial.flatten(2).transpose(1, 2).float(), None if prefix is None else prefix.float())
        out = TeacherOutput(logits=logits.float())
        for tap in self.taps:
            if tap.norm:
                out.features[tap.name] = self._final_tokens(final.float())
            else:
                spatial, prefix = by_index[tap.index]
                keep = self.keep_prefix_tokens and prefix is not None
                out.features[tap.name] = torch.cat([prefix, spatial], 1) if keep else spatial
        if self.tail_input_index is not None:
            spatial, prefix = by_index[self.tail_input_index]
            out.tail_input = spatial if prefix is None else torch.cat([prefix, spatial], 1)
        return out

    def _final_tokens(self, final: torch.Tensor) -> torch.Tensor:
        """Final features → [B, N, D] tokens: NLC with prefix (ViT), NHWC (Swin) or NCHW (CNN)."""
        if final.ndim == 3:
            return final if self.keep_prefix_tokens else final[:, self.num_prefix_tokens:]
        if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
            return final.flatten(1, 2)
        return final.flatten(2).transpose(1, 2)

    def tap_infos(self, dtype: str) -> list[TapInfo]:
        """Every tap resolved, stored as ``dtype`` (a token codec), shapes from one forward of a zero image."""
        x = torch.zeros(1, 3, self.input_size, self.input_size)
        out = self(x, [(0, 0, 0, 0)])
        grids = self._grids(x)
        prefix = self.num_prefix_tokens if self.keep_prefix_tokens else 0
        return [TapInfo(name=t.name, index=t.index, norm=t.norm, tokens=out.features[t.name].shape[1],
                        dim=out.features[t.name].shape[2], grid=grids.get(t.index), prefix_tokens=prefix, dtype=dtype)
                for t in self.taps]

    @torch.inference_mode()
    def _grids(self, x: torch.Tensor) -> dict[int, tuple[int, int]]:
        inters = self.model.forward_intermediates(
            x.to(self.device), indices=list(range(self.num_levels)), output_fmt="NCHW", intermediates_only=True
        )
        return {i: tuple(t.shape[-2:]) for i, t in enumerate(inters)}
