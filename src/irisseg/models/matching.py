"""Dense correspondence: propagate the support masks to the query by matching features.

Beyond the seed (which summarises the support into tokens and, here, prototypes): every voxel of the
query at one encoder scale attends to every voxel of every support at that scale, and reads out the
supports' mask values there, as space-time-memory networks do for video object segmentation. The result
is a coarse "propagated mask" per class, fed to the decoder beside the features. Prototypes say *what the
structure looks like*; matching says *where it is relative to its surroundings*, which is what tells a
structure apart from an unlabelled look-alike.

Keys are computed by one shared (siamese) projection from the query and the supports, so matching is a
learned, soft registration at the matching scale: stride 4 for ``iris-small`` (16^3 positions on its 64^3
grid), stride 8 for ``iris-base`` (16^3 on 128^3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from irisseg.models.blocks import area_downsample


class CorrespondenceMatcher(nn.Module):
    """Keys from encoder features, and the attention readout of support mask values.

    Arguments:
      channels (tuple[int, ...]): encoder channels per scale (full resolution first, the deepest last).
      scale (int): the encoder scale matched (index into ``channels``; 2 = stride 4).
      key_dim (int): key width ``C_k``.
      chunk (int): query positions per attention call (bounds memory on the CPU, where attention is
        materialised: ``chunk x L`` floats per call).

    Keys are ``normalise(conv1x1(f_scale) + up(conv1x1(f_deepest)))``: local features plus the context of
    the deepest map; their dot products are cosine similarities, scaled by a learnable temperature.
    """

    def __init__(self, channels: tuple[int, ...], scale: int = 2, key_dim: int = 64, chunk: int = 4096):
        super().__init__()
        if not 0 <= scale < len(channels):
            raise ValueError(f"matching scale {scale} outside the encoder's {len(channels)} scales")
        self.scale, self.chunk = scale, chunk
        self.local = nn.Conv3d(channels[scale], key_dim, 1)
        self.context = nn.Conv3d(channels[-1], key_dim, 1) if scale < len(channels) - 1 else None
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))

    def keys(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Unit-norm keys (B, C_k, d, h, w) at the matching scale from encoder maps ``[f0, ..., f3]``."""
        k = self.local(features[self.scale])
        if self.context is not None:
            k = k + F.interpolate(self.context(features[-1]), size=k.shape[-3:], mode="trilinear", align_corners=False)
        return F.normalize(k.float(), dim=1).to(k.dtype)

    def memory(self, features: list[torch.Tensor], masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The support set's dense memory.

        Arguments:
          features (list[torch.Tensor]): encoder maps of the B*K supports, each (B*K, C_s, D_s, H_s, W_s).
          masks (torch.Tensor): (B, K, N, D, H, W) binary masks at full resolution.

        Returns:
          tuple: keys (B, K*L, C_k) and values (B, N, K*L), the foreground fraction of each key's voxel,
          L = d*h*w at the matching scale.
        """
        B, K = masks.shape[:2]
        keys = self.keys(features)
        size = tuple(keys.shape[-3:])
        flat = rearrange(masks, "b k n d h w -> (b k) n d h w").to(keys.dtype)
        values = area_downsample(flat, size)
        keys = rearrange(keys, "(b k) c d h w -> b (k d h w) c", b=B, k=K)
        values = rearrange(values, "(b k) n d h w -> b n (k d h w)", b=B, k=K)
        return keys, values

    def readout(self, features: list[torch.Tensor], keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Propagated masks of the query.

        Arguments:
          features (list[torch.Tensor]): the query's encoder maps, each (B, C_s, D_s, H_s, W_s).
          keys (torch.Tensor): (B, L, C_k) from :meth:`memory`; values (torch.Tensor): (B, N, L).

        Returns:
          torch.Tensor: (B, N, d, h, w) in [0, 1] at the matching scale: per query voxel, the
          attention-weighted mean of the support mask values.
        """
        q = self.keys(features)
        d, h, w = q.shape[-3:]
        q = rearrange(q, "b c d h w -> b 1 (d h w) c")
        k = keys.to(q.dtype)[:, None]
        v = rearrange(values.to(q.dtype), "b n l -> b 1 l n")
        q = q * self.log_temperature.exp().to(q.dtype)  # the temperature, kept in the graph
        outs = [F.scaled_dot_product_attention(q[:, :, i:i + self.chunk], k, v, scale=1.0)
                for i in range(0, q.shape[2], self.chunk)]
        out = torch.cat(outs, dim=2)[:, 0]  # (B, d*h*w, N)
        return rearrange(out, "b (d h w) n -> b n d h w", d=d, h=h, w=w).clamp(0.0, 1.0)
