"""The spec of the ScaleKD teacher-parameter-perception pack (``tpp/spec.json``, ``manifest.tpp.spec``).

It says how to rebuild the teacher's frozen tail with timm without the rest of the teacher
(``pipeline.tpp.build_tail``): timm name and kwargs, which blocks (ViT/EVA) or stages (Swin)
plus the final norm, and what goes in and out. ``tpp/spec.json`` is
``json.dumps(spec, indent=1, sort_keys=True)`` of the fields below and ``weights_sha256``;
the manifest embeds the same spec without ``weights_sha256``.

Keys only some families have are absent, not null, for the others, and a key's absence
differs from ``null``: EVA's ``"rope": null`` means an EVA without rope. So a field that is
not set is left out when dumping (:meth:`TPPSpec.to_json_bytes`, and inside the manifest).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_serializer, model_validator

__all__ = ["RopeInfo", "TailInput", "TailOutput", "TailTap", "TPPSpec"]

Family = Literal["vit", "eva", "swin"]


class _SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler):
        # absent stays absent (field order = declaration order, as the manifest stores it)
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


class TailTap(_SpecModel):
    """How the caching job reads the tail's input: ``forward_intermediates`` arguments."""

    indices: list[int]
    norm: bool
    output_fmt: Literal["NLC", "NCHW"]
    return_prefix_tokens: bool


class TailInput(_SpecModel):
    """Tokens the tail takes, ``[B, tokens, dim]``; ``tokens = prefix_tokens + grid[0] * grid[1]``."""

    format: Literal["NLC"]
    tokens: int
    grid: tuple[int, int]
    dim: int
    prefix_tokens: int
    accepts_without_prefix: bool | None = None  # ViT/EVA only: grid tokens alone are accepted too
    dynamic_img_size: bool | None = None  # ViT/EVA only
    tap: TailTap
    assemble: str  # how the tap's outputs become the input, as code


class TailOutput(_SpecModel):
    """Final features after the final norm, ``[B, tokens, dim]``."""

    format: Literal["NLC"]
    tokens: int
    grid: tuple[int, int]
    dim: int
    prefix_tokens: int
    final_norm: str  # class name of the teacher's final norm


class RopeInfo(_SpecModel):
    """EVA rotary embedding, shared by the tail's blocks."""

    type: str
    mixed: bool  # per-block learnable frequencies (rope params travel in the pack)
    feat_shape: list[int] | None


# keys that only some families have: set exactly for those (on TPPSpec / on TailInput)
_ONLY_FOR = {"rope": {"eva"}, "windows": {"swin"}}
_INPUT_ONLY_FOR = {"accepts_without_prefix": {"vit", "eva"}, "dynamic_img_size": {"vit", "eva"}}


class TPPSpec(_SpecModel):
    """The TPP pack's spec. Every field is required unless noted; see the module docstring."""

    spec_version: int
    method: str
    family: Family
    model_name: str  # timm name, and below its architecture kwargs (JSON values)
    model_kwargs: dict[str, Any]
    tail: int  # number of blocks/stages in the tail
    depth: int  # blocks/stages of the whole teacher
    unit: Literal["block", "stage"]
    indices: list[int]  # the tail's blocks/stages
    input_index: int  # block/stage whose output is the tail's input
    input: TailInput
    output: TailOutput
    windows: list[tuple[tuple[int, int], tuple[int, int]]] | None = None  # swin only: (window, shift) per block
    rope: RopeInfo | None = None  # eva only, null when the model has no rope
    modules: list[str]  # top-level tail modules, as named in the teacher
    num_params: int
    num_tensors: int
    dtype: str  # torch dtype name of the floating tensors
    timm_version: str
    torch_version: str
    weights_sha256: str | None = None  # of tpp/tail.safetensors; in spec.json, not in the manifest

    @model_validator(mode="after")
    def _family_keys(self) -> TPPSpec:
        have = {k for k in _ONLY_FOR if k in self.model_fields_set}
        have |= {f"input.{k}" for k in _INPUT_ONLY_FOR if k in self.input.model_fields_set}
        want = {k for k, fams in _ONLY_FOR.items() if self.family in fams}
        want |= {f"input.{k}" for k, fams in _INPUT_ONLY_FOR.items() if self.family in fams}
        if have != want:
            lacks = f"lacks {sorted(want - have)}" if want - have else ""
            extra = f"has {sorted(have - want)}, which only other families have" if have - want else ""
            raise ValueError(f"a {self.family} spec {' and '.join(filter(None, (lacks, extra)))}")
        return self

    def with_weights(self, sha256: str) -> TPPSpec:
        """This spec naming the weights it belongs to (what ``tpp/spec.json`` stores)."""
        return self.model_copy(update={"weights_sha256": sha256})

    def to_json_bytes(self) -> bytes:
        """The bytes of ``tpp/spec.json``: sorted keys, indent 1, only the fields that are set."""
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes | str, where: str) -> TPPSpec:
        """Parse ``tpp/spec.json`` (or an old cache's); ``where`` names the file in errors."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as e:
            raise ValueError(f"{where}: not a valid TPP pack spec: {e}") from e
