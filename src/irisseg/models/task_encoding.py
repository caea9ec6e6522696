"""IRIS task encoding: what to segment, from support images and masks.

A task is represented by a :class:`TaskEmbedding`: the seed's token embedding ``[T_f, T_c]`` (``m + 1``
tokens of width ``C`` per class) plus, per encoder scale, the support's foreground and background
prototypes (mask-weighted mean features), which the decoder compares with the query's features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from irisseg.models.blocks import (
    MLP,
    AttentionBlock,
    area_downsample,
    masked_mean,
    pixel_shuffle_3d,
    pixel_unshuffle_3d,
)


@dataclass
class TaskEmbedding:
    """The task representation the decoder consumes, for ``N`` classes of a batch of ``B`` tasks.

    Attributes:
      tokens (torch.Tensor): (B, N, m + 1, C): the foreground token ``T_f`` then ``m`` context tokens ``T_c``.
      prototypes (tuple[torch.Tensor, ...]): one (B, N, 2, C_s) tensor per encoder scale s (full resolution
        first): foreground [:, :, 0] and background [:, :, 1] mean features at that scale.
      keys (torch.Tensor | None): the support set's dense matching keys (B, L, C_k), L = K x the voxels of
        the matching scale (see :class:`irisseg.models.matching.CorrespondenceMatcher`); None when the task
        has no support behind it (memory bank) or the model does not match.
      values (torch.Tensor | None): (B, N, L) foreground fraction of each key's voxel, per class.

    The *embedding* proper is ``tokens`` + ``prototypes`` (:meth:`tensors`): that is what the memory bank
    averages and stores, what the tuner optimises and what :meth:`mean` averages. ``keys`` / ``values``
    are the support's dense memory: they follow batch / class selection and device moves, and are joined
    along ``L`` when supports are pooled; they are dropped when a class comes from the memory bank.
    """

    tokens: torch.Tensor
    prototypes: tuple[torch.Tensor, ...]
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """The embedding's tensors, tokens first (for optimisers, EMA and serialisation); no keys/values."""
        return [self.tokens, *self.prototypes]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor], keys: torch.Tensor | None = None,
                     values: torch.Tensor | None = None) -> TaskEmbedding:
        return cls(tensors[0], tuple(tensors[1:]), keys, values)

    @property
    def has_matching(self) -> bool:
        return self.keys is not None and self.values is not None

    def without_matching(self) -> TaskEmbedding:
        """The same embedding without the dense support memory (as a memory-bank task would be)."""
        return TaskEmbedding(self.tokens, self.prototypes)

    def map(self, fn) -> TaskEmbedding:
        """Apply ``fn`` to every tensor (keys and values included)."""
        keys = fn(self.keys) if self.keys is not None else None
        values = fn(self.values) if self.values is not None else None
        return TaskEmbedding.from_tensors([fn(t) for t in self.tensors()], keys, values)

    def detach(self) -> TaskEmbedding:
        return self.map(lambda t: t.detach())

    def clone(self) -> TaskEmbedding:
        return self.map(lambda t: t.clone())

    def to(self, *args, **kwargs) -> TaskEmbedding:
        return self.map(lambda t: t.to(*args, **kwargs))

    @property
    def num_classes(self) -> int:
        return self.tokens.shape[1]

    def select(self, classes: list[int] | slice) -> TaskEmbedding:
        """Keep some classes (dimension 1)."""
        values = self.values[:, classes] if self.values is not None else None
        return TaskEmbedding.from_tensors([t[:, classes] for t in self.tensors()], self.keys, values)

    def expand_batch(self, batch: int) -> TaskEmbedding:
        """Repeat a batch-1 embedding ``batch`` times (one task answering several queries)."""
        if self.tokens.shape[0] == batch:
            return self
        return self.map(lambda t: t.expand(batch, *t.shape[1:]))

    @staticmethod
    def cat(embeddings: list[TaskEmbedding], dim: int = 1) -> TaskEmbedding:
        """Concatenate along classes (dim 1) or batch (dim 0).

        The dense support memory survives only when every part has one and they can be joined: along
        classes, the parts must share the same keys (one support set); along the batch, the same ``L``.
        """
        parts = list(zip(*(e.tensors() for e in embeddings)))
        out = [torch.cat(p, dim=dim) for p in parts]
        keys = values = None
        if all(e.has_matching for e in embeddings):
            first = embeddings[0].keys
            if dim == 1 and all(e.keys is first for e in embeddings):
                keys, values = first, torch.cat([e.values for e in embeddings], dim=1)
            elif dim == 0 and len({e.keys.shape[1:] for e in embeddings}) == 1:
                keys = torch.cat([e.keys for e in embeddings], dim=0)
                values = torch.cat([e.values for e in embeddings], dim=0)
        return TaskEmbedding.from_tensors(out, keys, values)

    @staticmethod
    def mean(embeddings: list[TaskEmbedding]) -> TaskEmbedding:
        """Element-wise average of the embeddings (the context ensemble); their dense support memories,
        when all have one, are pooled (joined along ``L``)."""
        parts = list(zip(*(e.tensors() for e in embeddings)))
        keys = values = None
        if all(e.has_matching for e in embeddings):
            keys = torch.cat([e.keys for e in embeddings], dim=1)
            values = torch.cat([e.values for e in embeddings], dim=2)
        return TaskEmbedding.from_tensors([torch.stack(p).mean(0) for p in parts], keys, values)


def upsample_adjoint(mask: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Weights ``w`` on a coarse grid such that ``sum(up(F) * mask) == sum(F * w)`` exactly.

    ``up`` is trilinear upsampling (``align_corners=False``) from ``size`` to the mask's size, which is
    separable: ``w = mask x_D A_D x_H A_H x_W A_W`` with ``A`` the 1D interpolation matrices. Pooling the
    upsampled support features under the full-resolution mask (the seed's foreground pooling) thus costs
    no full-resolution feature map.

    Arguments:
      mask (torch.Tensor): (B, N, D, H, W).
      size (tuple[int, int, int]): the coarse grid (d, h, w).

    Returns:
      torch.Tensor: (B, N, d, h, w).
    """
    mats = []
    for full, small in zip(mask.shape[-3:], size):
        eye = torch.eye(small, device=mask.device, dtype=torch.float32)[None]  # (1, small, small)
        mats.append(F.interpolate(eye, size=full, mode="linear", align_corners=False)[0].T.to(mask.dtype))  # (full, small)
    return torch.einsum("bnDHW,Dd,Hh,Ww->bndhw", mask, *mats)


class TaskEncoder(nn.Module):
    """Encodes (support features, support masks) into a :class:`TaskEmbedding`.

    Arguments:
      channels (tuple[int, ...]): encoder channels per scale, the last being the width ``C``.
      num_tokens (int): ``m`` learnable query tokens.
      num_heads (int): attention heads.
      ratio (int): pixel-shuffle ratio, equal to the encoder's total stride (8).
      context_channels (int | None): channels of the full-resolution context path (``ceil(C / ratio^3)``).
    """

    def __init__(self, channels: tuple[int, ...], num_tokens: int, num_heads: int, ratio: int = 8,
                 context_channels: int | None = None):
        super().__init__()
        dim = channels[-1]
        self.ratio = ratio
        self.ctx_ch = context_channels or max(1, math.ceil(dim / ratio**3))
        r3 = ratio**3
        self.pre_shuffle = nn.Conv3d(dim, self.ctx_ch * r3, 1)
        self.context_conv = nn.Sequential(
            nn.Conv3d(self.ctx_ch + 1, self.ctx_ch, 3, padding=1), nn.LeakyReLU(0.01, inplace=True)
        )
        self.post_unshuffle = nn.Sequential(
            nn.Conv3d(self.ctx_ch * r3, dim, 1), nn.LeakyReLU(0.01, inplace=True), nn.Conv3d(dim, dim, 1)
        )
        self.query_tokens = nn.Parameter(torch.randn(1, num_tokens, dim) * dim**-0.5)
        self.cross_attn = AttentionBlock(dim, num_heads)
        self.self_attn = AttentionBlock(dim, num_heads, cross=False)
        self.mlp = MLP(dim, 2 * dim)
        self.norm_out = nn.LayerNorm(dim)
        self.fg_proj = nn.Linear(dim, dim)

    def forward(self, features: list[torch.Tensor], masks: torch.Tensor) -> TaskEmbedding:
        """Encode every (support, class) pair and average over the supports.

        Arguments:
          features (list[torch.Tensor]): encoder maps of the supports, each (B*K, C_s, D_s, H_s, W_s).
          masks (torch.Tensor): (B, K, N, D, H, W) binary masks at full resolution.

        Returns:
          TaskEmbedding: tokens (B, N, m+1, C) and prototypes (B, N, 2, C_s) per scale; a support whose
          mask of a class is empty does not count in that class's average.
        """
        B, K, N = masks.shape[:3]
        flat = rearrange(masks, "b k n d h w -> (b k) n d h w").to(features[-1].dtype)
        deep = features[-1]
        # Step 1: foreground pooling of the upsampled deep features under the full-resolution mask.
        t_f = masked_mean(deep, upsample_adjoint(flat, tuple(deep.shape[-3:])))  # (BK, N, C)
        # Per-scale foreground / background prototypes.
        prototypes = []
        for feat in features:
            w = area_downsample(flat, tuple(feat.shape[-3:]))
            prototypes.append(torch.stack([masked_mean(feat, w), masked_mean(feat, 1.0 - w)], dim=2))  # (BK, N, 2, C_s)
        # Step 2: context path (shuffle to mask resolution, concatenate the mask, unshuffle back).
        shuffled = pixel_shuffle_3d(self.pre_shuffle(deep), self.ratio)  # (BK, ctx, D, H, W)
        shuffled = repeat(shuffled, "bk c d h w -> (bk n) c d h w", n=N)
        ctx = self.context_conv(torch.cat([shuffled, rearrange(flat, "bk n d h w -> (bk n) 1 d h w")], dim=1))
        ctx = self.post_unshuffle(pixel_unshuffle_3d(ctx, self.ratio))  # (BKN, C, d, h, w)
        ctx_tokens = rearrange(ctx, "bkn c d h w -> bkn (d h w) c")
        # Step 3: learnable queries cross-attend to the context, then self-attend.
        q = self.query_tokens.expand(ctx_tokens.shape[0], -1, -1)
        q = self.cross_attn(q, ctx_tokens)
        q = self.self_attn(q)
        q = q + self.mlp(q)
        t_c = rearrange(self.norm_out(q), "(bk n) m c -> bk n m c", n=N)
        tokens = torch.cat([self.fg_proj(t_f).unsqueeze(2), t_c], dim=2)  # (BK, N, m+1, C)
        # Average over the K supports, counting only supports where the class is present.
        present = (flat.flatten(2).amax(-1) > 0).to(tokens.dtype)  # (BK, N)
        weights = rearrange(present, "(b k) n -> b k n", k=K)
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1.0)

        def reduce(t: torch.Tensor) -> torch.Tensor:
            t = rearrange(t, "(b k) n ... -> b k n ...", k=K)
            return torch.einsum("bkn...,bkn->bn...", t, weights.to(t.dtype))

        return TaskEmbedding(reduce(tokens), tuple(reduce(p) for p in prototypes))
