"""3D CNN embedding network for similar-case retrieval: one unit-norm vector per volume, any input size.

The backbone is a stack of :class:`~irisseg.models.blocks.ResidualBlock` stages; the head pools the last
stage globally (average, optionally concatenated with max), projects to ``embedding_dim`` and
L2-normalises, so inner products of embeddings are cosine similarities. An optional linear
classification head reads the projected features before normalisation. Usage::

    net = EmbeddingNet(EmbeddingConfig(in_channels=1, embedding_dim=256, n_classes=5))
    out = net(images)                    # (B, 1, D, H, W) -> {"embedding": (B, 256), "logits": (B, 5)}
    vectors = embed(net, volumes)        # list of (D, H, W) arrays -> (N, 256) float32 numpy, unit rows
    net.save("runs/retrieval/best")      # config.json + model.safetensors
    net = EmbeddingNet.load("runs/retrieval/best")
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from irisseg.errors import InputError
from irisseg.models.blocks import ResidualBlock, autocast_for
from irisseg.models.folder import load_model_weights, read_model_config, save_model_folder

__all__ = ["EmbeddingConfig", "EmbeddingNet", "embed"]


@dataclass
class EmbeddingConfig:
    """Everything needed to rebuild an :class:`EmbeddingNet` (saved as ``config.json`` beside the weights).

    Attributes:
      name (str): a label for the model (free text).
      in_channels (int): image channels (e.g. 2 for T1 + FLAIR).
      channels (tuple[int, ...]): width of each stage, finest first (at least one). Stage 0 works at full
        resolution (stride 1); every later stage halves D, H and W (stride 2, sizes rounded up), so the
        last stage is at ``1 / 2 ** (len(channels) - 1)`` of the input size (1/8 with the default).
      embedding_dim (int): length of the embedding vector.
      n_classes (int): outputs of the classification head; 0: no head (and no ``"logits"`` output).
      dropout (float): in [0, 1), dropout on the pooled features before the projection (training only).
      concat_max_pool (bool): pool the last stage with global average *and* global max pooling and
        concatenate both (``2 * channels[-1]`` features); False: global average pooling only.
      map_classes (int): outputs of the optional finding-map head, 0: none. The head is a 1x1x1
        convolution on stage ``map_stage``'s output giving, per class, a logit of "this class is within this
        coarse voxel" (``"maps"`` output). It is an auxiliary of training (dense supervision from label
        maps, :mod:`irisseg.training.retrieval`); the embedding does not read it.
      map_stage (int): the stage the map head reads, ``0 <= map_stage < len(channels)``; its maps have
        ``1 / 2 ** map_stage`` of the input size per axis (sizes rounded up).
      extra (dict): free-form metadata saved with the model (training settings, validation scores...).
    """

    name: str = "embedding-net"
    in_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128)
    embedding_dim: int = 1024
    n_classes: int = 0
    dropout: float = 0.0
    concat_max_pool: bool = True
    map_classes: int = 0
    map_stage: int = 2
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) < 1 or any(c < 1 for c in self.channels):
            raise InputError(f"channels must hold at least one positive width, got {self.channels}")
        if int(self.in_channels) < 1:
            raise InputError(f"in_channels must be at least 1, got {self.in_channels}")
        if int(self.embedding_dim) < 1:
            raise InputError(f"embedding_dim must be at least 1, got {self.embedding_dim}")
        if int(self.n_classes) < 0:
            raise InputError(f"n_classes must be 0 (no classification head) or more, got {self.n_classes}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        if int(self.map_classes) < 0:
            raise InputError(f"map_classes must be 0 (no map head) or more, got {self.map_classes}")
        if int(self.map_classes) > 0 and not 0 <= int(self.map_stage) < len(self.channels):
            raise InputError(f"map_stage must index one of the {len(self.channels)} stages, got {self.map_stage}")

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride of each stage: 1 for the first, 2 for every later one."""
        return (1,) + (2,) * (len(self.channels) - 1)

    @property
    def total_stride(self) -> int:
        """Down-sampling factor of the last stage per axis: ``2 ** (len(channels) - 1)``."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        """A JSON-ready dict (tuples become lists when dumped)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EmbeddingConfig:
        """The config from :meth:`to_dict` output (lists back to tuples; unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class EmbeddingNet(nn.Module):
    """Residual 3D CNN that maps a volume of any size to an L2-normalised embedding (and optional logits).

    Stage ``i`` is one :class:`~irisseg.models.blocks.ResidualBlock` ``channels[i - 1] -> channels[i]``
    (``in_channels -> channels[0]`` for stage 0) whose first convolution has stride ``config.strides[i]``
    (1 for stage 0, 2 after it): the strided convolution does the down-sampling, the rest of the block
    refines at the new resolution. The head is
    global average pooling (concatenated with global max pooling when ``config.concat_max_pool``),
    dropout, and a linear projection to ``embedding_dim``; the projection ("features") is L2-normalised
    into the embedding, and the classification head (a linear layer ``embedding_dim -> n_classes``) reads
    the features *before* normalisation. Pooling makes the head independent of the input size.

    With ``map_classes > 0``, a 1x1x1 convolution ``map_head`` on stage ``map_stage`` also predicts coarse
    finding maps (a training auxiliary, see :class:`EmbeddingConfig`).

    Top-level children: ``stages``, ``dropout``, ``projection`` and, when ``n_classes > 0``, ``classifier``
    (``map_head`` when ``map_classes > 0``).

    Arguments:
      config (EmbeddingConfig | None): the architecture; None: ``EmbeddingConfig(**overrides)``.
      **overrides: fields of :class:`EmbeddingConfig` replacing those of ``config``.
    """

    def __init__(self, config: EmbeddingConfig | None = None, **overrides):
        super().__init__()
        if overrides:
            unknown = set(overrides) - {f.name for f in fields(EmbeddingConfig)}
            if unknown:
                raise InputError(f"unknown EmbeddingConfig field(s): {', '.join(sorted(unknown))}")
            config = EmbeddingConfig.from_dict({**(config or EmbeddingConfig()).to_dict(), **overrides})
        self.config = config = config or EmbeddingConfig()
        widths = (config.in_channels, *config.channels)
        self.stages = nn.ModuleList(
            [ResidualBlock(widths[i], widths[i + 1], stride=s) for i, s in enumerate(config.strides)]
        )
        pooled = config.channels[-1] * (2 if config.concat_max_pool else 1)
        self.dropout = nn.Dropout(config.dropout)
        self.projection = nn.Linear(pooled, config.embedding_dim)
        self.classifier = nn.Linear(config.embedding_dim, config.n_classes) if config.n_classes > 0 else None
        self.map_head = (nn.Conv3d(config.channels[config.map_stage], config.map_classes, kernel_size=1)
                         if config.map_classes > 0 else None)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Embed a batch of volumes.

        Arguments:
          x (torch.Tensor): (B, in_channels, D, H, W) float images, any spatial size (meant for 8 or more
            voxels per axis; smaller inputs still run, with little to pool). When the last stage would be
            a single voxel (every axis at most :attr:`EmbeddingConfig.total_stride`,
            e.g. an 8^3 input with the default 4 stages), InstanceNorm cannot normalise it, so the last
            axis is replicate-padded at its end to ``total_stride + 1`` voxels first.

        Returns:
          dict[str, torch.Tensor]: ``"embedding"``: (B, embedding_dim) float32, unit L2 norm per row;
          ``"logits"``: (B, n_classes) float32 classification logits (one per class, no sigmoid or
          softmax), present only when ``n_classes > 0``; ``"maps"``: (B, map_classes, d, h, w) float32
          finding-map logits at stage ``map_stage``'s size, present only when ``map_classes > 0``.

        Raises:
          InputError: ``x`` is not a (B, in_channels, D, H, W) tensor.
        """
        features, at_map_stage = self._features(x)
        out = {"embedding": F.normalize(features, dim=1)}
        if self.classifier is not None:
            out["logits"] = self.classifier(features).float()
        if self.map_head is not None:
            out["maps"] = self.map_head(at_map_stage).float()
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The projected features before L2 normalisation (what the classification head reads).

        Arguments:
          x (torch.Tensor): (B, in_channels, D, H, W) float images, as in :meth:`forward`.

        Returns:
          torch.Tensor: (B, embedding_dim) float32.
        """
        return self._features(x)[0]

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`features` and the output of stage ``map_stage`` (None without a map head)."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise InputError(f"expected a (B, {cfg.in_channels}, D, H, W) tensor, got shape {tuple(x.shape)}")
        t = cfg.total_stride
        if all(s <= t for s in x.shape[2:]):
            x = F.pad(x, (0, t + 1 - x.shape[-1], 0, 0, 0, 0), mode="replicate")
        at_map_stage = None
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if self.map_head is not None and i == cfg.map_stage:
                at_map_stage = x
        pooled = x.mean(dim=(2, 3, 4))
        if cfg.concat_max_pool:
            pooled = torch.cat([pooled, x.amax(dim=(2, 3, 4))], dim=1)
        return self.projection(self.dropout(pooled)).float(), at_map_stage

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created; written atomically).

        Arguments:
          folder (str | Path): the model folder.
          extra (dict | None): merged into the config's ``extra`` metadata in ``config.json``.

        Returns:
          Path: ``folder``.
        """
        return save_model_folder(self, self.config.to_dict(), folder, extra)

    @classmethod
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> EmbeddingNet:
        """Rebuild a network from a folder written by :meth:`save` (safetensors only, no pickle).

        Arguments:
          folder (str | Path): holds ``config.json`` and ``model.safetensors``.
          map_location (str | torch.device): device of the loaded weights.

        Returns:
          EmbeddingNet: in training mode, like any fresh module (call ``.eval()`` to predict, or use
          :func:`embed`).

        Raises:
          InputError: a file is missing or unreadable, the config is not an embedding network's, or the
            weights do not fit.
        """
        data = read_model_config(folder)
        if "embedding_dim" not in data:
            raise InputError(f"{Path(folder) / 'config.json'}: not an EmbeddingNet config "
                             f"(no 'embedding_dim' entry)")
        try:
            config = EmbeddingConfig.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{Path(folder) / 'config.json'}: invalid embedding config "
                             f"({' '.join(str(exc).split())[:200]})") from None
        return load_model_weights(cls(config), folder, map_location)


def _volume_shape(volume, index: int, in_channels: int) -> tuple[int, int, int, int]:
    """The (C, D, H, W) shape a volume is embedded at, checked (no copy of the data)."""
    shape = tuple(volume.shape) if hasattr(volume, "shape") else np.shape(volume)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise InputError(f"volume {index}: expected shape (C, D, H, W) or (D, H, W), got {tuple(shape)}")
    if shape[0] != in_channels:
        raise InputError(f"volume {index}: the model takes {in_channels} channel(s), "
                         f"got shape {tuple(shape)}")
    return tuple(int(s) for s in shape)


def _as_tensor(volume, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """One volume as a (C, D, H, W) float32 CPU tensor, checked for a real dtype and finite values."""
    if isinstance(volume, torch.Tensor):
        if volume.dtype == torch.bool or volume.is_complex():
            raise InputError(f"volume {index}: expected real-valued intensities, got dtype {volume.dtype}")
        t = volume.detach().to("cpu", torch.float32)
    else:
        arr = np.asarray(volume)
        if arr.dtype.kind not in "iuf":
            raise InputError(f"volume {index}: expected real-valued intensities, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not torch.isfinite(t).all():
        raise InputError(f"volume {index}: contains NaN or infinite values")
    return t.reshape(shape)


def embed(
    model: EmbeddingNet,
    volumes: Sequence,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Embeddings of many volumes, batched, without gradients.

    Volumes of the same shape are batched together (up to ``batch_size`` at a time), whatever their
    position in ``volumes``; volumes of different shapes never share a batch. The network normalises each
    sample on its own (InstanceNorm) and runs in eval mode, so the batching does not change the result
    beyond float rounding. Runs under ``torch.inference_mode()`` and
    :func:`~irisseg.models.blocks.autocast_for` (bf16 on CUDA, plain float32 on the CPU).

    Shapes are checked for every volume before anything runs; each volume is converted to float32 (and
    checked for NaN / inf) only when its batch is built, so memory holds one converted batch at a time.

    The model is moved to ``device`` (in place, as ``nn.Module.to`` does, and left there) and put in eval
    mode while embedding; its previous training / eval mode is restored afterwards.

    Arguments:
      model (EmbeddingNet): the network (any module with the same ``forward`` contract and a ``config``
        holding ``in_channels`` and ``embedding_dim``).
      volumes (Sequence[np.ndarray | torch.Tensor]): N volumes, each (C, D, H, W) with
        ``C == in_channels`` or (D, H, W) when ``in_channels == 1``; any real dtype (cast to float32),
        any spatial size. A (N, C, D, H, W) array or tensor works too (it is a sequence of volumes).
      batch_size (int): at most this many volumes per forward pass (>= 1).
      device (str | torch.device): where to run, e.g. ``"cpu"`` or ``"cuda"``.

    Returns:
      np.ndarray: (N, embedding_dim) float32, row ``i`` the unit-norm embedding of ``volumes[i]``;
        (0, embedding_dim) for an empty sequence.

    Raises:
      InputError: a volume has the wrong number of dimensions or channels, a non-real dtype, or NaN / inf
        values; or ``batch_size < 1``.
    """
    if int(batch_size) < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    cfg = model.config
    volumes = list(volumes)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, v in enumerate(volumes):
        by_shape[_volume_shape(v, i, cfg.in_channels)].append(i)
    out = np.zeros((len(volumes), cfg.embedding_dim), dtype=np.float32)
    if not volumes:
        return out
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.inference_mode(), autocast_for(device):
            for shape, indices in by_shape.items():
                for start in range(0, len(indices), int(batch_size)):
                    chunk = indices[start:start + int(batch_size)]
                    batch = torch.stack([_as_tensor(volumes[i], i, shape) for i in chunk]).to(device)
                    emb = model(batch)["embedding"]
                    out[chunk] = emb.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out
