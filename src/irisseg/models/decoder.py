"""IRIS mask decoder: bidirectional attention with the task tokens, then FiLM-conditioned up-sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from irisseg.models.blocks import MLP, AttentionBlock, FiLM, ResidualBlock, area_downsample
from irisseg.models.task_encoding import TaskEmbedding


def prototype_similarity(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query voxel with the foreground and background prototypes.

    Arguments:
      features (torch.Tensor): query features (B, C_s, D_s, H_s, W_s).
      prototypes (torch.Tensor): (B, N, 2, C_s) foreground / background prototypes per class.

    Returns:
      torch.Tensor: (B * N, 2, D_s, H_s, W_s) similarities in [-1, 1].
    """
    f = F.normalize(features, dim=1)
    p = F.normalize(prototypes.to(features.dtype), dim=-1)
    sim = torch.einsum("bcdhw,bnkc->bnkdhw", f, p)
    return rearrange(sim, "b n k d h w -> (b n) k d h w")


def _resize(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Box-average down or trilinear up to ``size`` (identity when it already has that size)."""
    if tuple(x.shape[-3:]) == tuple(size):
        return x
    if all(s <= t for s, t in zip(size, x.shape[-3:])):
        return area_downsample(x, size)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


class BidirectionalAttention(nn.Module):
    """Tokens attend to features, features attend to the updated tokens, tokens self-attend (pre-norm
    residuals throughout), then an MLP on the tokens.

    ``forward(features (B, L, C), tokens (B, T, C)) -> (features (B, L, C), tokens (B, T, C))``.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.tokens_to_features = AttentionBlock(dim, num_heads)
        self.features_to_tokens = AttentionBlock(dim, num_heads)
        self.token_self = AttentionBlock(dim, num_heads, cross=False)
        self.mlp = MLP(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens_to_features(tokens, features)
        features = self.features_to_tokens(features, tokens)
        tokens = self.token_self(tokens)
        tokens = tokens + self.mlp(self.norm(tokens))
        return features, tokens


class UpStage(nn.Module):
    """Transposed-conv 2x up-sampling, concatenation with the skip (and similarity maps), a residual
    block, and FiLM from the task summary."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, embed_dim: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_ch, out_ch, 2, stride=2)
        self.block = ResidualBlock(out_ch + skip_ch, out_ch)
        self.film = FiLM(out_ch, embed_dim)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        x = self.block(torch.cat([self.up(x), skip], dim=1))
        return self.film(x, summary)


class MaskDecoder(nn.Module):
    """Decodes query features and a task embedding into one logit map per class.

    Arguments:
      channels (tuple[int, ...]): encoder channels per scale ``(c0, c1, c2, C)``.
      num_heads (int): attention heads.
      use_similarity (bool): feed the prototype-similarity maps beside each skip and at the bottleneck.
      use_matching (bool): feed the propagated masks of :class:`~irisseg.models.matching.CorrespondenceMatcher`
        the same way (two channels per class at every scale: ``2 r - 1`` and a 0/1 flag saying whether
        matching was available; a task without a support memory gets zeros).
    """

    def __init__(self, channels: tuple[int, ...], num_heads: int, use_similarity: bool = True,
                 use_matching: bool = False):
        super().__init__()
        c0, c1, c2, dim = channels
        self.use_similarity = use_similarity
        self.use_matching = use_matching
        extra = (2 if use_similarity else 0) + (2 if use_matching else 0)
        self.bottleneck = nn.Conv3d(dim + extra, dim, 1)
        self.attention = BidirectionalAttention(dim, num_heads)
        self.stages = nn.ModuleList([
            UpStage(dim, c2 + extra, c2, dim),
            UpStage(c2, c1 + extra, c1, dim),
            UpStage(c1, c0 + extra, c0, dim),
        ])
        self.head = nn.Conv3d(c0, 1, 1)
        # Prototype prior: a learnable weight per scale on (fg - bg) similarity, added to the logits, so an
        # untrained decoder already predicts "voxels that look like the support's foreground".
        self.prior_weight = nn.Parameter(torch.full((len(channels),), 2.0)) if use_similarity else None
        # Matching prior: a learnable weight on (2 r - 1), r the propagated mask, added to the logits.
        self.match_weight = nn.Parameter(torch.tensor(3.0)) if use_matching else None

    def forward(self, features: list[torch.Tensor], task: TaskEmbedding, match: torch.Tensor | None = None
                ) -> torch.Tensor:
        """
        Arguments:
          features (list[torch.Tensor]): the query's encoder maps ``[f0, f1, f2, f3]``, each (B, C_s, ...).
          task (TaskEmbedding): tokens (B, N, m+1, C) and prototypes per scale.
          match (torch.Tensor | None): propagated masks (B, N, d, h, w) in [0, 1] at any encoder scale, or
            None (no support memory: the matching channels are zero).

        Returns:
          torch.Tensor: logits (B, N, D, H, W) at the query's full resolution.
        """
        B, N = task.tokens.shape[:2]
        per_class = [repeat(f, "b c d h w -> (b n) c d h w", n=N) for f in features]
        size = features[0].shape[-3:]
        prior = None
        if self.use_similarity:
            sims = [prototype_similarity(q, p) for q, p in zip(features, task.prototypes)]
            per_class = [torch.cat([f, sim], dim=1) for f, sim in zip(per_class, sims)]
            prior = sum(w * F.interpolate(sim[:, :1] - sim[:, 1:], size=size, mode="trilinear", align_corners=False)
                        for w, sim in zip(self.prior_weight, sims))
        if self.use_matching:
            r = None if match is None else rearrange(match, "b n d h w -> (b n) 1 d h w")

            def channels(f: torch.Tensor) -> torch.Tensor:  # (2 r - 1, available) at f's scale
                if r is None:
                    return f.new_zeros((f.shape[0], 2, *f.shape[-3:]))
                rs = _resize(r.to(f.dtype), tuple(f.shape[-3:]))
                return torch.cat([2 * rs - 1, torch.ones_like(rs)], dim=1)

            per_class = [torch.cat([f, channels(f)], dim=1) for f in per_class]
            if r is not None:
                term = self.match_weight * (2 * _resize(r.float(), tuple(size)) - 1)
                prior = term if prior is None else prior + term
        x = self.bottleneck(per_class[-1])
        d, h, w = x.shape[-3:]
        tokens = rearrange(task.tokens, "b n t c -> (b n) t c").to(x.dtype)
        x_tok, tokens = self.attention(rearrange(x, "bn c d h w -> bn (d h w) c"), tokens)
        x = rearrange(x_tok, "bn (d h w) c -> bn c d h w", d=d, h=h, w=w)
        summary = tokens.mean(dim=1)
        for stage, skip in zip(self.stages, reversed(per_class[:-1])):
            x = stage(x, skip, summary)
        logits = self.head(x) if prior is None else self.head(x) + prior.to(x.dtype)
        return rearrange(logits, "(b n) 1 d h w -> b n d h w", n=N)
