"""Building blocks shared by irisseg's 3D networks: residual blocks, FiLM, attention, 3D pixel shuffle.

All modules take and return ``(B, C, D, H, W)`` tensors unless stated otherwise.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = [
    "ResidualBlock",
    "InstanceNorm",
    "nd_layers",
    "NORMS",
    "FiLM",
    "AttentionBlock",
    "MLP",
    "pixel_shuffle_3d",
    "pixel_unshuffle_3d",
    "autocast_for",
    "inference_autocast",
    "cpu_has_native_bf16",
    "PRECISIONS",
    "check_precision",
]


class InstanceNorm(nn.GroupNorm):
    """Instance normalisation (affine) of ``(B, C, *spatial)`` tensors that keeps the input's memory format.

    Each sample's channel ``c`` is normalised over its spatial axes, ``y = (x - mean) / sqrt(var + eps) *
    weight[c] + bias[c]`` (biased variance, eps 1e-5): exactly ``nn.InstanceNorm3d(C, affine=True)`` (and
    2D), with the same parameter names, written as a GroupNorm with one group per channel. Unlike
    ``nn.InstanceNorm3d``, it returns a channels-last tensor for a channels-last input, so a network of
    :class:`ResidualBlock` stays channels-last from end to end, which makes oneDNN's 3D convolutions (and
    their backward pass above all) markedly faster on the CPU. A single spatial element normalises to
    ``bias`` (InstanceNorm refuses it in training).

    Arguments:
      num_features (int): channels C. affine (bool): learn ``weight`` and ``bias`` (default True).
    """

    def __init__(self, num_features: int, affine: bool = True):
        super().__init__(num_features, num_features, affine=affine)


#: Normalisations a :class:`ResidualBlock` can use (``norm=``).
NORMS = ("instance", "batch")


def nd_layers(spatial_dims: int = 3, norm: str = "instance") -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    """The convolution, transposed convolution and normalisation classes for 2D or 3D networks.

    Arguments:
      spatial_dims (int): 2 (``(B, C, H, W)`` tensors) or 3 (``(B, C, D, H, W)``).
      norm (str): ``"instance"`` (:class:`InstanceNorm`, per sample and channel over its spatial axes) or
        ``"batch"`` (``nn.BatchNorm3d`` / ``nn.BatchNorm2d``: statistics over the batch in training, running
        averages in eval mode, so a voxel's output does not depend on what else is in the input window).

    Returns:
      tuple: ``(Conv, ConvTranspose, Norm)``, e.g. ``(nn.Conv3d, nn.ConvTranspose3d, InstanceNorm)``
      (:class:`InstanceNorm` serves both dimensions).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if spatial_dims == 3:
        return nn.Conv3d, nn.ConvTranspose3d, InstanceNorm if norm == "instance" else nn.BatchNorm3d
    if spatial_dims == 2:
        return nn.Conv2d, nn.ConvTranspose2d, InstanceNorm if norm == "instance" else nn.BatchNorm2d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A 5D ``(B, C, D, H, W)`` tensor in the ``channels_last_3d`` memory format (values and shape unchanged,
    no copy when it already is); other ranks are returned as they are (2D convolutions measured slower
    channels-last on the CPU)."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else x


class ResidualBlock(nn.Module):
    """Two 3x3x3 convolutions with InstanceNorm (affine; or BatchNorm) and LeakyReLU(0.01), plus a shortcut.

    In 3D the block works channels-last (:func:`channels_last`; the output is channels-last too): the
    same values, computed faster by oneDNN on the CPU (a 16-128-channel U-Net's training step on 4 x 32^3
    patches, 2 threads: 0.82 s -> 0.69 s; sliding-window inference of a 64^3 volume: 1.70 s -> 1.25 s).

    Arguments:
      in_channels, out_channels (int): channel counts.
      stride (int | tuple[int, ...]): stride of the first convolution (2 halves D, H and W; a tuple such as
        ``(1, 2, 2)`` strides each axis on its own); the shortcut is a strided 1x1x1 convolution whenever
        the shape changes.
      spatial_dims (int): 3 (default, ``nn.Conv3d``) or 2 (the same block with ``nn.Conv2d`` on
        ``(B, C, H, W)`` tensors). Parameter names do not depend on it.
      norm (str): ``"instance"`` (default) or ``"batch"`` (:func:`nd_layers`).

    Input ``(B, in_channels, D, H, W)`` -> output ``(B, out_channels, D/stride, H/stride, W/stride)``
    (sizes rounded up: ``ceil(D / stride)``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int | tuple[int, ...] = 1,
                 spatial_dims: int = 3, norm: str = "instance"):
        super().__init__()
        conv, _, norm = nd_layers(spatial_dims, norm)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm(out_channels, affine=True)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = norm(out_channels, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        strided = any(s != 1 for s in stride) if isinstance(stride, (tuple, list)) else stride != 1
        if strided or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False),
                norm(out_channels, affine=True),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = channels_last(x)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class FiLM(nn.Module):
    """Feature-wise linear modulation: ``x * (1 + gamma(t)) + beta(t)``.

    Arguments:
      channels (int): channels of the modulated feature map.
      embed_dim (int): width of the conditioning vector.

    ``forward(x (B, channels, D, H, W), t (B, embed_dim)) -> (B, channels, D, H, W)``. Initialised to the
    identity (gamma = beta = 0), so an untrained FiLM leaves features unchanged.
    """

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.linear = nn.Linear(embed_dim, 2 * channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gamma, beta = rearrange(self.linear(t), "b (two c) -> two b c 1 1 1", two=2)
        return x * (1 + gamma) + beta


class MLP(nn.Module):
    """Two-layer perceptron with GELU, ``(..., dim) -> (..., dim)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AttentionBlock(nn.Module):
    """Multi-head attention with a pre-norm residual: ``x + Attn(LN(x), LN(context))``.

    Uses ``torch.nn.functional.scaled_dot_product_attention`` (via ``nn.MultiheadAttention``).

    Arguments:
      dim (int): token width; num_heads (int): heads (``dim`` must be divisible by it).
      cross (bool): cross-attention (with its own norm of the context) or self-attention.

    ``forward(x (B, Nq, dim), context (B, Nk, dim) | None) -> (B, Nq, dim)``; self-attention takes no
    context.
    """

    def __init__(self, dim: int, num_heads: int, cross: bool = True):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim) if cross else None
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q = self.norm_q(x)
        if (context is None) != (self.norm_kv is None):
            raise ValueError("cross-attention needs a context; self-attention takes none")
        kv = q if context is None else self.norm_kv(context)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        return x + out


def pixel_shuffle_3d(x: torch.Tensor, r: int) -> torch.Tensor:
    """Move channels to space: ``(B, C * r^3, d, h, w) -> (B, C, d * r, h * r, w * r)``."""
    return rearrange(x, "b (c r1 r2 r3) d h w -> b c (d r1) (h r2) (w r3)", r1=r, r2=r, r3=r)


def pixel_unshuffle_3d(x: torch.Tensor, r: int) -> torch.Tensor:
    """Move space to channels, the inverse of :func:`pixel_shuffle_3d`: ``(B, C, D, H, W) -> (B, C*r^3, D/r, H/r, W/r)``."""
    return rearrange(x, "b c (d r1) (h r2) (w r3) -> b (c r1 r2 r3) d h w", r1=r, r2=r, r3=r)


def masked_mean(features: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Weighted spatial mean ``sum(F * w) / (sum(w) + eps)``.

    Arguments:
      features (torch.Tensor): (B, C, D, H, W).
      weights (torch.Tensor): (B, N, D, H, W) non-negative weights (e.g. masks at the features' scale).

    Returns:
      torch.Tensor: (B, N, C), one mean feature vector per weight map.
    """
    num = torch.einsum("bcdhw,bndhw->bnc", features, weights.to(features.dtype))
    den = weights.sum(dim=(-3, -2, -1)).to(features.dtype).unsqueeze(-1)
    return num / (den + eps)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, a no-op context on the CPU (models run unchanged on both)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX tiles).

    There bf16 autocast speeds up 3D convolutions (sliding-window inference of a 64^3 volume with the lesion
    U-Net: 0.175 s against 0.383 s on 2 cores, ``benchmarks/lesion_speed.py``); elsewhere bf16 is emulated
    and slower.
    """
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # older or other builds: assume emulated
        return False


def check_precision(precision: str) -> str:
    """``precision`` itself if it is one of :data:`PRECISIONS`; else an InputError naming the choices."""
    from irisseg.errors import InputError

    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def inference_autocast(device: torch.device | str, precision: str = "auto"):
    """Autocast context for inference (not training) in the given precision.

    Arguments:
      device: where the model runs.
      precision (str): ``fp32`` (no autocast), ``bf16`` (bf16 autocast wherever it runs, emulated or not) or
        ``auto``: bf16 on CUDA and on CPUs with native bf16 (:func:`cpu_has_native_bf16`), float32 elsewhere.

    Raises:
      InputError: an unknown precision.
    """
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=uses_bf16(device.type, precision))


def uses_bf16(device_type: str, precision: str = "auto") -> bool:
    """Whether ``precision`` (one of :data:`PRECISIONS`) means bf16 autocast on ``device_type`` (``cpu`` or
    ``cuda``): ``bf16`` always, ``fp32`` never, ``auto`` on CUDA and on CPUs with native bf16
    (:func:`cpu_has_native_bf16`). InputError for an unknown precision."""
    if check_precision(precision) == "auto":
        return device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16())
    return precision == "bf16"


def area_downsample(mask: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Fraction of each coarse voxel covered by a mask: ``(B, N, D, H, W) -> (B, N, *size)``.

    Exact box averaging when ``D, H, W`` are multiples of ``size`` (the encoder's strides).
    """
    if tuple(mask.shape[-3:]) == tuple(size):
        return mask
    return F.adaptive_avg_pool3d(mask, size)
