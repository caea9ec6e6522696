"""The IRIS in-context segmentation model, composed from its parts, and its registry.

Usage, segment-anything predictor style (encode the support once, answer many queries)::

    model = build_iris("iris-small")
    task = model.encode_task(support_images, support_masks)   # (B,K,1,D,H,W), (B,K,N,D,H,W)
    logits = model.decode(query, task)                         # (B,1,D,H,W) -> (B,N,D,H,W)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from irisseg.errors import InputError
from irisseg.models.decoder import MaskDecoder
from irisseg.models.encoder import Encoder
from irisseg.models.folder import load_model_weights, read_model_config, save_model_folder
from irisseg.models.matching import CorrespondenceMatcher
from irisseg.models.memory import ClassMemoryBank
from irisseg.models.task_encoding import TaskEmbedding, TaskEncoder


@dataclass
class IrisConfig:
    """Everything needed to rebuild an IRIS model (saved as ``config.json`` beside the weights).

    Attributes:
      name: registry name. in_channels: image channels. base_channels: stem width (encoder channels are
      ``base * (1, 2, 4, 8)``). embed_dim: token width ``C``. num_tokens: ``m`` query tokens. num_heads:
      attention heads. image_size: the (D, H, W) model grid used at inference (multiples of 8).
      use_similarity: prototype-similarity maps in the decoder. use_matching: dense correspondence
      (propagated support masks, :mod:`irisseg.models.matching`) in the decoder; match_scale: the encoder
      scale matched (2 = stride 4); match_dim: key width. context_channels: context-path channels.
      memory_momentum: EMA momentum of the class memory bank.
    """

    name: str = "iris-small"
    in_channels: int = 1
    base_channels: int = 16
    embed_dim: int = 128
    num_tokens: int = 8
    num_heads: int = 8
    image_size: tuple[int, int, int] = (64, 64, 64)
    use_similarity: bool = True
    use_matching: bool = False
    match_scale: int = 2
    match_dim: int = 64
    context_channels: int | None = None
    memory_momentum: float = 0.999
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> IrisConfig:
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        cfg.image_size = tuple(cfg.image_size)
        return cfg


CONFIGS: dict[str, IrisConfig] = {
    # The seed's configuration: base 32, 128^3 grid, width 256, 8 tokens, 8 heads.
    # Matching at stride 8 (16^3 positions on the 128^3 grid).
    "iris-base": IrisConfig(name="iris-base", base_channels=32, embed_dim=256, image_size=(128, 128, 128),
                            use_matching=True, match_scale=3),
    # For CPUs: half the channels, 64^3 grid, matching at stride 4 (16^3 positions).
    "iris-small": IrisConfig(name="iris-small", base_channels=16, embed_dim=128, image_size=(64, 64, 64),
                             use_matching=True, match_scale=2),
}


class IrisModel(nn.Module):
    """Encoder + task encoder + mask decoder, plus a class memory bank (not a parameter).

    Arguments:
      config (IrisConfig): the architecture.
    """

    def __init__(self, config: IrisConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.in_channels, config.base_channels, config.embed_dim)
        self.task_encoder = TaskEncoder(self.encoder.channels, config.num_tokens, config.num_heads,
                                        ratio=Encoder.stride, context_channels=config.context_channels)
        self.decoder = MaskDecoder(self.encoder.channels, config.num_heads, config.use_similarity,
                                   config.use_matching)
        self.matcher = (CorrespondenceMatcher(self.encoder.channels, config.match_scale, config.match_dim)
                        if config.use_matching else None)
        self.memory = ClassMemoryBank(config.memory_momentum)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_task(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> TaskEmbedding:
        """Encode the support set once.

        Arguments:
          support_images (torch.Tensor): (B, K, C_in, D, H, W) float, normalised intensities.
          support_masks (torch.Tensor): (B, K, N, D, H, W) in {0, 1}: N classes per support.

        Returns:
          TaskEmbedding: tokens (B, N, m+1, C) (averaged over the K supports), per-scale prototypes and,
          with matching, the supports' dense memory (keys (B, K*L, C_k), values (B, N, K*L)).
        """
        if support_images.ndim != 6 or support_masks.ndim != 6:
            raise ValueError("support_images must be (B, K, C, D, H, W) and support_masks (B, K, N, D, H, W)")
        if support_images.shape[:2] != support_masks.shape[:2] or support_images.shape[-3:] != support_masks.shape[-3:]:
            raise ValueError(f"support shapes differ: {tuple(support_images.shape)} vs {tuple(support_masks.shape)}")
        feats = self.encoder(rearrange(support_images, "b k c d h w -> (b k) c d h w"))
        task = self.task_encoder(feats, support_masks)
        if self.matcher is not None:
            task.keys, task.values = self.matcher.memory(feats, support_masks)
        return task

    def decode(self, query_images: torch.Tensor, task: TaskEmbedding) -> torch.Tensor:
        """Segment queries with an encoded task.

        Arguments:
          query_images (torch.Tensor): (B, C_in, D, H, W), D, H, W multiples of 8.
          task (TaskEmbedding): from :meth:`encode_task` (batch B, or 1 to reuse one task for all queries).

        Returns:
          torch.Tensor: logits (B, N, D, H, W); sigmoid gives each class's probability.
        """
        task = task.expand_batch(query_images.shape[0])
        features = self.encoder(query_images)
        match = None
        if self.matcher is not None and task.has_matching:
            match = self.matcher.readout(features, task.keys, task.values)
        return self.decoder(features, task, match)

    def forward(self, support_images: torch.Tensor, support_masks: torch.Tensor, query_images: torch.Tensor) -> torch.Tensor:
        """``decode(query_images, encode_task(support_images, support_masks))``: (B, N, D, H, W) logits."""
        return self.decode(query_images, self.encode_task(support_images, support_masks))

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``memory.safetensors`` into ``folder``."""
        folder = save_model_folder(self, self.config.to_dict(), folder, extra)
        self.memory.save(folder / "memory.safetensors")
        return folder

    @classmethod
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> IrisModel:
        """Rebuild a model from a folder written by :meth:`save` (safetensors only, no pickle)."""
        folder = Path(folder)
        data = read_model_config(folder)
        check_iris_config(data, folder)
        try:
            config = IrisConfig.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{folder / 'config.json'}: unreadable model config ({exc})") from None
        model = load_model_weights(cls(config), folder, map_location)
        if (folder / "memory.safetensors").is_file():
            model.memory = ClassMemoryBank.load(folder / "memory.safetensors")
        return model


def check_iris_config(data: dict, folder: str | Path) -> None:
    """Refuse the ``config.json`` of another pipeline's model (lesion, territory, retrieval) in ``folder``.

    Raises:
      InputError: the config lacks ``embed_dim`` / ``num_tokens``, which only an in-context model has.
    """
    if not {"embed_dim", "num_tokens"} <= set(data):
        raise InputError(f"{folder}: not an in-context (IRIS) model (its config.json is another kind's)")


def transfer_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Start ``model`` from another model's weights where they fit (to grow an architecture in place).

    Tensors with the same name and shape are copied. A tensor that grew along some dimensions (e.g. a
    convolution that gets extra input channels) receives the old values in its leading slice and zeros
    elsewhere, so the new inputs start switched off and the grown model computes what the old one did.
    Anything else keeps its fresh initialisation.

    Returns:
      dict: names ``copied``, ``grown`` and ``new`` (left as initialised).
    """
    report: dict[str, list[str]] = {"copied": [], "grown": [], "new": []}
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in own.items():
            old = state.get(name)
            if old is not None and old.shape == tensor.shape:
                tensor.copy_(old)
                report["copied"].append(name)
            elif (old is not None and old.ndim == tensor.ndim
                  and all(a <= b for a, b in zip(old.shape, tensor.shape))):
                tensor.zero_()
                tensor[tuple(slice(0, a) for a in old.shape)] = old
                report["grown"].append(name)
            else:
                report["new"].append(name)
    return report


def build_iris(name: str = "iris-small", **overrides) -> IrisModel:
    """A freshly initialised IRIS model from the registry (``iris-base`` or ``iris-small``)."""
    if name not in CONFIGS:
        raise InputError(f"unknown model config {name!r} (choose from {', '.join(CONFIGS)})")
    cfg = IrisConfig.from_dict({**CONFIGS[name].to_dict(), **overrides})
    return IrisModel(cfg)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per top-level component and in total."""
    out = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    out["total"] = sum(p.numel() for p in model.parameters())
    return out
