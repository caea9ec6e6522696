"""Supervised lesion segmentation training (``irisseg lesion train`` and ``irisseg lesion ablate``).

A residual 3D U-Net (:class:`~irisseg.models.unet.ResidualUNet`) is trained on lesion-aware patches
(:mod:`irisseg.data.patches`: a configurable share of patches centred on a lesion, component-balanced) with
Dice + BCE, Tversky or focal-Dice (:func:`irisseg.losses.get_loss`). After every epoch the validation cases
are predicted whole by Gaussian sliding-window inference (MONAI) and scored: Dice, IoU, lesion-wise recall,
precision and F1, HD95. Early stopping on validation Dice; ``RUN/best`` and ``RUN/last`` are model folders
(``config.json`` + ``model.safetensors``); ``RUN/metrics.csv`` holds one row per epoch; ``--resume``
continues from ``RUN/checkpoints/last.ckpt``. Optionally (``hard_negative_fraction``), after every epoch a
few training cases are predicted and the model's false-positive components become negative patch centres
(online hard-negative mining).

By default volumes stay on their own voxel grid (no resampling), their array axes relabelled towards the
identity direction (``reorient``, no interpolation); with ``target_spacing`` (a spacing, or ``median``:
nnU-Net's choice, the per-axis median over the training cases) every case is resampled to one voxel size
first, and predictions are resampled back. Lesion = every non-zero label of the label map.
All cases are read once and kept in memory as float32 (a 64^3 single-channel case is 1 MB).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from irisseg.errors import InputError
from irisseg.io import Volume, write_csv
from irisseg.lesion import (
    METRIC_KEYS,
    NORMALIZATIONS,
    body_mask,
    case_metrics,
    metric_summary,
    normalize_channels,
    sliding_window_logits,
)
from irisseg.training.engine import (
    AnnealedModule,
    ListDataset,
    RunRecorder,
    YamlConfig,
    make_trainer,
    read_metrics_csv,
    resume_path,
)

__all__ = ["LesionTrainConfig", "PreparedCase", "prepare_case", "train_lesion", "read_metrics_csv",
           "LOSS_NAMES", "METRICS_COLUMNS"]

#: Loss names accepted by ``--loss``.
LOSS_NAMES = ("dice_bce", "tversky", "focal_dice")
#: Columns of ``RUN/metrics.csv`` (one row per epoch).
METRICS_COLUMNS = ("epoch", "step", "train_loss", "val_loss", *(f"val_{k}" for k in METRIC_KEYS), "seconds")


@dataclass
class LesionTrainConfig(YamlConfig):
    """Settings of ``irisseg lesion train`` (a YAML file with these keys; unknown keys are an error).

    Attributes:
      channels: U-Net widths per level (the number of levels is its length); blocks_per_level: residual
        blocks per level in the encoder and in the decoder, one count or one per level (finest first);
        deep_supervision: auxiliary losses at the coarser decoder levels (weights halving per level);
        deep_supervision_targets: how the lesion mask is pooled to those levels, ``area`` (the covered
        fraction of each coarse voxel, a soft target) or ``max`` (1 where any voxel it covers is lesion, so a
        lesion smaller than a coarse voxel stays a full positive there;
        :func:`irisseg.losses.deep_supervision_loss`); norm: ``instance`` | ``batch``
        (:class:`irisseg.models.unet.UNetConfig`).
      patch: training patch side (voxels, cubic), also the sliding-window size; batch_size: patches per step.
      positive_fraction: share of patches centred on a lesion voxel; the rest are centred anywhere in the
        body. component_balanced: a positive draw picks a lesion component uniformly, then a voxel in it
        (True: a 20-voxel lesion as often as a 20,000-voxel one), or any lesion voxel uniformly (False:
        large lesions in proportion to their volume). centre_jitter: each window moved by up to this
        fraction of the half patch per axis, so the drawn voxel is not always in the middle
        (:class:`irisseg.data.patches.PatchConfig`).
      loss: ``dice_bce`` | ``tversky`` | ``focal_dice``; tversky_alpha / tversky_beta: Tversky weights of
        false positives / false negatives; focal_gamma: focal-Dice exponent; batch_dice: overlap terms summed over the whole
        batch (:func:`irisseg.losses.batch_dice`; a lesion-free patch alone gives the soft Dice nothing to learn).
      blob_weight: weight of the instance-wise "blob" term added to that loss on the full-resolution output
        (:func:`irisseg.losses.blob_loss`, Kofler et al. 2023: the configured loss per lesion component of
        each patch, the other lesions left out, averaged over the lesions, so a missed small lesion costs
        as much as a missed large one); 0 (default): off. The paper weighs it half the global term (0.5).
      lr, weight_decay: AdamW; the learning rate follows a cosine schedule over ``epochs`` or over
        ``max_minutes``, whichever runs out first (:meth:`LesionLightning.lr_factor`).
      ema_decay: keep an exponential moving average of the weights with this decay per step (0: none);
        validation and the exported models use the average (:meth:`AnnealedModule.setup_ema`).
      epochs: most epochs; steps_per_epoch: optimiser steps per epoch; patience: epochs without a better
        validation Dice before stopping; max_minutes: wall-time budget of the whole run (None: none).
      val_fraction: share of cases held out for validation (split by ``seed``).
      overlap: sliding-window overlap; threshold: probability threshold of predictions.
      augment: random flips, intensity scale / shift and noise on training patches; augmentation: overrides
        of :class:`irisseg.data.patches.PatchAugmentConfig`'s fields (e.g. ``{spatial_prob: 0.2,
        gamma_prob: 0.3}`` for nnU-Net-style rotation / zoom and gamma), used when ``augment`` is true.
      num_workers: DataLoader workers drawing patches; num_threads: torch threads (None: default); seed.
      reorient: relabel every case's array axes towards the identity direction before training (no
        interpolation; :func:`prepare_case`); stored in the model, whose predictions then do the same.
      normalization: intensity normalisation of every channel, ``zscore`` over the body (nnU-Net's MRI
        scheme) or ``clip_zscore`` (first clipped to the 0.5-99.5 percentiles, which flattens the brightest
        lesion voxels; :func:`irisseg.lesion.normalize_channels`); stored in the model, whose predictions
        then do the same.
      target_spacing: None (default: train and predict on each case's own voxel grid), ``median`` (the
        per-axis median spacing of the training cases after reorientation, as nnU-Net's target spacing) or
        ``[x, y, z]`` in mm: every case is resampled to that voxel size (images linearly, lesion masks
        linearly then thresholded at 0.5) before normalisation; the resolved spacing is stored in the model,
        whose predictions are resampled to it and their probabilities linearly back to the input's grid.
        Worth it when cases differ in voxel size (ISLES-like data); patches and windows are then that many
        voxels of that spacing, and the per-epoch validation metrics are computed on that grid (against the
        resampled masks), while ``irisseg lesion evaluate`` scores predictions on each case's own grid.
      hard_negative_fraction: online hard-negative mining. After every epoch the model being validated
        predicts ``hard_negative_cases`` training cases (in a fixed shuffled rotation) by sliding window, and
        each false-positive component away from the lesions gives a hard-negative centre for its case
        (:func:`irisseg.data.patches.false_positive_centres`); a negative draw on a case with such centres
        takes one of them with this probability (:class:`~irisseg.data.patches.PatchConfig`). 0 (default):
        off. The centres are kept in the checkpoint, so ``--resume`` continues with them.
      hard_positive_fraction: online hard-positive mining, from the same predictions: the lesions of a
        mined case that the model misses entirely (:func:`irisseg.data.patches.missed_components`) become
        its hard positives, and a positive draw on that case picks one of them with this probability rather
        than any of its lesions. 0 (default): off. Kept in the checkpoint as the hard negatives are.
      hard_negative_cases: training cases predicted per epoch for the mining, hard negatives and hard
        positives alike (each takes about as long as one validation case).
      inference_precision: precision of the whole-volume predictions during training (validation, mining)
        and of the ablation's scoring: ``auto`` (bf16 autocast on CUDA and on CPUs with native bf16, i.e.
        AMX; float32 elsewhere), ``fp32`` or ``bf16`` (:func:`irisseg.models.blocks.inference_autocast`).
      train_precision: precision of the training steps: ``auto`` (bf16 autocast on CUDA, and on CPUs with
        native bf16 when ``compile`` is on; float32 elsewhere), ``fp32`` or ``bf16``
        (:func:`irisseg.training.engine.training_precision`; where compiling then fails, the steps run
        uncompiled, still in bf16). Weights, gradients and losses stay float32.
      compile: compile the network's training steps with ``torch.compile``
        (:meth:`~irisseg.training.engine.AnnealedModule.train_forward`; falls back to the plain network
        with a warning where compiling is not possible).
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    blocks_per_level: int | tuple[int, ...] = 1
    deep_supervision: bool = True
    deep_supervision_targets: str = "area"
    norm: str = "instance"
    patch: int = 48
    batch_size: int = 2
    positive_fraction: float = 0.5
    component_balanced: bool = True
    centre_jitter: float = 0.0
    loss: str = "dice_bce"
    tversky_alpha: float = 0.3
    tversky_beta: float = 0.7
    focal_gamma: float = 2.0
    batch_dice: bool = True
    blob_weight: float = 0.0
    lr: float = 2e-3
    weight_decay: float = 1e-5
    ema_decay: float = 0.0
    epochs: int = 40
    steps_per_epoch: int = 50
    patience: int = 10
    max_minutes: float | None = None
    val_fraction: float = 0.2
    overlap: float = 0.5
    threshold: float = 0.5
    augment: bool = True
    augmentation: dict = field(default_factory=dict)
    num_workers: int = 1
    num_threads: int | None = None
    seed: int = 0
    compile: bool = False
    reorient: bool = True
    normalization: str = "zscore"
    target_spacing: str | tuple[float, float, float] | None = None
    hard_negative_fraction: float = 0.0
    hard_positive_fraction: float = 0.0
    hard_negative_cases: int = 8
    inference_precision: str = "auto"
    train_precision: str = "auto"

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        from irisseg.models.unet import UNetConfig

        # the U-Net's own checks (bad counts fail here) and its form: a YAML list becomes a tuple
        self.blocks_per_level = UNetConfig(channels=self.channels, blocks_per_level=self.blocks_per_level).blocks_per_level
        if self.loss not in LOSS_NAMES:
            raise InputError(f"unknown loss {self.loss!r} (choose from {', '.join(LOSS_NAMES)})")
        if self.patch < 8 or self.patch % (2 ** (len(self.channels) - 1)):
            raise InputError(f"patch must be a multiple of {2 ** (len(self.channels) - 1)} (the U-Net's total "
                             f"stride) and at least 8, got {self.patch}")
        from irisseg.models.blocks import NORMS

        if self.norm not in NORMS:
            raise InputError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        from irisseg.losses import DEEP_SUPERVISION_TARGETS

        if self.deep_supervision_targets not in DEEP_SUPERVISION_TARGETS:
            raise InputError(f"deep_supervision_targets must be 'area' or 'max', got {self.deep_supervision_targets!r}")
        if not (self.blob_weight >= 0.0 and math.isfinite(self.blob_weight)):
            raise InputError(f"blob_weight must be a number >= 0, got {self.blob_weight}")
        if not 0.0 < self.val_fraction < 1.0:
            raise InputError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.normalization not in NORMALIZATIONS:
            raise InputError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}")
        if self.target_spacing is not None and self.target_spacing != "median":
            try:  # a string other than "median" is no spacing (even "123", which would iterate to 3 numbers)
                values = () if isinstance(self.target_spacing, str) else tuple(float(v) for v in self.target_spacing)
            except (TypeError, ValueError):
                values = ()
            if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
                raise InputError(f"target_spacing must be null, 'median' or 3 positive numbers [x, y, z] in mm, "
                                 f"got {self.target_spacing!r}")
            self.target_spacing = values
        from irisseg.models.blocks import check_precision

        check_precision(self.inference_precision)
        check_precision(self.train_precision)
        if self.hard_negative_cases < 1:
            raise InputError(f"hard_negative_cases must be >= 1, got {self.hard_negative_cases}")
        self.augmentation = dict(self.augmentation or {})
        self.patch_config()  # invalid sampling settings (positive_fraction, centre_jitter) fail here
        self.augment_config()  # unknown or invalid augmentation keys fail here, before any training

    def patch_config(self):
        """The patch sampling of this config (:class:`irisseg.data.patches.PatchConfig`)."""
        from irisseg.data.patches import PatchConfig

        return PatchConfig(patch_size=self.patch, positive_fraction=self.positive_fraction,
                           component_balanced=self.component_balanced, centre_jitter=self.centre_jitter,
                           hard_negative_fraction=self.hard_negative_fraction,
                           hard_positive_fraction=self.hard_positive_fraction)

    def augment_config(self):
        """The patch augmentation of this config (:class:`PatchAugmentConfig`), or None without ``augment``."""
        from irisseg.data.patches import PatchAugmentConfig

        if not self.augment:
            return None
        known = set(PatchAugmentConfig.__dataclass_fields__)
        unknown = sorted(set(self.augmentation) - known)
        if unknown:
            raise InputError(f"unknown augmentation setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return PatchAugmentConfig(**self.augmentation)


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------
@dataclass
class PreparedCase:
    """One case ready for training and validation.

    Attributes:
      case_id (str): dataset case id.
      image (np.ndarray): float32 (C, D, H, W), normalised (:func:`irisseg.lesion.normalize_channels`).
      label (np.ndarray): uint8 (D, H, W), 1 = lesion (any non-zero label of the label map).
      body (np.ndarray): bool (D, H, W) body mask (:func:`irisseg.lesion.body_mask`).
      geometry (Volume): the first channel as the arrays are laid out (reoriented and resampled with them,
        if they were).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    body: np.ndarray
    geometry: Volume

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return self.geometry.spacing_zyx


def prepare_case(case, reorient: bool = True, normalization: str = "zscore",
                 spacing: tuple[float, float, float] | None = None) -> PreparedCase:
    """Read and normalise one labelled :class:`~irisseg.data.datasets.Case`.

    Arguments:
      case (Case): a dataset case (channels and label map, one geometry).
      reorient (bool): relabel the array axes towards the identity direction
        (:func:`irisseg.preprocess.canonical_axes`; no interpolation), as prediction then does, so cases
        stored with other axis orders reach the network alike.
      normalization (str): ``clip_zscore`` or ``zscore`` (:func:`irisseg.lesion.normalize_channels`).
      spacing (tuple | None): resample to this voxel size, mm (x, y, z) (images linearly; the lesion mask
        linearly, then thresholded at 0.5), as prediction then does (:func:`irisseg.preprocess.model_grid_record`).

    Raises:
      InputError: unreadable files, channels or label of different geometry, NaN intensities (naming the file).
    """
    from irisseg.preprocess import model_grid_record

    channels, label = case.load()
    for path, volume in zip(case.image_paths, channels, strict=False):
        if not np.isfinite(volume.array).all():
            raise InputError(f"{path}: image holds NaN or infinite intensities")
    record = model_grid_record(channels[0], reorient, spacing)
    channels = [record.apply(v, kind="image") for v in channels]
    lesion = record.apply(label.with_array((label.array != 0).astype(np.float32)), kind="linear").array >= 0.5
    arrays = [v.array for v in channels]
    body = body_mask(arrays)
    image = normalize_channels(arrays, body, normalization)
    return PreparedCase(case.case_id, image, lesion.astype(np.uint8), body, channels[0])


def median_spacing(cases, reorient: bool = True) -> tuple[float, float, float]:
    """nnU-Net's target spacing: the per-axis median voxel size (mm, x, y, z) of ``cases`` (dataset
    :class:`~irisseg.data.datasets.Case` objects; only their image headers are read), after the axis
    relabelling of ``reorient``."""
    from irisseg.preprocess import model_grid_record

    spacings = [model_grid_record(c.image_geometry(), reorient).model_geometry()["spacing"] for c in cases]
    return tuple(float(v) for v in np.median(np.asarray(spacings, float), axis=0))


# ---------------------------------------------------------------------------------------------------
# module
# ---------------------------------------------------------------------------------------------------
def make_loss(cfg: LesionTrainConfig, per_item: bool = False):
    """The configured loss as ``fn(logits (B, 1, ...), target (B, 1, ...)) -> scalar``; ``per_item``: without
    the batch-Dice folding, taking ``reduction`` (the per-instance loss of the blob term)."""
    from irisseg.losses import batch_dice, get_loss

    kwargs = {"tversky": {"alpha": cfg.tversky_alpha, "beta": cfg.tversky_beta},
              "focal_dice": {"gamma": cfg.focal_gamma}}.get(cfg.loss, {})
    loss = get_loss(cfg.loss, **kwargs)
    return batch_dice(loss) if cfg.batch_dice and not per_item else loss


class LesionLightning(AnnealedModule):
    """LightningModule for patch training and whole-volume validation of a lesion U-Net."""

    def __init__(self, model: torch.nn.Module, cfg: LesionTrainConfig, val_cases: list[PreparedCase]):
        super().__init__()
        self.model, self.cfg, self.val_cases = model, cfg, val_cases
        self.setup_ema()
        self.loss_fn = make_loss(cfg)
        self.blob_fn = make_loss(cfg, per_item=True) if cfg.blob_weight > 0 else None
        self.best_val = -math.inf
        self._train_losses: list[float] = []
        self._val_rows: list[dict] = []
        self.epoch_summary: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss(self, out, target: torch.Tensor, instances: torch.Tensor | None = None) -> torch.Tensor:
        """The configured loss of the network's output(s) against (B, 1, ...) targets, plus the blob term on
        the full-resolution output when ``blob_weight`` > 0 (``instances``: the batch's lesion components)."""
        from irisseg.losses import blob_loss, deep_supervision_loss

        loss = deep_supervision_loss(self.loss_fn, out, target, mode=self.cfg.deep_supervision_targets)
        if self.blob_fn is not None:
            if instances is None:
                raise ValueError("blob_weight > 0 needs the batch's lesion instances (LesionPatchDataset(instances=True))")
            main = out[0] if isinstance(out, (list, tuple)) else out
            loss = loss + self.cfg.blob_weight * blob_loss(self.blob_fn, main, instances)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # losses work in float32 under autocast
        loss = self._loss(self.train_forward(batch["image"]), batch["label"], batch.get("instances"))
        self._train_losses.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        case = self.val_cases[int(batch["index"])]
        logits = sliding_window_logits(self.eval_model, batch["image"].cpu(), (self.cfg.patch,) * 3, self.cfg.overlap,
                                       device=self.device, precision=self.cfg.inference_precision)
        label = batch["label"].cpu()
        pred = (torch.sigmoid(logits) > self.cfg.threshold)[0, 0].numpy()
        row = case_metrics(pred, case.label, case.spacing_zyx)
        row["loss"] = float(self.loss_fn(logits, label))
        self._val_rows.append(row)

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []

    def on_validation_epoch_end(self) -> None:
        if not self._val_rows:
            return
        rows = self._val_rows
        summary = {"val_loss": float(np.mean([r["loss"] for r in rows]))}
        summary.update({f"val_{k}": v for k, v in metric_summary(rows).items()})
        summary["train_loss"] = float(np.mean(self._train_losses)) if self._train_losses else float("nan")
        self._train_losses = []
        self.epoch_summary = summary
        for k, v in summary.items():
            if k.startswith("val_") and math.isfinite(v):
                self.log(k.replace("val_", "val/", 1), v, prog_bar=k == "val_dice", batch_size=1)


def _model_extra(cfg: LesionTrainConfig, info: dict) -> dict:
    return {"lesion": {"patch": [cfg.patch] * 3, "overlap": cfg.overlap, "threshold": cfg.threshold,
                       "reorient": cfg.reorient, "normalization": cfg.normalization,
                       **info},
            "train": cfg.to_yaml_dict()}


class _PatchEpoch(L.Callback):
    """Tell the patch stream which epoch starts, so every epoch draws new patches (deterministically)."""

    def __init__(self, patches):
        self.patches = patches

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.patches.set_epoch(trainer.current_epoch)


class _HardExampleMiner(L.Callback):
    """Online hard-example mining: after every training epoch, predict ``cfg.hard_negative_cases`` training
    cases with the model being validated and give each its false-positive centres as hard negatives and
    its missed lesions as hard positives.

    Cases are visited in one shuffled order (by ``cfg.seed``), round robin. The centres, the missed lesions
    and the position in the order are the callback's state, saved in the checkpoint (under the key runs had
    before hard positives, so older runs resume) and given back to the patch stream on resume.
    """

    def __init__(self, patches, cases: list[PreparedCase], cfg: LesionTrainConfig):
        self.patches, self.cases, self.cfg = patches, cases, cfg
        self.order = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x4A4D])).permutation(len(cases))
        self.visited = 0

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from irisseg.data.patches import false_positive_centres, missed_components

        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        if trainer.should_stop or last_epoch:
            return  # no epoch follows that could use the centres
        for _ in range(min(self.cfg.hard_negative_cases, len(self.cases))):
            index = int(self.order[self.visited % len(self.order)])
            self.visited += 1
            case = self.cases[index]
            logits = sliding_window_logits(module.eval_model, torch.from_numpy(case.image)[None],
                                           (self.cfg.patch,) * 3, self.cfg.overlap, device=module.device,
                                           precision=self.cfg.inference_precision)
            prob = torch.sigmoid(logits)[0, 0].numpy()
            if self.cfg.hard_negative_fraction > 0:  # each kind only where it is used
                self.patches.set_hard_negatives(index, false_positive_centres(prob, case.label, self.cfg.threshold))
            if self.cfg.hard_positive_fraction > 0:
                self.patches.set_hard_positives(index, missed_components(prob, case.label, self.cfg.threshold,
                                                                         self.patches.config.connectivity))

    @property
    def state_key(self) -> str:
        return "_HardNegativeMiner"

    def state_dict(self) -> dict:  # the centres and lesions live in the patch stream's samplers only
        samplers = self.patches.samplers
        return {"visited": self.visited,
                "centres": {str(k): s.hard_negatives.tolist() for k, s in enumerate(samplers) if len(s.hard_negatives)},
                "lesions": {str(k): s.hard_positives.tolist() for k, s in enumerate(samplers) if len(s.hard_positives)}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.visited = int(state_dict.get("visited", 0))
        for index, centres in state_dict.get("centres", {}).items():
            self.patches.set_hard_negatives(int(index), centres)
        for index, lesions in state_dict.get("lesions", {}).items():
            self.patches.set_hard_positives(int(index), lesions)


# ---------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------
def _splits(dataset, cfg: LesionTrainConfig, out: Path, resume: bool) -> dict[str, list[str]]:
    from irisseg.data.datasets import split

    path = out / "splits.json"
    if resume and path.is_file():
        return json.loads(path.read_text())
    if len(dataset.cases) < 2:
        raise InputError(f"{dataset.root}: lesion training needs at least 2 labelled cases (one for validation), "
                         f"found {len(dataset.cases)}")
    s = split(dataset, (1.0 - cfg.val_fraction, cfg.val_fraction, 0.0), seed=cfg.seed)
    if not s["val"]:
        s["val"], s["train"] = s["train"][-1:], s["train"][:-1]
    return {"train": s["train"], "val": s["val"]}


def train_lesion(cfg: LesionTrainConfig, data: str | Path, out: str | Path, resume: bool = False,
                 device: str = "auto", progress: bool = True, callbacks: list[L.Callback] | None = None) -> Path:
    """Train a lesion U-Net on an nnU-Net-style dataset; returns the run folder.

    Arguments:
      cfg (LesionTrainConfig): settings.
      data (str | Path): dataset folder (``dataset.json``, ``imagesTr/<case>_0000.nii.gz`` ..., ``labelsTr/``);
        multi-channel images allowed; lesion = any non-zero label.
      out (str | Path): run folder: ``best/``, ``last/`` (model folders), ``metrics.csv``, ``splits.json``,
        ``train_config.yaml``, ``logs/`` (CSV, TensorBoard), ``checkpoints/last.ckpt``.
      resume (bool): continue from ``out/checkpoints/last.ckpt`` with the same split.
      device: ``cpu``, ``cuda`` or ``auto`` (the precision of the steps: ``cfg.train_precision``).
      callbacks: extra Lightning callbacks (tests).

    Raises:
      InputError: an unreadable dataset or case, fewer than 2 cases, nothing to resume.
    """
    import yaml
    from lightning.pytorch.callbacks import EarlyStopping

    from irisseg.data.datasets import load_dataset
    from irisseg.data.patches import LesionPatchDataset
    from irisseg.incontext import resolve_device
    from irisseg.models.unet import ResidualUNet, UNetConfig

    resolve_device(device)  # a bad device fails here, before the run folder is made
    out = Path(out)
    ckpt = resume_path(out, resume)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dataset = load_dataset(data)
    splits = _splits(dataset, cfg, out, resume)
    by_id = {c.case_id: c for c in dataset.cases}
    spacing = cfg.target_spacing
    if spacing == "median":
        spacing = median_spacing([by_id[i] for i in splits["train"]], cfg.reorient)
    train_cases = [prepare_case(by_id[i], cfg.reorient, cfg.normalization, spacing) for i in splits["train"]]
    val_cases = [prepare_case(by_id[i], cfg.reorient, cfg.normalization, spacing) for i in splits["val"]]
    n_channels = train_cases[0].image.shape[0]
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = ResidualUNet(UNetConfig(in_channels=n_channels, out_channels=1, channels=cfg.channels,
                                    blocks_per_level=cfg.blocks_per_level, deep_supervision=cfg.deep_supervision,
                                    norm=cfg.norm))
    patches = LesionPatchDataset(
        [(c.image, c.label, c.body) for c in train_cases],
        config=cfg.patch_config(),
        augment=cfg.augment_config(), seed=cfg.seed,
        samples_per_epoch=cfg.steps_per_epoch * cfg.batch_size, instances=cfg.blob_weight > 0)
    # Workers are not persistent, so each epoch's workers see the epoch set by _PatchEpoch (fresh patches
    # every epoch, and the same ones after a resume).
    train_dl = DataLoader(patches, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                          worker_init_fn=lambda _: torch.set_num_threads(1))
    val_dl = DataLoader(ListDataset([{"image": torch.from_numpy(c.image)[None],
                                      "label": torch.from_numpy(c.label)[None, None].float(), "index": i}
                                     for i, c in enumerate(val_cases)]), batch_size=None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "splits.json").write_text(json.dumps(splits, indent=1))
    (out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_yaml_dict()))
    info = {"dataset": str(data), "channel_names": list(dataset.channel_names), "splits": "splits.json",
            "target_spacing": list(spacing) if spacing is not None else None}
    module = LesionLightning(model, cfg, val_cases)
    mining = cfg.hard_negative_fraction > 0 or cfg.hard_positive_fraction > 0
    miner = [_HardExampleMiner(patches, train_cases, cfg)] if mining else []
    stop = EarlyStopping(monitor="val/dice", mode="max", patience=cfg.patience, check_finite=False)
    trainer = make_trainer(
        out, max_epochs=cfg.epochs, device=device, gradient_clip_val=1.0,
        callbacks=[stop, _PatchEpoch(patches), *miner, RunRecorder(out, METRICS_COLUMNS, "val_dice", lambda e: _model_extra(cfg, {**info, **e})), *(callbacks or [])],
        progress=progress, max_time={"minutes": cfg.max_minutes} if cfg.max_minutes else None,
        precision=cfg.train_precision, compiled=cfg.compile)
    if ckpt:  # the first epoch's patch iterator is made before any hook runs: give it the resumed epoch
        patches.set_epoch(int(torch.load(ckpt, map_location="cpu", weights_only=True).get("epoch", -1)) + 1)
    trainer.fit(module, train_dl, val_dl, ckpt_path=ckpt, weights_only=True)
    return out


# ---------------------------------------------------------------------------------------------------
# loss ablation
# ---------------------------------------------------------------------------------------------------
#: Columns of ``ablation_summary.csv``: the best epoch (by validation Dice) of each loss's run.
ABLATION_COLUMNS = ("loss", "best_epoch", "epochs", "minutes", "val_dice", "val_iou", "val_lesion_recall",
                    "val_lesion_precision", "val_lesion_f1", "val_hd95")
#: Extra columns with ``tta=True``: the best model's validation metrics with mirror test-time augmentation.
ABLATION_TTA_COLUMNS = ("tta_val_dice", "tta_val_iou", "tta_val_lesion_recall", "tta_val_lesion_precision",
                        "tta_val_lesion_f1", "tta_val_hd95")
#: Extra columns with a held-out test dataset: the best model's metrics on every labelled case of it.
ABLATION_TEST_COLUMNS = ("test_dice", "test_iou", "test_lesion_recall", "test_lesion_precision", "test_lesion_f1",
                         "test_hd95")


def _score_best_model(run: Path, data: str | Path, report: Path, case_ids: list[str] | None, tta: bool,
                      reuse: bool, device: str, precision: str) -> dict:
    """Score ``run/best`` on cases of ``data``, writing the per-case ``report`` (then mean and median rows).

    With ``reuse`` an existing report newer than the best weights is read back rather than predicted again.
    Returns the :func:`~irisseg.lesion.metric_summary` of the cases (as validation summarises them).
    """
    import csv

    from irisseg.lesion import LesionPredictor, evaluate_dataset, summary_rows

    weights = run / "best" / "model.safetensors"
    if not (reuse and report.is_file() and report.stat().st_mtime_ns >= weights.stat().st_mtime_ns):
        rows = evaluate_dataset(LesionPredictor(run, device=device, tta=tta, precision=precision), data, case_ids)
        tmp = report.with_suffix(".csv.tmp")
        write_csv(tmp, [*rows, *summary_rows(rows)], float_digits=6)
        tmp.replace(report)
    with report.open(newline="") as f:
        cases = [r for r in csv.DictReader(f) if r["case"] not in ("mean", "median")]
    return metric_summary(cases)


def tta_validation(run: str | Path, data: str | Path, device: str = "cpu", precision: str = "auto") -> dict:
    """Score a finished run's best model on its validation split with mirror test-time augmentation.

    nnU-Net validates its final model this way. The per-case report is cached in
    ``<run>/val_tta.csv`` (one row per validation case, then ``mean`` and ``median`` rows), so a second
    call only reads it back, unless the best model has been saved again since.

    Arguments:
      run (str | Path): a lesion run folder (``best/``, ``splits.json``).
      data (str | Path): the dataset the run was trained on.
      device: ``cpu``, ``cuda`` or ``auto``. precision: ``auto``, ``fp32`` or ``bf16``
        (:class:`~irisseg.lesion.LesionPredictor`).

    Returns:
      dict: ``tta_val_<metric>`` for the metrics of :data:`ABLATION_TTA_COLUMNS`: the mean over the
      validation cases, except HD95 (mm), the median over them, as ``val_hd95`` during training.
    """
    run = Path(run)
    val_ids = json.loads((run / "splits.json").read_text())["val"]
    scores = _score_best_model(run, data, run / "val_tta.csv", val_ids, tta=True, reuse=True, device=device,
                               precision=precision)
    return {f"tta_val_{k}": v for k, v in scores.items()}


def heldout_scores(run: str | Path, test_data: str | Path, device: str = "cpu", precision: str = "auto") -> dict:
    """Score a finished run's best model on a held-out labelled dataset (no test-time augmentation).

    The best epoch is picked on the validation cases, so its validation Dice is biased upwards, and the
    mean over a few dozen validation cases moves by several Dice points from one split to another; a
    hundred or more cases the run never saw measure the model itself. Always predicted afresh; the
    per-case report goes to ``<run>/test_report.csv`` (one row per case, then ``mean`` and ``median`` rows).

    Arguments:
      run (str | Path): a lesion run folder (``best/``).
      test_data (str | Path): nnU-Net-style dataset folder; all its labelled cases (``labelsTr`` and
        ``labelsTs``) are scored, so it must not share cases with the training data.
      device: ``cpu``, ``cuda`` or ``auto``. precision: ``auto``, ``fp32`` or ``bf16``
        (:class:`~irisseg.lesion.LesionPredictor`).

    Returns:
      dict: ``test_<metric>`` for the metrics of :data:`ABLATION_TEST_COLUMNS`: the mean over the cases,
      except HD95 (mm), the median over them.
    """
    run = Path(run)
    scores = _score_best_model(run, test_data, run / "test_report.csv", None, tta=False, reuse=False, device=device,
                               precision=precision)
    return {f"test_{k}": v for k, v in scores.items()}


def _check_heldout(data: str | Path, test_data: str | Path) -> None:
    """Refuse, before any training, a held-out dataset that is the training data, has no labelled case or
    has another number of channels."""
    from irisseg.data.datasets import load_dataset

    if Path(test_data).resolve() == Path(data).resolve():
        raise InputError(f"{test_data}: the held-out test dataset is the training dataset itself")
    train, test = load_dataset(data), load_dataset(test_data)
    if not any(c.label_path is not None for c in [*test.cases, *test.test_cases]):
        raise InputError(f"{test_data}: no labelled case to test on (labelsTr / labelsTs)")
    if test.num_channels != train.num_channels:
        raise InputError(f"{test_data}: {test.num_channels} image channel(s), the training dataset {data} has "
                         f"{train.num_channels}")


def ablate_losses(cfg: LesionTrainConfig, data: str | Path, losses: list[str], out: str | Path,
                  device: str = "auto", progress: bool = True, n_overlays: int = 3, tta: bool = False,
                  test_data: str | Path | None = None) -> list[dict]:
    """Train one run per loss on the same split and seed, then compare them (``irisseg lesion ablate``).

    Arguments:
      cfg (LesionTrainConfig): settings shared by every run (its ``loss`` is replaced per run).
      data (str | Path): the dataset folder. losses (list[str]): names from :data:`LOSS_NAMES`.
      out (str | Path): writes ``<loss>/`` (a full run folder each; a finished run is not retrained, an
        interrupted one is resumed), ``ablation_summary.csv`` (:data:`ABLATION_COLUMNS`), ``dice_curve.png``
        (validation Dice per epoch), ``loss_curve.png`` (training loss solid, validation loss dashed),
        ``ablation_val_dice.png`` and ``ablation_val_recall.png`` (bars at each run's best epoch) and
        ``overlay_<case>.png`` for the first ``n_overlays`` validation cases (image, reference, and each
        loss's prediction).
      tta (bool): also score each run's best model on the validation cases with mirror test-time
        augmentation (:func:`tta_validation`, 8 passes per case): adds :data:`ABLATION_TTA_COLUMNS` to the
        summary and a ``<loss> + TTA`` bar after the plain ones in the two bar charts.
      test_data (str | Path | None): a held-out labelled dataset (cases the runs never saw): each run's
        best model is also scored on all its labelled cases (:func:`heldout_scores`): adds
        :data:`ABLATION_TEST_COLUMNS` to the summary and a ``<loss> test`` bar to the two bar charts.

    Returns:
      list[dict]: the summary rows, in ``losses`` order.
    """
    from dataclasses import replace

    from irisseg.viz import bar_chart, line_plot

    losses = list(dict.fromkeys(losses))
    unknown = [x for x in losses if x not in LOSS_NAMES]
    if not losses or unknown:
        raise InputError(f"--losses: unknown loss(es) {', '.join(unknown) or '(none given)'} "
                         f"(choose from {', '.join(LOSS_NAMES)})")
    if test_data is not None:
        _check_heldout(data, test_data)
    from irisseg.incontext import resolve_device

    resolve_device(device)  # a bad device fails here, before any run folder is made
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for loss in losses:
        run = out / loss
        done = run / "done.json"
        if not done.is_file():
            resume = (run / "checkpoints" / "last.ckpt").is_file()
            train_lesion(replace(cfg, loss=loss), data, run, resume=resume, device=device, progress=progress)
            done.write_text(json.dumps({"loss": loss}))
        history = read_metrics_csv(run / "metrics.csv")
        if not history:
            raise InputError(f"{run}: the run recorded no epoch (metrics.csv is empty)")
        best = max(history, key=lambda r: r.get("val_dice", -1.0))
        rows.append({"loss": loss, "best_epoch": best["epoch"], "epochs": len(history),
                     "minutes": history[-1]["seconds"] / 60.0, **{k: best.get(k, float("nan"))
                                                                  for k in ABLATION_COLUMNS[4:]}})
        if tta:
            rows[-1].update(tta_validation(run, data, device=device, precision=cfg.inference_precision))
        if test_data is not None:
            rows[-1].update(heldout_scores(run, test_data, device=device, precision=cfg.inference_precision))
        curves[loss] = history
    columns = (*ABLATION_COLUMNS, *(ABLATION_TTA_COLUMNS if tta else ()),
               *(ABLATION_TEST_COLUMNS if test_data is not None else ()))
    write_csv(out / "ablation_summary.csv", [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                            for r in rows], columns)

    line_plot({loss: ([r["epoch"] for r in h], [r.get("val_dice", math.nan) for r in h]) for loss, h in curves.items()},
              out / "dice_curve.png", xlabel="epoch", ylabel="validation Dice", title="Validation Dice per epoch")
    series, styles = {}, {}
    for loss, h in curves.items():
        series[f"{loss} train"] = ([r["epoch"] for r in h], [r.get("train_loss", math.nan) for r in h])
        series[f"{loss} val"] = ([r["epoch"] for r in h], [r.get("val_loss", math.nan) for r in h])
        styles[f"{loss} val"] = "--"
    line_plot(series, out / "loss_curve.png", xlabel="epoch", ylabel="loss", styles=styles,
              title="Training (solid) and validation (dashed) loss")
    for key, png, label in (("val_dice", "ablation_val_dice.png", "Dice"),
                            ("val_lesion_recall", "ablation_val_recall.png", "lesion recall")):
        bars = {r["loss"]: r[key] for r in rows}
        if tta:
            bars.update({f"{r['loss']} + TTA": r[f"tta_{key}"] for r in rows})
        if test_data is not None:
            bars.update({f"{r['loss']} test": r[key.replace("val_", "test_", 1)] for r in rows})
        notes = ["validation"] + (["+ TTA: mirrored, 8 passes"] if tta else [])
        notes += ["test: held-out cases"] if test_data is not None else []
        bar_chart(bars, out / png, ylabel=label, ylim=(0, 1),
                  title=f"{label[0].upper()}{label[1:]} at each loss's best epoch ({'; '.join(notes)})")
    _ablation_overlays(data, losses, out, n_overlays, device, cfg.inference_precision)
    return rows


def _ablation_overlays(data, losses: list[str], out: Path, n: int, device: str, precision: str) -> None:
    """``overlay_<case>.png``: the first ``n`` validation cases, reference and each loss's best-model prediction."""
    from irisseg.data.datasets import load_dataset
    from irisseg.lesion import LesionPredictor
    from irisseg.viz import mask_centre, triplanar_overlays

    if n <= 0:
        return
    val_ids = json.loads((out / losses[0] / "splits.json").read_text())["val"][:n]
    by_id = {c.case_id: c for c in load_dataset(data).cases}
    predictors = {loss: LesionPredictor(out / loss, device=device, precision=precision) for loss in losses}
    for case_id in val_ids:
        case = by_id[case_id]
        channels, label = case.load()
        ref = (label.array != 0).astype(np.uint8)
        spacing = channels[0].spacing
        centre = mask_centre({"reference": ref}, ref.shape)
        panels = [{"image": channels[0].array, "masks": {"reference": ref}, "spacing": spacing, "centre": centre,
                   "row_title": f"{case_id}: reference"}]
        for loss, predictor in predictors.items():
            pred = predictor.predict(channels).array
            d = case_metrics(pred, ref, channels[0].spacing_zyx)
            panels.append({"image": channels[0].array, "masks": {"reference": ref, loss: pred}, "spacing": spacing,
                           "centre": centre, "fill": False,
                           "row_title": f"{loss}: Dice {d['dice']:.3f}, lesion recall {d['lesion_recall']:.2f}"})
        triplanar_overlays(panels, out / f"overlay_{case_id}.png", title=f"{case_id}: image / reference / prediction")
