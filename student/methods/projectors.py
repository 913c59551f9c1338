"""ScaleKD's cross-attention projector (CAP) and the official head counts, used by :mod:`.scalekd`
(reference/methods.md "ScaleKD"; official ``AttentionProjector`` in ``fmd.py`` / ``fmd_convnext.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from storage_schemas.errors import ConfigError

from .base import StudentInfo


def default_heads(dim: int, head_dim: int = 64) -> int:
    """Largest head count ≤ dim // head_dim (at least 1) that divides ``dim``."""
    h = max(1, dim // head_dim)
    while dim % h:
        h -= 1
    return h


# The official configs' CAP head counts for CNN students, by the teacher's (s3, s4) widths:
# Swin-L (768, 1536), Swin-B (512, 1024), Swin-S (384, 768); isotropic token students use 8 at both.
CNN_HEADS = {(768, 1536): (16, 24), (512, 1024): (8, 16), (384, 768): (3, 6)}
ISOTROPIC_HEADS = (8, 8)


def official_heads(student: StudentInfo, s3_dim: int, s4_dim: int) -> tuple[int, int]:
    """(s3, s4) head counts as the official code would use them (see the module docstring)."""
    if student.vit_like and student.isotropic and all(d % h == 0 for d, h in zip((s3_dim, s4_dim), ISOTROPIC_HEADS,
                                                                                  strict=True)):
        return ISOTROPIC_HEADS
    return CNN_HEADS.get((s3_dim, s4_dim)) or (default_heads(s3_dim), default_heads(s4_dim))


class CrossAttentionProjector(nn.Module):
    """ScaleKD CAP: student map [B, C_s, H, W] (+ queries [B, N_q, C_t]) → [B, N_q, C_t]."""

    def __init__(self, student_shape: tuple[int, int, int], dim: int, num_queries: int, *, num_heads: int,
                 softmax_scale: float, learn_query: bool, query_proj: bool = True, layernorm2d: bool = False) -> None:
        super().__init__()
        cs, h, w = student_shape
        if dim % num_heads:
            raise ConfigError(f"ScaleKD CAP: num_heads {num_heads} does not divide the teacher width {dim}")
        self.num_queries, self.num_heads = num_queries, num_heads
        self.scale = (dim // num_heads) ** -0.5 * softmax_scale
        norm = LayerNorm2d(cs) if layernorm2d else nn.BatchNorm2d(cs)
        self.proj_student = nn.Sequential(nn.Conv2d(cs, cs, 3, padding=1), norm, nn.ReLU())
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, cs, h, w), std=0.02))
        self.query = nn.Parameter(torch.randn(num_queries, dim)) if learn_query else None
        self.query_proj = nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) if query_proj else nn.Identity()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(cs, dim), nn.Linear(cs, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        kv = (self.proj_student(x) + self.pos_embed).flatten(2).transpose(1, 2)  # [B, H*W, C_s]
        if query is None:
            if self.query is None:
                raise ValueError("ScaleKD CAP: this projector takes its queries from the TPP path; none given")
            query = self.query.expand(B, -1, -1)
        if query.shape[1] != self.num_queries:
            raise ValueError(f"ScaleKD CAP: expected {self.num_queries} queries, got {query.shape[1]}")

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # [B, h, N, d]

        q, k, v = heads(self.q(self.query_proj(query))), heads(self.k(kv)), heads(self.v(kv))
        a = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).flatten(2)
        a = self.norm(self.proj(a))
        return a + self.ffn(a)
