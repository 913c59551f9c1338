"""Teacher feature taps: what is requested (:class:`TapSpec`) and what a cache resolved (:class:`TapInfo`).

A tap is a point in the teacher taken through timm's ``forward_intermediates``: the output of
block (ViT/EVA) or stage (Swin, CNN) ``index``, or with ``norm: true`` the final features after the
final norm. A caching config lists specs (``targets.features``); a KD method states the specs it
needs (``KDMethod.requires``); the caching job resolves each spec against the live teacher into a
:class:`TapInfo` (non-negative index, token count, width, grid, storage dtype), stored in the
manifest's ``features``. A method's spec is matched to a cached tap by the point it names (index
and norm, resolved), not by its name, so ``{name: b0, index: 0}`` serves a method asking for
``block0``.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, field_validator

TAP_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class TapSpec(BaseModel):
    """One requested tap. ``index`` is a block/stage index, negative from the end; ``norm: true``
    takes the model's final features after its final norm and is valid for the last index only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    index: int
    norm: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TAP_NAME.match(v):
            raise ValueError(f"tap name {v!r} must match {TAP_NAME.pattern}")
        return v

    def resolve(self, levels: int) -> int:
        """The non-negative index in a teacher with ``levels`` feature levels; ValueError if out of range
        or if ``norm`` names another level than the last."""
        index = self.index + levels if self.index < 0 else self.index
        if not 0 <= index < levels:
            raise ValueError(f"tap {self.name!r}: index {self.index} out of range for {levels} levels")
        if self.norm and index != levels - 1:
            raise ValueError(f"tap {self.name!r}: norm=true means the final normed features, so index must be "
                             f"the last ({levels - 1} or -1), got {self.index}")
        return index

    def yaml(self) -> str:
        """How to ask for it in a cache config's ``targets.features``."""
        return f"{{name: {self.name}, index: {self.index}" + (", norm: true}" if self.norm else "}")


class TapInfo(BaseModel):
    """A resolved, cached tap (manifest ``features[i]``): ``[N, D]`` tokens per view, the first
    ``prefix_tokens`` of them prefix (cls/register) tokens; ``grid`` is (H, W) of the others when they
    form one; ``dtype`` names the token codec (:mod:`storage_schemas.codecs`)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    index: int  # resolved, non-negative
    norm: bool
    tokens: int
    dim: int
    grid: tuple[int, int] | None  # (H, W) of the patch tokens when they form a grid
    prefix_tokens: int  # prefix tokens kept at the front of ``tokens`` (0 by default)
    dtype: str

    @property
    def target(self) -> str:
        """The tap's key in stats, fidelity and summaries."""
        return f"feature:{self.name}"

    @property
    def patch_tokens(self) -> int:
        return self.tokens - self.prefix_tokens

    def serves(self, spec: TapSpec, levels: int | None) -> bool:
        """Whether this cached tap is the point ``spec`` asks for. ``levels`` (the teacher's feature levels,
        when known) resolves a negative index; without it a negative index matches the last level only
        through ``norm`` taps, which are the last by definition."""
        if spec.norm != self.norm:
            return False
        if spec.norm:
            return True
        if spec.index >= 0:
            return spec.index == self.index
        return levels is not None and spec.index + levels == self.index



def find_serving(taps: list[TapInfo] | tuple[TapInfo, ...], spec: TapSpec, levels: int | None) -> TapInfo | None:
    """The cached tap at the point ``spec`` names: the one of the same name if it serves, else the first that does."""
    serving = [t for t in taps if t.serves(spec, levels)]
    return next((t for t in serving if t.name == spec.name), serving[0] if serving else None)
