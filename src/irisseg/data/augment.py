"""Tensor augmentation primitives shared by the episode stream and the lesion patch stream.

Every function takes channel-first tensors on a voxel grid, ``(C, D, H, W)`` float32, and a
``torch.Generator`` for its randomness, so a stream's augmentation is reproducible from its seed. They
work in voxel units: a rotation is about the grid's centre, blur widths are in voxels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rotation_matrix", "random_affine", "random_gamma", "gaussian_blur", "simulate_low_resolution"]


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rotation ``R_z @ R_y @ R_x`` for angles (3,) in radians about the three grid axes; returns (3, 3)."""
    cx, cy, cz = torch.cos(angles)
    sx, sy, sz = torch.sin(angles)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_affine(image: torch.Tensor, masks: torch.Tensor, rotate_deg: float, scale: tuple[float, float],
                  gen: torch.Generator, mask_padding: str = "zeros") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate and scale a volume and its masks about the grid centre, on the same grid.

    Draws three angles uniformly in ``[-rotate_deg, rotate_deg]`` degrees and one isotropic factor in
    ``scale`` (> 1 enlarges the content). The image is resampled trilinearly with border padding, the masks
    with nearest neighbour (so they stay binary), padded as ``mask_padding`` (``"zeros"`` or ``"border"``).

    Arguments:
      image (torch.Tensor): float32 (C, D, H, W).
      masks (torch.Tensor): (N, D, H, W), any dtype (returned as float32).
      rotate_deg (float): largest rotation about each axis, degrees.
      scale (tuple[float, float]): (min, max) scale factor.
      gen (torch.Generator): the randomness (4 numbers drawn).
      mask_padding (str): grid_sample padding mode of the masks.

    Returns:
      tuple[torch.Tensor, torch.Tensor]: the image (C, D, H, W) and masks (N, D, H, W), float32.
    """
    angles = (torch.rand(3, generator=gen) * 2 - 1) * math.radians(rotate_deg)
    factor = scale[0] + torch.rand(1, generator=gen).item() * (scale[1] - scale[0])
    theta = torch.zeros(1, 3, 4)
    theta[0, :, :3] = rotation_matrix(angles) / factor
    grid = F.affine_grid(theta, [1, 1, *image.shape[-3:]], align_corners=False)
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    masks = F.grid_sample(masks[None].float(), grid, mode="nearest", padding_mode=mask_padding,
                          align_corners=False)[0]
    return image, masks


def random_gamma(image: torch.Tensor, gamma: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """Gamma-transform each channel on its own [min, max] range, keeping that range (nnU-Net's gamma).

    The exponent is drawn log-uniformly in ``gamma`` (one per call, shared by the channels).

    Arguments:
      image (torch.Tensor): float32 (C, D, H, W), any intensity scale.
      gamma (tuple[float, float]): (min, max) exponent, both > 0.
      gen (torch.Generator): the randomness (1 number drawn).
    """
    lo_g, hi_g = math.log(gamma[0]), math.log(gamma[1])
    g = math.exp(lo_g + torch.rand(1, generator=gen).item() * (hi_g - lo_g))
    dims = tuple(range(1, image.dim()))
    lo = image.amin(dim=dims, keepdim=True)
    hi = image.amax(dim=dims, keepdim=True)
    unit = (image - lo) / (hi - lo).clamp_min(1e-6)
    return unit.clamp(0, 1).pow(g) * (hi - lo) + lo


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(3.0 * sigma + 0.5))  # as scipy.ndimage.gaussian_filter with truncate=3
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(image: torch.Tensor, sigmas: tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian blur of every channel, with a width per axis in voxels (0: that axis untouched).

    Edges are handled by replicate padding, so the mean intensity near the border is kept.

    Arguments:
      image (torch.Tensor): float32 (C, D, H, W).
      sigmas (tuple[float, float, float]): standard deviations along D, H, W, voxels.

    Returns:
      torch.Tensor: float32 (C, D, H, W).
    """
    out = image[:, None]  # (C, 1, D, H, W): channels as a batch
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        k = _gaussian_kernel(float(sigma))
        r = k.numel() // 2
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.view(shape))
    return out[:, 0]


def simulate_low_resolution(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Down-sample every channel by ``factor`` (< 1, nearest) and back up (trilinear), as a coarser scan would.

    Arguments:
      image (torch.Tensor): float32 (C, D, H, W).
      factor (float): in (0, 1]; 1 returns the image unchanged.

    Returns:
      torch.Tensor: float32 (C, D, H, W).
    """
    if factor >= 1.0:
        return image
    size = image.shape[-3:]
    small = [max(1, int(round(s * factor))) for s in size]
    low = F.interpolate(image[None], size=small, mode="nearest")
    return F.interpolate(low, size=tuple(size), mode="trilinear", align_corners=False)[0]
