"""IRIS image encoder: a residual 3D CNN with four stages (total stride 8)."""

from __future__ import annotations

import torch
from torch import nn

from irisseg.models.blocks import ResidualBlock


class Encoder(nn.Module):
    """Stem residual block at full resolution, then three stride-2 residual blocks.

    Channels are ``base * (1, 2, 4, 8)``; InstanceNorm (affine) and LeakyReLU(0.01) throughout. The deepest
    map is projected to ``embed_dim`` channels by a 1x1x1 convolution when ``8 * base != embed_dim``.

    Arguments:
      in_channels (int): image channels (1 for CT or a single MRI sequence).
      base_channels (int): channels of the stem.
      embed_dim (int): channels of the deepest features (the attention width ``C``).

    ``forward(x (B, in_channels, D, H, W))`` with D, H, W multiples of 8 returns the list of feature maps
    ``[f0 (B, base, D, H, W), f1 (B, 2 base, D/2, ...), f2 (B, 4 base, D/4, ...), f3 (B, C, D/8, ...)]``;
    ``f0..f2`` are the decoder's skips, ``f3`` the deep features.
    """

    stride = 8

    def __init__(self, in_channels: int, base_channels: int, embed_dim: int):
        super().__init__()
        b = base_channels
        self.channels = (b, 2 * b, 4 * b, embed_dim)
        self.stem = ResidualBlock(in_channels, b)
        self.stages = nn.ModuleList(
            [ResidualBlock(b, 2 * b, stride=2), ResidualBlock(2 * b, 4 * b, stride=2), ResidualBlock(4 * b, 8 * b, stride=2)]
        )
        self.proj = nn.Identity() if 8 * b == embed_dim else nn.Conv3d(8 * b, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if any(s % self.stride for s in x.shape[-3:]):
            raise ValueError(f"input size {tuple(x.shape[-3:])} must be a multiple of {self.stride} on every axis")
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        feats[-1] = self.proj(feats[-1])
        return feats
