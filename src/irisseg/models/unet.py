"""Residual U-Net for supervised segmentation (3D by default, 2D on the same code), with optional deep supervision.

The encoder and decoder are made of the same :class:`~irisseg.models.blocks.ResidualBlock` as the IRIS
image encoder. Usage::

    net = ResidualUNet(UNetConfig(in_channels=2, out_channels=1, channels=(16, 32, 64, 128)))
    logits = net(images)                 # (B, 2, D, H, W) -> (B, 1, D, H, W)
    net.save("runs/lesion/best")         # config.json + model.safetensors
    net = ResidualUNet.load("runs/lesion/best")

Any input size works: the input is padded at the end of each axis up to a multiple of the total stride
and the outputs are cropped back (see :meth:`ResidualUNet.forward`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from irisseg.errors import InputError
from irisseg.models.blocks import NORMS, ResidualBlock, nd_layers
from irisseg.models.folder import load_model_weights, read_model_config, save_model_folder

__all__ = ["UNetConfig", "ResidualUNet"]

_PAD_MODES = ("constant", "replicate", "reflect")


def _tuplify(value):
    """Lists (from JSON or YAML) to tuples, recursively."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuplify(v) for v in value)
    return value


@dataclass
class UNetConfig:
    """Everything needed to rebuild a :class:`ResidualUNet` (saved as ``config.json`` beside the weights).

    Attributes:
      name (str): a label for the model (free text).
      in_channels (int): image channels (e.g. 2 for T1 + FLAIR).
      out_channels (int): output channels (one sigmoid logit per class).
      channels (tuple[int, ...]): widths of the resolution levels, finest first; ``len(channels)`` levels,
        ``len(channels) - 1`` down-sampling steps.
      strides (tuple[int | tuple[int, ...], ...] | None): stride of each down-sampling step
        (``len(channels) - 1`` entries), an int or one int per spatial axis (e.g. ``(1, 2, 2)`` keeps
        thick slices); None: 2 on every axis.
      blocks_per_level (int | tuple[int, ...]): residual blocks per level in the encoder and in the decoder:
        one count for every level, or one per level, finest first (e.g. ``(1, 2, 2)`` keeps the costly
        full-resolution level light and deepens the coarser ones).
      spatial_dims (int): 3 for ``(B, C, D, H, W)`` volumes, 2 for ``(B, C, H, W)`` images.
      deep_supervision (bool): add a 1x1 logit head to the coarser decoder levels; in training mode the
        network then returns ``[main, aux_1, ..., aux_k]`` (see :meth:`ResidualUNet.forward`).
      deep_supervision_levels (int | None): how many auxiliary heads (finest first); None: one per
        decoder level below full resolution (``len(channels) - 2``).
      norm (str): ``"instance"`` (default; InstanceNorm, affine) or ``"batch"`` (BatchNorm: batch statistics
        in training, running averages in eval mode, so a prediction does not depend on the window around it).
      pad_mode (str): how inputs whose size is not a multiple of the total stride are padded:
        ``"replicate"`` (default), ``"constant"`` (zeros) or ``"reflect"`` (needs a pad smaller than the side).
      extra (dict): free-form metadata saved with the model (training settings, ...).
    """

    name: str = "residual-unet"
    in_channels: int = 1
    out_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int | tuple[int, ...], ...] | None = None
    blocks_per_level: int | tuple[int, ...] = 1
    spatial_dims: int = 3
    deep_supervision: bool = False
    deep_supervision_levels: int | None = None
    norm: str = "instance"
    pad_mode: str = "replicate"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in _tuplify(self.channels))
        self.strides = _tuplify(self.strides)
        self.blocks_per_level = _tuplify(self.blocks_per_level)
        strides = (2,) * (len(self.channels) - 1) if self.strides is None else self.strides
        if self.spatial_dims not in (2, 3):
            raise InputError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise InputError(f"channels must hold at least two positive widths, got {self.channels}")
        if len(strides) != len(self.channels) - 1:
            raise InputError(f"strides needs {len(self.channels) - 1} entries (one per down-sampling step) "
                             f"for channels {self.channels}, got {strides}")
        for s in strides:
            per_axis = s if isinstance(s, tuple) else (s,)
            if (isinstance(s, tuple) and len(s) != self.spatial_dims) or any(int(a) < 1 for a in per_axis):
                raise InputError(f"each stride must be a positive int or {self.spatial_dims} positive ints, got {s!r}")
        counts = self.level_blocks()
        if len(counts) != len(self.channels):
            raise InputError(f"blocks_per_level needs one count per level ({len(self.channels)}) or a single "
                             f"count, got {self.blocks_per_level}")
        if min(counts) < 1:
            raise InputError(f"blocks_per_level must be at least 1, got {self.blocks_per_level}")
        if self.deep_supervision_levels is not None and not 0 <= self.deep_supervision_levels <= len(self.channels) - 2:
            raise InputError(f"deep_supervision_levels must be between 0 and {len(self.channels) - 2}, "
                             f"got {self.deep_supervision_levels}")
        if self.norm not in NORMS:
            raise InputError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.pad_mode not in _PAD_MODES:
            raise InputError(f"pad_mode must be one of {', '.join(_PAD_MODES)}, got {self.pad_mode!r}")

    def level_blocks(self) -> list[int]:
        """Residual blocks of each level, finest first (``len(channels)`` counts in a valid config)."""
        blocks = self.blocks_per_level
        return [int(b) for b in blocks] if isinstance(blocks, tuple) else [int(blocks)] * len(self.channels)

    def level_strides(self) -> list[tuple[int, ...]]:
        """The stride of each down-sampling step, one int per spatial axis."""
        strides = (2,) * (len(self.channels) - 1) if self.strides is None else self.strides
        return [tuple(int(a) for a in s) if isinstance(s, tuple) else (int(s),) * self.spatial_dims for s in strides]

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists when dumped)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> UNetConfig:
        """The config from :meth:`to_dict` output (lists back to tuples; unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class ResidualUNet(nn.Module):
    """Residual U-Net: residual encoder levels, transposed-convolution up-sampling, skip concatenation.

    Level 0 works at full resolution (``channels[0]`` wide); level ``i > 0`` starts with a residual block of
    stride ``strides[i - 1]``; level ``i`` holds ``level_blocks()[i]`` residual blocks. The decoder goes back
    up level by level: a transposed convolution (kernel = stride) to ``channels[i - 1]``, concatenation
    with the encoder's skip, the residual block(s) of level ``i - 1``. A 1x1 convolution gives the logits.
    Normalisation is InstanceNorm (affine; BatchNorm with ``norm="batch"``), the activation LeakyReLU(0.01),
    as in the IRIS encoder.

    Top-level children (what :func:`irisseg.models.iris.count_parameters` reports): ``encoder``,
    ``upsample``, ``decoder``, ``head`` and, with deep supervision, ``aux_heads``.

    Arguments:
      config (UNetConfig | None): the architecture; None: ``UNetConfig(**overrides)``.
      **overrides: fields of :class:`UNetConfig` replacing those of ``config``.
    """

    def __init__(self, config: UNetConfig | None = None, **overrides):
        super().__init__()
        if overrides:
            unknown = set(overrides) - {f.name for f in fields(UNetConfig)}
            if unknown:
                raise InputError(f"unknown UNetConfig field(s): {', '.join(sorted(unknown))}")
            config = UNetConfig.from_dict({**(config or UNetConfig()).to_dict(), **overrides})
        self.config = config = config or UNetConfig()
        conv, conv_t, _ = nd_layers(config.spatial_dims)
        ch, strides, n = config.channels, config.level_strides(), config.level_blocks()

        def level(c_in: int, c_out: int, stride, count: int) -> nn.Sequential:
            dims, norm = config.spatial_dims, config.norm
            blocks = [ResidualBlock(c_in, c_out, stride=stride, spatial_dims=dims, norm=norm)]
            blocks += [ResidualBlock(c_out, c_out, spatial_dims=dims, norm=norm) for _ in range(count - 1)]
            return nn.Sequential(*blocks)

        self.encoder = nn.ModuleList(
            [level(config.in_channels, ch[0], 1, n[0])]
            + [level(ch[i - 1], ch[i], strides[i - 1], n[i]) for i in range(1, len(ch))]
        )
        # Decoder, coarsest first: upsample[j] / decoder[j] bring level i = L-1-j back to level i-1.
        back = range(len(ch) - 1, 0, -1)
        self.upsample = nn.ModuleList([conv_t(ch[i], ch[i - 1], strides[i - 1], stride=strides[i - 1]) for i in back])
        self.decoder = nn.ModuleList([level(2 * ch[i - 1], ch[i - 1], 1, n[i - 1]) for i in back])
        self.head = conv(ch[0], config.out_channels, 1)
        n_aux = 0
        if config.deep_supervision:
            n_aux = len(ch) - 2 if config.deep_supervision_levels is None else config.deep_supervision_levels
        # aux_heads[k] reads decoder level k + 1 (stride output_strides[k + 1]).
        self.aux_heads = nn.ModuleList([conv(ch[k + 1], config.out_channels, 1) for k in range(n_aux)]) if n_aux else None

    # -- geometry ----------------------------------------------------------------------------------------
    @property
    def total_stride(self) -> tuple[int, ...]:
        """Product of the strides per spatial axis: inputs are padded up to multiples of it."""
        return self._level_scale(len(self.config.channels) - 1)

    def _level_scale(self, level: int) -> tuple[int, ...]:
        scale = [1] * self.config.spatial_dims
        for s in self.config.level_strides()[:level]:
            scale = [a * b for a, b in zip(scale, s)]
        return tuple(scale)

    @property
    def output_strides(self) -> list[tuple[int, ...]]:
        """Per-axis down-sampling of each training-mode output: ``[(1, 1, 1), stride of aux_1, ...]``."""
        n_aux = len(self.aux_heads) if self.aux_heads is not None else 0
        return [self._level_scale(k) for k in range(n_aux + 1)]

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment a batch.

        Arguments:
          x (torch.Tensor): (B, in_channels, D, H, W) images (``(B, in_channels, H, W)`` with
            ``spatial_dims=2``), any size: each axis is padded at its end (``config.pad_mode``) up to a
            multiple of :attr:`total_stride` and the outputs are cropped back. InstanceNorm needs more than
            one voxel at the coarsest level in training, so give at least ``2 * total_stride`` per axis
            (rounded up) when training.

        Returns:
          torch.Tensor | list[torch.Tensor]: in eval mode, or without deep supervision, the logits
          (B, out_channels, D, H, W). In training mode with deep supervision, the list
          ``[main (B, out, D, H, W), aux_1 (B, out, ceil(D / s1), ceil(H / s1), ceil(W / s1)), ...]``
          with the auxiliary logits from finer to coarser (``s_k = output_strides[k]``; with end padding,
          aux voxel ``i`` covers input voxels ``[i * s_k, (i + 1) * s_k)``).
        """
        return self.outputs(self.decode(self.encode(x)), tuple(x.shape[2:]))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of a batch (padded first, as in :meth:`forward`).

        Arguments:
          x (torch.Tensor): (B, in_channels, D, H, W) images (``(B, in_channels, H, W)`` in 2D), any size.

        Returns:
          list[torch.Tensor]: one tensor per level, finest first: level ``i`` is (B, channels[i], ...) at
          the padded size divided by the product of the first ``i`` strides; the last is the bottleneck.
        """
        cfg = self.config
        if x.ndim != cfg.spatial_dims + 2 or x.shape[1] != cfg.in_channels:
            axes = "D, H, W" if cfg.spatial_dims == 3 else "H, W"
            raise ValueError(f"expected a (B, {cfg.in_channels}, {axes}) tensor, got shape {tuple(x.shape)}")
        y = self._pad(x)
        feats = []
        for stage in self.encoder:
            y = stage(y)
            feats.append(y)
        return feats

    def decode(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Decoder features from encoder features (:meth:`encode`; the bottleneck, ``feats[-1]``, may be
        replaced by a tensor of the same shape, e.g. after attention).

        Returns:
          list[torch.Tensor]: one tensor per decoder level, coarsest first; the last is (B, channels[0], ...)
          at the padded full resolution.
        """
        skips = list(feats)
        y = skips.pop()
        decoded = []
        for up, dec in zip(self.upsample, self.decoder):
            y = dec(torch.cat([up(y), skips.pop()], dim=1))
            decoded.append(y)
        return decoded

    def outputs(self, decoded: list[torch.Tensor], size: tuple[int, ...]) -> torch.Tensor | list[torch.Tensor]:
        """Logits from decoder features (:meth:`decode`), cropped back to the input ``size`` (spatial shape):
        what :meth:`forward` returns."""
        main = self._crop(self.head(decoded[-1]), size, (1,) * self.config.spatial_dims)
        if not self.training or self.aux_heads is None:
            return main
        outs = [main]
        for k, aux in enumerate(self.aux_heads):
            outs.append(self._crop(aux(decoded[-2 - k]), size, self._level_scale(k + 1)))
        return outs

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        stride = self.total_stride
        extra = [(-s) % t for s, t in zip(x.shape[2:], stride)]
        if not any(extra):
            return x
        pad: list[int] = []
        for e in reversed(extra):  # F.pad wants the last axis first
            pad += [0, e]
        return F.pad(x, pad, mode=self.config.pad_mode)

    @staticmethod
    def _crop(y: torch.Tensor, size: tuple[int, ...], scale: tuple[int, ...]) -> torch.Tensor:
        target = [math.ceil(s / f) for s, f in zip(size, scale)]
        if list(y.shape[2:]) == target:
            return y
        return y[(slice(None), slice(None), *(slice(0, t) for t in target))]

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
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> ResidualUNet:
        """Rebuild a network from a folder written by :meth:`save` (safetensors only, no pickle).

        Arguments:
          folder (str | Path): holds ``config.json`` and ``model.safetensors``.
          map_location (str | torch.device): device of the loaded weights.

        Returns:
          ResidualUNet: in training mode, like any fresh module (call ``.eval()`` to predict).

        Raises:
          InputError: a file is missing or unreadable, the config is not a U-Net's, or the weights do not fit.
        """
        data = read_model_config(folder)
        if "channels" not in data:
            raise InputError(f"{Path(folder) / 'config.json'}: not a ResidualUNet config (no 'channels' entry)")
        try:
            config = UNetConfig.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{Path(folder) / 'config.json'}: invalid U-Net config "
                             f"({' '.join(str(exc).split())[:200]})") from None
        return load_model_weights(cls(config), folder, map_location)
