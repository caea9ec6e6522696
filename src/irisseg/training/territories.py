"""Dual-channel territory segmentation: training, whole-volume prediction and the experiment matrix.

``irisseg territories train`` / ``matrix`` / ``predict``. A :class:`~irisseg.models.territories.TerritoryNet`
(architecture from the configuration name, see :mod:`irisseg.territories`) is trained with the
configuration's :class:`~irisseg.losses.TerritoryLoss` on one fold of a k-fold split of an nnU-Net-style
dataset with multi-channel images (``<case>_0000`` ... ``<case>_0003``, e.g. perfusion maps).

Targets: two binary channels ``(2, D, H, W)``: channel 0 = territory 1, channel 1 = territory 2
(:func:`territory_label_sets` says which label ids make each). Images: every channel is clipped and
z-scored over the body on its own (:func:`irisseg.lesion.normalize_channels`), in training and prediction
alike. Volumes stay on their own voxel grid (no resampling), their array axes relabelled towards the identity
direction (``reorient``, no interpolation).

* ``spatial_dims=2`` (default): the network sees slices along array axis 0 (the ``D`` axis): training
  draws ``(C, patch, patch)`` crops of slices (mostly slices with a territory voxel, some without),
  prediction runs on every whole slice.
* ``spatial_dims=3``: ``(C, patch, patch, patch)`` patches in training, Gaussian sliding-window
  prediction (:func:`irisseg.lesion.sliding_window_logits`).

There is no flip augmentation: the two territories may be left and right, and a flip across the axis that
separates them would swap their meaning. Augmentation is intensity-only (per-channel scale and shift,
Gaussian noise; :func:`irisseg.data.patches.augment_patch` with ``flip=0``).

Each epoch: ``steps_per_epoch`` batches, then the validation cases are predicted whole and scored (Dice
per channel at the 0.5 threshold, :func:`irisseg.metrics.dice`). A run folder holds ``metrics.csv`` (one
row per epoch), ``best/`` and ``last/`` (model folders), ``validation.csv`` (per validation case of the
best model: ``config, fold, case, dice_1, dice_2``), ``splits.json``, ``train_config.yaml``, ``logs/``,
``checkpoints/last.ckpt`` (for ``--resume``) and, once finished, ``done.json`` (the summary).

Example::

    run = train_territories("SharedDecoder", TerritoryTrainConfig(), "data/territories", fold=0, out="runs/t")
    labels = TerritoryPredictor(run).predict(channels)   # uint8 {0, 1, 2} Volume in the input's geometry
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from irisseg.errors import InputError
from irisseg.io import Volume, write_csv
from irisseg.lesion import body_mask, check_channels, normalize_channels, sliding_window_logits
from irisseg.training.engine import (
    AnnealedModule,
    ListDataset,
    RunRecorder,
    YamlConfig,
    make_trainer,
    read_metrics_csv,
    resume_path,
)
from irisseg.training.lesion import _PatchEpoch

__all__ = ["TerritoryTrainConfig", "PreparedTerritoryCase", "territory_label_sets", "label_targets",
           "prepare_territory_case", "TerritorySliceDataset", "predict_logits", "labels_from_probabilities",
           "train_territories", "TerritoryPredictor", "resolve_territory_model_dir", "run_matrix",
           "read_validation_csv", "METRICS_COLUMNS", "VALIDATION_COLUMNS"]

#: Columns of ``RUN/metrics.csv`` (one row per epoch; Dice at the threshold, means over validation cases).
METRICS_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "val_dice_1", "val_dice_2", "val_mean_dice", "seconds")
#: Columns of ``RUN/validation.csv`` (one row per validation case, best model).
VALIDATION_COLUMNS = ("config", "fold", "case", "dice_1", "dice_2")

#: Intensity normalisation of every channel (:func:`irisseg.lesion.normalize_channels`: clip to the 0.5-99.5
#: percentiles, then z-score, over the body), in training and prediction; stored in the model.
_NORMALIZATION = "clip_zscore"


@dataclass
class TerritoryTrainConfig(YamlConfig):
    """Settings of ``irisseg territories train`` / ``matrix`` (a YAML file with these keys; unknown keys are
    an error). The defaults are the CPU matrix setting (``configs/territories_matrix_cpu.yaml``).

    Attributes:
      spatial_dims: 2 (slices along array axis 0) or 3 (cubic patches, sliding-window prediction).
      channels: U-Net widths per level, finest first (levels = its length); blocks_per_level: residual blocks
        per level; attention_heads: heads of the cross-attention architecture (must divide ``channels[-1]``).
      patch: training crop side in voxels (2D: ``patch x patch`` slice crops; 3D: ``patch^3`` cubes, also the
        sliding window); a multiple of the total stride ``2 ** (len(channels) - 1)``.
      batch_size: crops per step; foreground_fraction: share of crops drawn around a territory voxel (2D:
        from slices holding one), the rest anywhere.
      loss_weight: weight of the auxiliary loss terms (0.1, as in the seed).
      lr, weight_decay: AdamW; the learning rate warms up for 20 steps, then follows a cosine to 0 over
        ``epochs`` or ``max_minutes``, whichever ends first.
      epochs: most epochs; steps_per_epoch: optimiser steps per epoch; patience: epochs without a better
        validation mean Dice before stopping early; max_minutes: wall-time budget of one run (None: none).
      n_folds: k of the k-fold split over case ids (shuffled with ``seed``).
      overlap: sliding-window overlap (3D only); threshold: probability threshold of both channels.
      augment: intensity augmentation (per-channel scale / shift, noise); never flips.
      slice_batch: slices per forward pass when predicting a volume in 2D.
      num_workers: DataLoader workers drawing crops; num_threads: torch threads (None: torch's default); seed.
      reorient: relabel every case's array axes towards the identity direction (no interpolation), so 2D
        slices are taken along the same patient axis whatever the stored axis order; stored in the model,
        whose predictions then do the same.
    """

    spatial_dims: int = 2
    channels: tuple[int, ...] = (8, 16, 32, 64)
    blocks_per_level: int = 1
    attention_heads: int = 8
    patch: int = 64
    batch_size: int = 16
    foreground_fraction: float = 0.8
    loss_weight: float = 0.1
    lr: float = 3e-3
    weight_decay: float = 1e-5
    epochs: int = 12
    steps_per_epoch: int = 40
    patience: int = 6
    max_minutes: float | None = None
    n_folds: int = 5
    overlap: float = 0.5
    threshold: float = 0.5
    augment: bool = True
    slice_batch: int = 32
    num_workers: int = 0
    num_threads: int | None = None
    seed: int = 0
    reorient: bool = True

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        stride = 2 ** (len(self.channels) - 1)
        if self.spatial_dims not in (2, 3):
            raise InputError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise InputError(f"channels must hold at least two positive widths, got {list(self.channels)}")
        if self.channels[-1] % self.attention_heads:
            raise InputError(f"attention_heads ({self.attention_heads}) must divide channels[-1] ({self.channels[-1]})")
        if self.patch < 2 * stride or self.patch % stride:
            raise InputError(f"patch must be a multiple of {stride} (the U-Net's total stride) and at least "
                             f"{2 * stride}, got {self.patch}")
        for name in ("batch_size", "epochs", "steps_per_epoch", "patience", "slice_batch"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if int(self.n_folds) < 2:
            raise InputError(f"n_folds must be at least 2, got {self.n_folds}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise InputError(f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}")
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"threshold must be between 0 and 1 (exclusive), got {self.threshold}")
        if not 0.0 <= self.overlap < 1.0:
            raise InputError(f"overlap must be in [0, 1), got {self.overlap}")
        if not (math.isfinite(self.loss_weight) and self.loss_weight >= 0):
            raise InputError(f"loss_weight must be a non-negative number, got {self.loss_weight}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise InputError(f"max_minutes must be positive (or null for none), got {self.max_minutes}")


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------
def territory_label_sets(labels: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Which label-map values make territory 1 (target channel 0) and territory 2 (channel 1).

    Rules, from a dataset's declared labels (``Dataset.labels``, name -> id or tuple of ids):

    * two regions (nnU-Net v2 region-based, e.g. ``{"left": [1, 3], "right": [2, 3]}``): region order;
    * labels 1 and 2 (optionally 3): ``(1, 3)`` and ``(2, 3)``, i.e. 3 means "in both territories";
    * exactly two other non-zero ids: the smaller one is territory 1, the other territory 2.

    Arguments:
      labels (dict): label name -> int id or tuple of ids, background (0) included or not.

    Returns:
      tuple[tuple[int, ...], tuple[int, ...]]: the ids of territory 1 and of territory 2.

    Raises:
      InputError: any other label set (the message lists the labels).
    """
    described = ", ".join(f"{k}: {v}" for k, v in labels.items())
    entries = [(name, v) for name, v in labels.items() if v not in (0, (0,))]
    if any(isinstance(v, (tuple, list)) for _, v in entries):
        if len(entries) != 2:
            raise InputError(f"territory training needs exactly two regions, the dataset declares {described}")
        return tuple(tuple(int(i) for i in (v if isinstance(v, (tuple, list)) else (v,))) for _, v in entries)
    ids = sorted({int(v) for _, v in entries})
    if {1, 2} <= set(ids) <= {1, 2, 3}:
        return (1, 3), (2, 3)
    if len(ids) == 2:
        return (ids[0],), (ids[1],)
    raise InputError(f"territory training needs two labels (1 and 2, with 3 = both if present) or two regions; "
                     f"the dataset declares {described}")


def label_targets(label: np.ndarray, label_sets: Sequence[Sequence[int]]) -> np.ndarray:
    """Two binary target channels from a label map.

    Arguments:
      label (np.ndarray): integer label map (D, H, W).
      label_sets (Sequence[Sequence[int]]): the ids of territory 1 and of territory 2
        (:func:`territory_label_sets`).

    Returns:
      np.ndarray: uint8 (2, D, H, W) in {0, 1}; channel k is 1 where the label is one of ``label_sets[k]``.
    """
    return np.stack([np.isin(label, np.asarray(ids)) for ids in label_sets]).astype(np.uint8)


@dataclass
class PreparedTerritoryCase:
    """One case ready for training and validation.

    Attributes:
      case_id (str): dataset case id.
      image (np.ndarray): float32 (C, D, H, W), normalised (:func:`irisseg.lesion.normalize_channels`).
      target (np.ndarray): uint8 (2, D, H, W): territory 1 and territory 2.
      geometry (Volume): the first channel as read (its geometry is the case's).
    """

    case_id: str
    image: np.ndarray
    target: np.ndarray
    geometry: Volume


def prepare_territory_case(case, label_sets: Sequence[Sequence[int]], reorient: bool = True) -> PreparedTerritoryCase:
    """Read, normalise and convert one labelled :class:`~irisseg.data.datasets.Case`.

    Arguments:
      case (Case): a training case (image channels ``_0000``... and a label map, same geometry).
      label_sets: territory label ids (:func:`territory_label_sets`).
      reorient (bool): relabel the array axes towards the identity direction (no interpolation), as
        prediction then does (:func:`irisseg.preprocess.reorient_case`).

    Returns:
      PreparedTerritoryCase.

    Raises:
      InputError: unreadable files, channels or label of different geometry, NaN intensities, a label map
        without any territory voxel (naming the file).
    """
    from irisseg.preprocess import reorient_case

    channels, label = case.load()
    for path, volume in zip(case.image_paths, channels, strict=False):
        if not np.isfinite(volume.array).all():
            raise InputError(f"{path}: image holds NaN or infinite intensities")
    channels, label = reorient_case(channels, label, reorient)
    target = label_targets(label.array, label_sets)
    if not target.any():
        raise InputError(f"{case.label_path}: empty label map: no voxel of either territory (label ids "
                         f"{', '.join(str(list(s)) for s in label_sets)})")
    arrays = [v.array for v in channels]
    image = normalize_channels(arrays, body_mask(arrays), _NORMALIZATION)
    return PreparedTerritoryCase(case.case_id, image, target, channels[0])


class TerritorySliceDataset(Dataset):
    """Training crops from preloaded cases: 2D slice crops (``spatial_dims=2``) or 3D patches.

    Item ``i`` of epoch ``e`` depends only on ``(seed, e, i)`` (whatever the number of DataLoader workers).
    Each item: a case drawn uniformly; with probability ``foreground_fraction`` the crop is centred on a
    random territory voxel (2D: of a random slice that holds one), otherwise on a random voxel (2D: of a
    random slice); the crop is shifted to stay inside the volume where it fits and padded with each
    channel's minimum where it does not (:func:`irisseg.data.patches.extract_patch`). Call
    :meth:`set_epoch` before each epoch (the :class:`~irisseg.training.lesion._PatchEpoch` callback does).

    Arguments:
      cases (Sequence[PreparedTerritoryCase]): the training cases (image (C, D, H, W), target (2, D, H, W)).
      spatial_dims (int): 2 or 3.
      patch (int): crop side in voxels.
      length (int): items per epoch.
      foreground_fraction (float): share of crops centred on a territory voxel.
      augment (PatchAugmentConfig | None): intensity augmentation (its ``flip`` should be 0); None: none.
      seed (int): base seed.

    Items: ``{"image": float32 (C, p, p) or (C, p, p, p), "target": float32 (2, p, p) or (2, p, p, p)}``.
    """

    def __init__(self, cases: Sequence[PreparedTerritoryCase], spatial_dims: int, patch: int, length: int,
                 foreground_fraction: float = 0.8, augment=None, seed: int = 0):
        if not cases:
            raise InputError("territory training needs at least one training case")
        self.cases, self.spatial_dims, self.patch = list(cases), int(spatial_dims), int(patch)
        self.length, self.foreground_fraction = int(length), float(foreground_fraction)
        self.augment, self.seed, self.epoch = augment, int(seed), 0
        self.pad = [c.image.reshape(c.image.shape[0], -1).min(axis=1) for c in self.cases]
        # foreground voxels (indices into the flattened volume), subsampled to bound memory
        rng = np.random.default_rng(self.seed)
        self.foreground = []
        for c in self.cases:
            fg = np.flatnonzero(c.target.any(axis=0))
            self.foreground.append(np.sort(rng.choice(fg, 100_000, replace=False)) if fg.size > 100_000 else fg)

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of this epoch (see the class docstring)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        from irisseg.data.patches import augment_patch, extract_patch, window_start

        seq = np.random.SeedSequence([self.seed, self.epoch, int(index)])
        rng = np.random.default_rng(seq)
        k = int(rng.integers(len(self.cases)))
        case = self.cases[k]
        shape = case.target.shape[1:]
        fg = self.foreground[k]
        if fg.size and rng.random() < self.foreground_fraction:
            centre = np.array(np.unravel_index(int(fg[rng.integers(fg.size)]), shape))
        else:
            centre = np.array([int(rng.integers(s)) for s in shape])
        if self.spatial_dims == 2:
            size = (1, self.patch, self.patch)
            start = np.concatenate([[centre[0]], window_start(centre[1:], shape[1:], size[1:])])
        else:
            size = (self.patch,) * 3
            start = window_start(centre, shape, size)
        image, _ = extract_patch(case.image, start, size, pad_value=self.pad[k])
        target, valid = extract_patch(case.target, start, size, pad_value=0)
        image, target = torch.from_numpy(image), torch.from_numpy(target.astype(np.float32))
        if self.augment is not None:
            gen = torch.Generator().manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> 1))
            image, target, _ = augment_patch(image, target, torch.from_numpy(valid)[None].float(), self.augment, gen)
        if self.spatial_dims == 2:  # (C, 1, p, p) -> (C, p, p)
            image, target = image[:, 0], target[:, 0]
        return {"image": image.contiguous(), "target": target.contiguous()}


# ---------------------------------------------------------------------------------------------------
# whole-volume prediction
# ---------------------------------------------------------------------------------------------------
def predict_logits(model: torch.nn.Module, image: torch.Tensor | np.ndarray, spatial_dims: int, patch: int = 64,
                   overlap: float = 0.5, slice_batch: int = 32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Whole-volume two-channel logits of a territory network.

    2D: every slice along array axis 0 is predicted whole, ``slice_batch`` slices per forward pass.
    3D: Gaussian sliding-window inference with ``patch^3`` windows (:func:`irisseg.lesion.sliding_window_logits`).
    The model is put in eval mode for the call and restored afterwards.

    Arguments:
      model (nn.Module): (B, C, H, W) -> (B, 2, H, W) (2D) or (B, C, D, H, W) -> (B, 2, D, H, W) (3D) logits.
      image (torch.Tensor | np.ndarray): float32 (C, D, H, W) normalised image, any D, H, W.
      spatial_dims (int): 2 or 3.
      patch (int): 3D window side in voxels. overlap (float): 3D window overlap in [0, 1).
      slice_batch (int): 2D slices per forward pass.
      device: where the model runs (inputs are moved there; the result is gathered on the CPU).

    Returns:
      torch.Tensor: float32 logits (2, D, H, W) on the CPU; channel 0 territory 1, channel 1 territory 2.
    """
    from irisseg.models.blocks import autocast_for

    image = torch.as_tensor(image, dtype=torch.float32)
    device = torch.device(device)
    if spatial_dims == 3:
        return sliding_window_logits(model, image[None], (patch,) * 3, overlap, device=device)[0]
    was_training = model.training
    model.eval()
    slices = image.transpose(0, 1)  # (D, C, H, W)
    out = []
    try:
        with torch.inference_mode(), autocast_for(device):
            for i in range(0, slices.shape[0], slice_batch):
                out.append(model(slices[i: i + slice_batch].to(device)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).transpose(0, 1).contiguous()


def labels_from_probabilities(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """A two-label map from the two territory probabilities.

    A voxel is territory 1 when ``p1 > threshold`` and ``p1 >= p2``, territory 2 when ``p2 > threshold`` and
    ``p2 > p1``, background otherwise: where both exceed the threshold, the larger probability wins (a tie
    goes to territory 1).

    Arguments:
      prob (np.ndarray): float (2, D, H, W) probabilities of territory 1 and territory 2.
      threshold (float): the probability threshold.

    Returns:
      np.ndarray: uint8 (D, H, W) in {0, 1, 2}.
    """
    p1, p2 = prob[0], prob[1]
    out = np.zeros(p1.shape, np.uint8)
    out[(p1 > threshold) & (p1 >= p2)] = 1
    out[(p2 > threshold) & (p2 > p1)] = 2
    return out


# ---------------------------------------------------------------------------------------------------
# module
# ---------------------------------------------------------------------------------------------------
class TerritoryLightning(AnnealedModule):
    """LightningModule: crop training and whole-volume validation of a :class:`TerritoryNet`.

    The optimiser, learning-rate schedule (warm-up + cosine over epochs or the time budget) and the
    checkpointed best score come from :class:`~irisseg.training.engine.AnnealedModule`.

    Arguments:
      model (TerritoryNet): the network. loss_fn (TerritoryLoss): the configuration's loss.
      cfg (TerritoryTrainConfig): settings. val_cases (list[PreparedTerritoryCase]): validation cases.
      config_name (str), fold (int): written into the per-case validation rows.
    """

    def __init__(self, model: torch.nn.Module, loss_fn, cfg: TerritoryTrainConfig,
                 val_cases: list[PreparedTerritoryCase], config_name: str, fold: int):
        super().__init__()
        self.model, self.loss_fn, self.cfg, self.val_cases = model, loss_fn, cfg, val_cases
        self.config_name, self.fold = config_name, int(fold)
        self.best_val = -math.inf
        self._train_losses: list[float] = []
        self._val_rows: list[dict] = []
        self.epoch_summary: dict | None = None
        self.case_rows: list[dict] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @property
    def training_progress(self) -> float:
        """Training fraction ``epoch / max_epochs`` in [0, 1] (drives the adaptive spatial weight)."""
        if self._trainer is None or not self.trainer.max_epochs:
            return 0.0
        return min(1.0, self.current_epoch / max(1, self.trainer.max_epochs))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss_fn(self.model(batch["image"]), batch["target"], progress=self.training_progress)
        self._train_losses.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        from irisseg.metrics import dice

        case = self.val_cases[int(batch["index"])]
        logits = predict_logits(self.model, torch.from_numpy(case.image), self.cfg.spatial_dims, self.cfg.patch,
                                self.cfg.overlap, self.cfg.slice_batch, device=self.device)
        target = torch.from_numpy(case.target).float()
        # the loss on the whole volume: slices as the batch in 2D, one volume in 3D
        as_batch = (lambda t: t.transpose(0, 1)) if self.cfg.spatial_dims == 2 else (lambda t: t[None])
        loss = float(self.loss_fn(as_batch(logits), as_batch(target), progress=self.training_progress))
        pred = (torch.sigmoid(logits) > self.cfg.threshold).numpy()
        self._val_rows.append({"config": self.config_name, "fold": self.fold, "case": case.case_id,
                               "dice_1": dice(pred[0], case.target[0]), "dice_2": dice(pred[1], case.target[1]),
                               "loss": loss})

    def on_validation_epoch_end(self) -> None:
        if not self._val_rows:
            return
        rows = self._val_rows
        d1 = float(np.mean([r["dice_1"] for r in rows]))
        d2 = float(np.mean([r["dice_2"] for r in rows]))
        summary = {"train_loss": float(np.mean(self._train_losses)) if self._train_losses else float("nan"),
                   "val_loss": float(np.mean([r["loss"] for r in rows])), "val_dice_1": d1, "val_dice_2": d2,
                   "val_mean_dice": float(np.mean([(r["dice_1"] + r["dice_2"]) / 2 for r in rows]))}
        self._train_losses = []
        self.epoch_summary = summary
        self.case_rows = [{k: r[k] for k in VALIDATION_COLUMNS} for r in rows]
        self.log("val/mean_dice", summary["val_mean_dice"], prog_bar=True, batch_size=1)
        self.log("val/dice_1", d1, batch_size=1)
        self.log("val/dice_2", d2, batch_size=1)
        if math.isfinite(summary["val_loss"]):
            self.log("val/loss", summary["val_loss"], batch_size=1)


def _model_extra(cfg: TerritoryTrainConfig, info: dict) -> dict:
    """The ``extra`` metadata saved with every exported model (what :class:`TerritoryPredictor` reads)."""
    return {"territories": {"spatial_dims": cfg.spatial_dims, "patch": cfg.patch, "overlap": cfg.overlap,
                            "reorient": cfg.reorient,
                            "threshold": cfg.threshold, "slice_batch": cfg.slice_batch,
                            "normalization": _NORMALIZATION, **info},
            "train": cfg.to_yaml_dict()}


# ---------------------------------------------------------------------------------------------------
# training entry point
# ---------------------------------------------------------------------------------------------------
def _fold_split(dataset, cfg: TerritoryTrainConfig, fold: int) -> dict:
    from irisseg.data.datasets import kfold

    n = len(dataset.cases)
    if n < cfg.n_folds:
        raise InputError(f"{dataset.root}: {n} labelled case(s) cannot make {cfg.n_folds} folds "
                         f"(set n_folds to at most {n} in the --settings file)" if n >= 2 else
                         f"{dataset.root}: territory training needs at least 2 labelled cases, found {n}")
    if isinstance(fold, bool) or not 0 <= int(fold) < cfg.n_folds:
        raise InputError(f"fold {fold} does not exist: folds are 0..{cfg.n_folds - 1} (n_folds = {cfg.n_folds})")
    train, val = kfold(dataset, k=cfg.n_folds, seed=cfg.seed)[int(fold)]
    return {"fold": int(fold), "n_folds": cfg.n_folds, "seed": cfg.seed, "train": train, "val": val}


def read_validation_csv(path: str | Path) -> list[dict]:
    """Rows of a ``RUN/validation.csv``: ``{"config": str, "fold": int, "case": str, "dice_1": float,
    "dice_2": float}``; [] when the file does not exist."""
    import csv

    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{"config": r["config"], "fold": int(r["fold"]), "case": r["case"], "dice_1": float(r["dice_1"]),
                 "dice_2": float(r["dice_2"])} for r in csv.DictReader(f)]


def train_territories(experiment_name: str, cfg: TerritoryTrainConfig, data: str | Path, fold: int,
                      out: str | Path, resume: bool = False, device: str = "auto", progress: bool = True,
                      callbacks: list[L.Callback] | None = None) -> Path:
    """Train one configuration of the territory matrix on one fold; returns the run folder.

    Arguments:
      experiment_name (str): a name of :data:`irisseg.territories.EXPERIMENTS` (architecture + losses).
      cfg (TerritoryTrainConfig): settings.
      data (str | Path): nnU-Net-style dataset folder: ``imagesTr/<case>_0000.nii.gz`` ... (C channels, same
        geometry), ``labelsTr/<case>.nii.gz`` (label map in the image's geometry; territory ids from
        :func:`territory_label_sets`), ``dataset.json``.
      fold (int): which fold of ``kfold(case ids, cfg.n_folds, cfg.seed)`` to train (its val cases validate).
      out (str | Path): the run folder (see the module docstring for its content).
      resume (bool): continue from ``out/checkpoints/last.ckpt`` with the same split.
      device: ``cpu``, ``cuda`` or ``auto`` (bf16 autocast on CUDA).
      progress (bool): show a progress bar. callbacks: extra Lightning callbacks (tests).

    Returns:
      Path: ``out``; ``out/done.json`` holds the summary (best epoch, its mean Dice and Dice per channel).

    Raises:
      InputError: an unknown configuration or device, an unreadable dataset or case, label ids that do not
        make two territories, an empty label map, a territory no training case shows, too few cases for the
        folds, a bad fold, nothing to resume. Nothing is written then.
    """
    import yaml
    from lightning.pytorch.callbacks import EarlyStopping

    from irisseg.data.datasets import load_dataset
    from irisseg.data.patches import PatchAugmentConfig
    from irisseg.incontext import resolve_device
    from irisseg.models.territories import TerritoryNet, TerritoryNetConfig
    from irisseg.territories import get_experiment

    resolve_device(device)  # a bad device fails here, before the run folder is made

    experiment = get_experiment(experiment_name)
    out = Path(out)
    ckpt = resume_path(out, resume)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dataset = load_dataset(data)
    label_sets = territory_label_sets(dataset.labels)
    splits = _fold_split(dataset, cfg, fold)
    if resume and (out / "splits.json").is_file():
        splits = json.loads((out / "splits.json").read_text())
    by_id = {c.case_id: c for c in dataset.cases}
    train_cases = [prepare_territory_case(by_id[i], label_sets, cfg.reorient) for i in splits["train"]]
    val_cases = [prepare_territory_case(by_id[i], label_sets, cfg.reorient) for i in splits["val"]]
    for t in range(2):  # a territory no training case shows cannot be learnt
        if not any(c.target[t].any() for c in train_cases):
            raise InputError(f"{data}: no training case holds territory {t + 1} (label ids {list(label_sets[t])})")

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = TerritoryNet(TerritoryNetConfig(
        architecture=experiment.architecture, in_channels=int(train_cases[0].image.shape[0]), channels=cfg.channels,
        spatial_dims=cfg.spatial_dims, blocks_per_level=cfg.blocks_per_level, attention_heads=cfg.attention_heads,
        name=experiment.name))
    crops = TerritorySliceDataset(train_cases, cfg.spatial_dims, cfg.patch, cfg.steps_per_epoch * cfg.batch_size,
                                  cfg.foreground_fraction, PatchAugmentConfig(flip=0.0) if cfg.augment else None,
                                  seed=cfg.seed)
    train_dl = DataLoader(crops, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                          worker_init_fn=lambda _: torch.set_num_threads(1))
    val_dl = DataLoader(ListDataset([{"index": i} for i in range(len(val_cases))]), batch_size=None)

    out.mkdir(parents=True, exist_ok=True)
    if not resume:  # a fresh run: outputs of an earlier one in this folder no longer apply
        for stale in ("done.json", "validation.csv", "metrics.csv"):
            (out / stale).unlink(missing_ok=True)
    else:
        (out / "done.json").unlink(missing_ok=True)
    (out / "splits.json").write_text(json.dumps(splits, indent=1))
    (out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_yaml_dict()))
    info = {"config": experiment.name, "architecture": experiment.architecture, "description": experiment.description,
            "fold": splits["fold"], "dataset": str(data), "channel_names": list(dataset.channel_names),
            "label_sets": [list(s) for s in label_sets]}
    module = TerritoryLightning(model, experiment.loss(cfg.loss_weight), cfg, val_cases, experiment.name,
                                splits["fold"])
    stop = EarlyStopping(monitor="val/mean_dice", mode="max", patience=cfg.patience, check_finite=False)
    trainer = make_trainer(
        out, max_epochs=cfg.epochs, device=device, gradient_clip_val=1.0,
        callbacks=[stop, _PatchEpoch(crops), RunRecorder(
            out, METRICS_COLUMNS, "val_mean_dice", lambda e: _model_extra(cfg, {**info, **e}),
            on_best=lambda m: write_csv(out / "validation.csv", m.case_rows, VALIDATION_COLUMNS, float_digits=8)), *(callbacks or [])],
        progress=progress, max_time={"minutes": cfg.max_minutes} if cfg.max_minutes else None)
    if ckpt:  # the first epoch's iterator is made before any hook runs: give it the resumed epoch
        crops.set_epoch(int(torch.load(ckpt, map_location="cpu", weights_only=True).get("epoch", -1)) + 1)
    trainer.fit(module, train_dl, val_dl, ckpt_path=ckpt, weights_only=True)
    if trainer.interrupted:
        return out
    history = read_metrics_csv(out / "metrics.csv")
    if not history or not (out / "validation.csv").is_file():
        raise InputError(f"{out}: the run recorded no validated epoch (metrics.csv is empty)")
    best = max(history, key=lambda r: r.get("val_mean_dice", -1.0))
    stopped = ("epochs" if len(history) >= cfg.epochs else "early stopping" if stop.stopped_epoch > 0
               else "time budget")
    summary = {"config": experiment.name, "architecture": experiment.architecture, "fold": splits["fold"],
               "best_epoch": best["epoch"], "epochs": len(history), "planned_epochs": cfg.epochs,
               "stopped_by": stopped, "minutes": history[-1]["seconds"] / 60.0,
               "val_mean_dice": best["val_mean_dice"], "val_dice_1": best["val_dice_1"],
               "val_dice_2": best["val_dice_2"], "n_train": len(splits["train"]), "n_val": len(splits["val"])}
    tmp = out / ".done.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "done.json")
    return out


# ---------------------------------------------------------------------------------------------------
# prediction
# ---------------------------------------------------------------------------------------------------
def resolve_territory_model_dir(path: str | Path) -> Path:
    """A territory model folder: ``path`` itself when it holds ``config.json``, else ``path/best``.

    Raises:
      InputError: neither holds a territory model (``config.json`` with a ``territories`` section).
    """
    from irisseg.models.folder import resolve_run_model

    return resolve_run_model(path, "territories", "territory", "irisseg territories train")


class TerritoryPredictor:
    """Whole-volume two-territory segmentation with a trained :class:`TerritoryNet`.

    Arguments:
      model_dir (str | Path): a model folder (``config.json`` + ``model.safetensors``) or a run folder
        (its ``best/`` is used).
      device: ``"cpu"``, ``"cuda"`` (bf16 autocast) or ``"auto"``.
      threshold (float | None): probability threshold of both channels (default: the model's, 0.5).

    Attributes:
      in_channels (int): image channels the model expects, in dataset channel order (``_0000`` ...).
      spatial_dims (int): 2 (slice-wise along array axis 0) or 3 (sliding window of ``patch^3``).
      seconds (float): wall time of the last prediction.
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu", threshold: float | None = None):
        from irisseg.incontext import resolve_device
        from irisseg.models.territories import TerritoryNet

        self.folder = resolve_territory_model_dir(model_dir)
        self.device = resolve_device(device)
        self.model = TerritoryNet.load(self.folder).to(self.device).eval()
        info = json.loads((self.folder / "config.json").read_text())["extra"]["territories"]
        self.info = info
        self.in_channels = int(self.model.config.in_channels)
        self.spatial_dims = int(self.model.config.spatial_dims)
        self.patch = int(info.get("patch", 64))
        self.overlap = float(info.get("overlap", 0.5))
        self.slice_batch = int(info.get("slice_batch", 32))
        self.threshold = float(info.get("threshold", 0.5) if threshold is None else threshold)
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"threshold must be between 0 and 1 (exclusive), got {self.threshold}")
        self.reorient = bool(info.get("reorient", False))  # models trained before it existed: grid as stored
        self.seconds = 0.0

    def predict_probabilities(self, channels: Sequence[Volume], names: Sequence[str] | None = None) -> np.ndarray:
        """Probability of each territory at every voxel.

        Arguments:
          channels (Sequence[Volume]): the C image channels of one case, each (D, H, W), same geometry.
          names (Sequence[str] | None): how to name each channel in error messages (e.g. file names).

        Returns:
          np.ndarray: float32 (2, D, H, W) in [0, 1] on the first channel's voxel grid; [0] territory 1,
          [1] territory 2 (independent sigmoids).

        Raises:
          InputError: wrong channel count, non-3D input, NaN intensities, channels of different geometry.
        """
        from irisseg.preprocess import canonical_arrays

        check_channels(channels, self.in_channels, names)
        t0 = time.perf_counter()
        arrays, back = canonical_arrays(channels, self.reorient)  # as in training
        image = normalize_channels(arrays, normalization=_NORMALIZATION)
        logits = predict_logits(self.model, image, self.spatial_dims, self.patch, self.overlap, self.slice_batch,
                                self.device)
        prob = back(torch.sigmoid(logits).numpy().astype(np.float32))
        self.seconds = time.perf_counter() - t0
        return prob

    def predict(self, channels: Sequence[Volume], names: Sequence[str] | None = None) -> Volume:
        """Two-label map: uint8 (D, H, W), 0 background, 1 territory 1, 2 territory 2, in exactly the first
        channel's geometry (shape, spacing, origin, direction). Where both probabilities exceed the threshold
        the larger one wins (:func:`labels_from_probabilities`)."""
        return self.to_labels(self.predict_probabilities(channels, names), channels[0])

    def to_labels(self, prob: np.ndarray, reference: Volume) -> Volume:
        """The label map (see :meth:`predict`) of a :meth:`predict_probabilities` output, in ``reference``'s geometry."""
        return reference.with_array(labels_from_probabilities(prob, self.threshold))


# ---------------------------------------------------------------------------------------------------
# the experiment matrix
# ---------------------------------------------------------------------------------------------------
def run_matrix(data: str | Path, folds: Sequence[int], experiments, cfg: TerritoryTrainConfig, out: str | Path,
               epochs: int | None = None, device: str = "auto", progress: bool = True) -> dict[str, Path]:
    """Train and evaluate configurations x folds, then write the ranked report (``irisseg territories matrix``).

    Each (configuration, fold) trains into ``out/<name>/fold_<f>`` (:func:`train_territories`) unless it is
    finished (``done.json`` present: skipped, never retrained, even if the settings changed since); an
    interrupted run (a ``checkpoints/last.ckpt`` without ``done.json``) is resumed. Then every run's
    ``validation.csv`` (per-case Dice of its best model) is gathered into ``out/validation_cases.csv`` and
    :func:`irisseg.territories.write_report` ranks them: ``ranking.csv``, ``ranking.md``, ``ranking.png``.

    Arguments:
      data (str | Path): the dataset folder (see :func:`train_territories`).
      folds (Sequence[int]): the folds to run, each in ``0..cfg.n_folds - 1``.
      experiments: configuration names or :class:`~irisseg.territories.TerritoryExperiment` s (a comma-separated
        string, a list, or None for all 14).
      cfg (TerritoryTrainConfig): settings shared by every run.
      out (str | Path): the matrix folder.
      epochs (int | None): overrides ``cfg.epochs``.
      device: ``cpu``, ``cuda`` or ``auto``. progress (bool): progress bars.

    Returns:
      dict[str, Path]: ``{"csv", "markdown", "png"}`` (the report) and ``"cases"`` (validation_cases.csv).

    Raises:
      InputError: an unknown configuration, a bad fold, a bad dataset (before anything is trained).
    """
    from irisseg.data.datasets import load_dataset
    from irisseg.incontext import resolve_device
    from irisseg.territories import TerritoryExperiment, resolve_experiments, write_report

    resolve_device(device)  # a bad device fails here, before any run folder is made
    if isinstance(experiments, TerritoryExperiment):
        experiments = [experiments]
    if experiments is not None and not isinstance(experiments, str):
        experiments = [e.name if isinstance(e, TerritoryExperiment) else e for e in experiments]
    chosen = resolve_experiments(experiments)
    if epochs is not None:
        cfg = replace(cfg, epochs=int(epochs))
    folds = list(dict.fromkeys(int(f) for f in folds))
    if not folds:
        raise InputError("--folds: give at least one fold (e.g. 0 or 0,1,2,3,4)")
    dataset = load_dataset(data)  # check the dataset and the folds before training anything
    territory_label_sets(dataset.labels)
    for f in folds:
        _fold_split(dataset, cfg, f)
    from rich.console import Console

    console = Console(quiet=not progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    runs: list[dict] = []
    total = len(chosen) * len(folds)
    for experiment in chosen:
        for f in folds:
            run = out / experiment.name / f"fold_{f}"
            if (run / "done.json").is_file():
                console.print(f"{experiment.name} fold {f}: finished earlier, skipped")
            else:
                resume = (run / "checkpoints" / "last.ckpt").is_file()
                console.print(f"{experiment.name} fold {f}: {'resuming' if resume else 'training'} ({total} run(s) in all)")
                train_territories(experiment.name, cfg, data, f, run, resume=resume, device=device, progress=progress)
            rows = read_validation_csv(run / "validation.csv")
            if not rows:
                raise InputError(f"{run}: no validation.csv (the run did not finish; run the matrix again to resume)")
            results.extend(rows)
            runs.append(json.loads((run / "done.json").read_text()))
    paths = write_report(results, out, runs=runs)
    paths["cases"] = write_csv(out / "validation_cases.csv", results, VALIDATION_COLUMNS, float_digits=8)
    return paths
