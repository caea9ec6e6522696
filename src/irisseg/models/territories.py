"""Dual-channel territory segmentation: two sigmoid channels from one multi-channel image (seed 003).

The typical task is left and right perfusion territories from 4-channel perfusion MRI, on 2D slices or 3D
volumes. Three architectures, all built on :class:`~irisseg.models.unet.ResidualUNet` (its ``encode``,
``decode`` and ``outputs`` steps are reused, never copied):

- ``"shared"`` (SharedDecoder): one residual U-Net with one decoder and one 2-channel 1x1 head; the two
  territories share every feature and differ only in the last convolution.
- ``"separate"`` (SeparateDecoders): one shared encoder and two independent decoder paths (up-sampling,
  decoder levels and a 1-channel head each), so neither territory's decoder can dominate the other's.
- ``"cross_attention"`` (SeparateDecoders_CrossAttention): ``"separate"`` plus, at the bottleneck, one
  residual block per path on the shared bottleneck features, then multi-head cross-attention between the
  two paths (path 1 queries path 2 and path 2 queries path 1; pre-norm, residual), the result being each
  path's bottleneck for its own decoder.

Output convention: ``(B, 2, *spatial)`` logits; channel 0 is territory 1 (e.g. left), channel 1 is
territory 2 (e.g. right). They are independent sigmoid logits (a voxel may be in both, or neither); the
callers apply ``sigmoid`` and the 0.5 threshold. Usage::

    net = TerritoryNet(TerritoryNetConfig(architecture="cross_attention", in_channels=4, spatial_dims=2))
    logits = net(slices)                       # (B, 4, H, W) -> (B, 2, H, W), any H, W
    masks = torch.sigmoid(logits) > 0.5        # masks[:, 0]: territory 1, masks[:, 1]: territory 2
    net.save("runs/territories/best")          # config.json + model.safetensors
    net = TerritoryNet.load("runs/territories/best")

Any input size works (padded at the end of each axis to a multiple of the total stride ``2 **
(len(channels) - 1)`` and cropped back, as in the U-Net). Nothing fixes a dtype or a device, so the
networks run unchanged under bf16 autocast on CUDA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from irisseg.errors import InputError
from irisseg.models.blocks import AttentionBlock, ResidualBlock
from irisseg.models.folder import load_model_weights, read_model_config, save_model_folder
from irisseg.models.unet import ResidualUNet, UNetConfig

__all__ = ["TerritoryNetConfig", "TerritoryNet", "BottleneckCrossAttention"]

ARCHITECTURES = ("shared", "separate", "cross_attention")


@dataclass
class TerritoryNetConfig:
    """Everything needed to rebuild a :class:`TerritoryNet` (saved as ``config.json`` beside the weights).

    Attributes:
      architecture (str): ``"shared"``, ``"separate"`` or ``"cross_attention"`` (see the module docstring).
      in_channels (int): image channels (e.g. 4 perfusion maps).
      channels (tuple[int, ...]): widths of the U-Net levels, finest first (at least two; each level after
        the first halves every spatial axis).
      spatial_dims (int): 2 for ``(B, C, H, W)`` slices, 3 for ``(B, C, D, H, W)`` volumes.
      blocks_per_level (int): residual blocks per level in the encoder and in each decoder.
      attention_heads (int): heads of the bottleneck cross-attention (``"cross_attention"`` only;
        ``channels[-1]`` must be divisible by it).
      name (str): a label for the model (free text).
      extra (dict): free-form metadata saved with the model (training settings, scores, ...).

    Raises:
      InputError: an unknown architecture, ``spatial_dims`` not 2 or 3, non-positive sizes, or
        ``channels[-1]`` not divisible by ``attention_heads`` for ``"cross_attention"``.
    """

    architecture: str = "shared"
    in_channels: int = 4
    channels: tuple[int, ...] = (16, 32, 64, 128)
    spatial_dims: int = 2
    blocks_per_level: int = 1
    attention_heads: int = 8
    name: str = "territories"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InputError(
                f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}"
            )
        if not isinstance(self.channels, (list, tuple)):
            raise InputError(f"channels must be a list of widths, got {self.channels!r}")
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise InputError(f"channels must hold at least two positive widths, got {self.channels}")
        if self.spatial_dims not in (2, 3):
            raise InputError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if self.in_channels < 1:
            raise InputError(f"in_channels must be at least 1, got {self.in_channels}")
        if self.blocks_per_level < 1:
            raise InputError(f"blocks_per_level must be at least 1, got {self.blocks_per_level}")
        if self.attention_heads < 1:
            raise InputError(f"attention_heads must be at least 1, got {self.attention_heads}")
        if self.architecture == "cross_attention" and self.channels[-1] % self.attention_heads:
            raise InputError(
                f"cross_attention needs channels[-1] ({self.channels[-1]}) divisible by "
                f"attention_heads ({self.attention_heads})"
            )

    def unet_config(self, out_channels: int) -> UNetConfig:
        """The configuration of one U-Net path (no deep supervision).

        Arguments:
          out_channels (int): 2 for the shared head, 1 for each separate path.

        Returns:
          UNetConfig: same widths, blocks and dimensionality as this config.
        """
        return UNetConfig(
            name=self.name,
            in_channels=self.in_channels,
            out_channels=out_channels,
            channels=self.channels,
            blocks_per_level=self.blocks_per_level,
            spatial_dims=self.spatial_dims,
            deep_supervision=False,
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists when dumped)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TerritoryNetConfig:
        """The config from :meth:`to_dict` output (lists back to tuples; unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class BottleneckCrossAttention(nn.Module):
    """Cross-attention between the two paths' bottleneck feature maps, in both directions.

    Each map is flattened to tokens (one per spatial position, ``channels`` wide); path 1's tokens attend
    to path 2's and path 2's to path 1's, each with its own pre-norm residual
    :class:`~irisseg.models.blocks.AttentionBlock` (``x + Attn(LN(x), LN(other))``). Both directions read
    the features from before the attention.

    Arguments:
      channels (int): bottleneck width (divisible by ``num_heads``).
      num_heads (int): attention heads.

    ``forward(f1 (B, C, *s), f2 (B, C, *s)) -> (g1 (B, C, *s), g2 (B, C, *s))`` for ``s`` = (h, w) or
    (d, h, w).
    """

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.attend1 = AttentionBlock(channels, num_heads, cross=True)  # path 1 queries path 2
        self.attend2 = AttentionBlock(channels, num_heads, cross=True)  # path 2 queries path 1

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t1 = rearrange(f1, "b c ... -> b (...) c")
        t2 = rearrange(f2, "b c ... -> b (...) c")
        g1, g2 = self.attend1(t1, t2), self.attend2(t2, t1)
        return g1.transpose(1, 2).reshape(f1.shape), g2.transpose(1, 2).reshape(f2.shape)


class TerritoryNet(nn.Module):
    """Two-territory segmentation network: ``(B, in_channels, *spatial) -> (B, 2, *spatial)`` logits.

    Top-level children (what :func:`irisseg.models.iris.count_parameters` reports):

    - ``"shared"``: ``unet`` (a :class:`ResidualUNet` with 2 output channels).
    - ``"separate"``: ``path1`` (a 1-channel :class:`ResidualUNet`, owner of the shared encoder) and
      ``path2`` (a 1-channel :class:`ResidualUNet` whose own encoder is deleted: only its ``upsample``,
      ``decoder`` and ``head`` remain).
    - ``"cross_attention"``: as ``"separate"``, plus ``bottleneck1`` / ``bottleneck2`` (one
      :class:`~irisseg.models.blocks.ResidualBlock` per path on the shared bottleneck) and
      ``cross_attention`` (:class:`BottleneckCrossAttention`).

    Arguments:
      config (TerritoryNetConfig | None): the architecture; None: ``TerritoryNetConfig(**overrides)``.
      **overrides: fields of :class:`TerritoryNetConfig` replacing those of ``config``.

    Raises:
      InputError: an unknown override field or an invalid configuration.
    """

    ARCHITECTURES = ARCHITECTURES

    def __init__(self, config: TerritoryNetConfig | None = None, **overrides):
        super().__init__()
        if overrides:
            unknown = set(overrides) - {f.name for f in fields(TerritoryNetConfig)}
            if unknown:
                raise InputError(f"unknown TerritoryNetConfig field(s): {', '.join(sorted(unknown))}")
            config = TerritoryNetConfig.from_dict({**(config or TerritoryNetConfig()).to_dict(), **overrides})
        self.config = config = config or TerritoryNetConfig()
        if config.architecture == "shared":
            self.unet = ResidualUNet(config.unet_config(2))
            return
        self.path1 = ResidualUNet(config.unet_config(1))
        self.path2 = ResidualUNet(config.unet_config(1))
        del self.path2.encoder  # path 2 decodes path 1's encoder features
        if config.architecture == "cross_attention":
            width, dims = config.channels[-1], config.spatial_dims
            self.bottleneck1 = ResidualBlock(width, width, spatial_dims=dims)
            self.bottleneck2 = ResidualBlock(width, width, spatial_dims=dims)
            self.cross_attention = BottleneckCrossAttention(width, config.attention_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a batch into two territories.

        Arguments:
          x (torch.Tensor): (B, in_channels, H, W) slices (``spatial_dims=2``) or (B, in_channels, D, H, W)
            volumes (``spatial_dims=3``), any size; in training, give at least ``2 * total_stride`` per axis
            so that InstanceNorm sees more than one voxel at the bottleneck.

        Returns:
          torch.Tensor: (B, 2, *spatial) logits, the input's spatial size; channel 0 is territory 1,
          channel 1 territory 2 (independent sigmoids; threshold at 0.5 after ``sigmoid``).

        Raises:
          ValueError: ``x`` has the wrong number of dimensions or channels.
        """
        size = tuple(x.shape[2:])
        if self.config.architecture == "shared":
            return self.unet(x)
        feats = self.path1.encode(x)
        feats1, feats2 = feats, feats
        if self.config.architecture == "cross_attention":
            b1, b2 = self.cross_attention(self.bottleneck1(feats[-1]), self.bottleneck2(feats[-1]))
            feats1, feats2 = [*feats[:-1], b1], [*feats[:-1], b2]
        out1 = self.path1.outputs(self.path1.decode(feats1), size)
        out2 = self.path2.outputs(self.path2.decode(feats2), size)
        return torch.cat([out1, out2], dim=1)

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Per-axis product of the down-sampling strides: inputs are padded up to multiples of it."""
        return (self.unet if self.config.architecture == "shared" else self.path1).total_stride

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created; files replaced atomically).

        Arguments:
          folder (str | Path): the model folder.
          extra (dict | None): merged into the config's ``extra`` metadata in ``config.json``.

        Returns:
          Path: ``folder``.
        """
        return save_model_folder(self, self.config.to_dict(), folder, extra)

    @classmethod
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> TerritoryNet:
        """Rebuild a network from a folder written by :meth:`save` (safetensors only, no pickle).

        Arguments:
          folder (str | Path): holds ``config.json`` and ``model.safetensors``.
          map_location (str | torch.device): device of the loaded weights.

        Returns:
          TerritoryNet: in training mode, like any fresh module (call ``.eval()`` to predict).

        Raises:
          InputError: a file is missing or unreadable, the config is not a TerritoryNet's, or the weights
            do not fit the architecture.
        """
        data = read_model_config(folder)
        cfg_path = Path(folder) / "config.json"
        if "architecture" not in data:
            raise InputError(f"{cfg_path}: not a TerritoryNet config (no 'architecture' entry)")
        try:
            config = TerritoryNetConfig.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"{cfg_path}: invalid TerritoryNet config ({' '.join(str(exc).split())[:200]})"
            ) from None
        return load_model_weights(cls(config), folder, map_location)
