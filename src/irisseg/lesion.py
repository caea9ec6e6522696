"""Supervised lesion segmentation, inference side: intensity preparation, whole-volume sliding-window
prediction and per-case evaluation (``irisseg lesion predict`` / ``irisseg lesion evaluate``).

The model (:class:`~irisseg.models.unet.ResidualUNet`) works on the volume's own voxel grid by default: there
is no resampling, so a prediction has exactly the input's shape, spacing, origin and direction by construction.
A model trained with a ``target_spacing`` sees every input resampled to that voxel size (linearly) and its
probabilities are resampled linearly back onto the input's grid before thresholding.
Models trained with ``reorient`` (the default) see the array axes relabelled towards the identity
direction (:func:`irisseg.preprocess.canonical_axes`, no interpolation), and the prediction is relabelled
back, so a scan stored with another axis order is segmented the same way.
Every image channel is normalised on its own (:func:`normalize_channels`), the same way in training and
inference. Training lives in :mod:`irisseg.training.lesion`.

Example::

    pred = LesionPredictor("runs/lesion")            # RUN/best (or a model folder)
    mask = pred.predict([read_volume("case_0000.nii.gz")])   # uint8 {0, 1} Volume in the input's geometry
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from irisseg.errors import InputError
from irisseg.io import Volume, check_same_geometry
from irisseg.models.blocks import check_precision, inference_autocast
from irisseg.preprocess import canonical_arrays, clip_percentiles, zscore

__all__ = ["NORMALIZATIONS", "LesionPredictor", "body_mask", "check_channels", "normalize_channels",
           "sliding_window_logits", "case_metrics", "evaluate_dataset", "summary_rows", "metric_summary",
           "resolve_lesion_model_dir", "METRIC_KEYS"]

#: The per-case metrics of a lesion evaluation, in report order.
METRIC_KEYS = ("dice", "iou", "lesion_recall", "lesion_precision", "lesion_f1", "hd95")


def body_mask(channels: Sequence[np.ndarray]) -> np.ndarray:
    """Where the body (brain) is, for intensity statistics and negative patch centres.

    :func:`irisseg.data.patches.body_mask` (voxels above ``min + 5% of the range`` in any channel, holes
    filled), or every voxel when that covers under 1% of the volume.

    Arguments:
      channels (Sequence[np.ndarray]): C arrays (D, H, W) of raw intensities.

    Returns:
      np.ndarray: bool (D, H, W).
    """
    from irisseg.data.patches import body_mask as derived

    body = derived(np.stack([np.asarray(c, np.float32) for c in channels]))
    return body if body.mean() >= 0.01 else np.ones(body.shape, bool)


#: Intensity normalisations of :func:`normalize_channels`: ``clip_zscore`` (clip to the 0.5-99.5
#: percentiles, then z-score, both over the body: nnU-Net's CT scheme) and ``zscore`` (z-score over the body
#: only: nnU-Net's scheme for MRI, which keeps the brightest voxels, e.g. hyperintense lesions, apart).
NORMALIZATIONS = ("clip_zscore", "zscore")


def normalize_channels(channels: Sequence[np.ndarray], body: np.ndarray | None = None,
                       normalization: str = "zscore") -> np.ndarray:
    """Per-channel intensity normalisation used by the lesion pipeline in training and inference.

    Arguments:
      channels (Sequence[np.ndarray]): C arrays (D, H, W) of raw intensities (any units).
      body (np.ndarray | None): bool (D, H, W) body mask; default :func:`body_mask` of the channels.
      normalization (str): one of :data:`NORMALIZATIONS`: ``zscore`` z-scores each channel over the body;
        ``clip_zscore`` first clips it to its 0.5-99.5 percentiles over the body (lesion models trained
        before the choice existed, and the territory models).

    Returns:
      np.ndarray: float32 (C, D, H, W).
    """
    if normalization not in NORMALIZATIONS:
        raise InputError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    body = body_mask(channels) if body is None else body
    arrays = [np.asarray(c, np.float32) for c in channels]
    if normalization == "clip_zscore":
        arrays = [clip_percentiles(a, mask=body) for a in arrays]
    return np.stack([zscore(a, mask=body) for a in arrays])


def sliding_window_logits(model: torch.nn.Module, image: torch.Tensor, patch: Sequence[int], overlap: float = 0.5,
                          sw_batch_size: int = 4, device: torch.device | str = "cpu",
                          precision: str = "auto") -> torch.Tensor:
    """Whole-volume logits by Gaussian-weighted sliding-window inference (MONAI's ``sliding_window_inference``).

    Arguments:
      model (nn.Module): maps (B, C, p, p, p) to logits (B, 1, p, p, p) in eval mode.
      image (torch.Tensor): (1, C, D, H, W) normalised image, any D, H, W (smaller than the patch: padded).
      patch (Sequence[int]): window size (p_d, p_h, p_w) in voxels.
      overlap (float): window overlap fraction in [0, 1).
      sw_batch_size (int): windows per forward pass. 4 rather than 2: on 2 CPU cores, a 64^3 volume in
        32^3 windows takes 0.80 s against 1.24 s (3-level net, ``benchmarks/lesion_speed.py``); 8 is slower.
      device: where the model runs (windows are moved there; the result is gathered on the CPU).
      precision (str): ``auto`` (bf16 autocast on CUDA and on CPUs with native bf16, float32 elsewhere),
        ``fp32`` or ``bf16`` (:func:`irisseg.models.blocks.inference_autocast`). On 120 held-out synthetic
        cases bf16 left the mean Dice unchanged (0.717, paired difference under 0.001) and took 0.20 s a
        64^3 case against 0.39 s (docs/benchmarks/lesion_bf16_1212/).

    Returns:
      torch.Tensor: float32 logits (1, 1, D, H, W) on the CPU.
    """
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), inference_autocast(device, precision):
            out = sliding_window_inference(
                image, roi_size=tuple(int(p) for p in patch), sw_batch_size=sw_batch_size,
                predictor=lambda x: model(x.to(device)).float(), overlap=overlap, mode="gaussian",
                sw_device=device, device=torch.device("cpu"),
            )
    finally:
        model.train(was_training)
    return out.float()


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]) -> dict[str, float]:
    """Dice, IoU, lesion-wise recall / precision / F1 and HD95 (mm) of one binary prediction.

    Arguments:
      pred, ref (np.ndarray): binary (D, H, W) prediction and reference (non-zero = lesion).
      spacing_zyx (Sequence[float]): voxel size in mm in array-axis order.

    Returns:
      dict[str, float]: the :data:`METRIC_KEYS` plus ``n_lesions`` / ``n_detected`` / ``ref_voxels`` /
      ``pred_voxels``. Lesions are 26-connected components, as :func:`irisseg.metrics.lesion_detection`
      defines them (a reference lesion counts as detected when any predicted voxel overlaps it).
    """
    from irisseg.metrics import evaluate

    m = evaluate((pred != 0).astype(np.uint8), (ref != 0).astype(np.uint8), spacing=spacing_zyx, labels=[1],
                 lesion_wise=True)[1]
    out = {k: float(m[k]) for k in METRIC_KEYS}
    out.update(n_lesions=int(m["lesion_n_ref"]), n_detected=int(m["lesion_n_detected"]),
               ref_voxels=int(m["ref_voxels"]), pred_voxels=int(m["pred_voxels"]))
    return out


def check_channels(channels: Sequence[Volume], in_channels: int, names: Sequence[str] | None = None) -> list[str]:
    """Check the image channels of one case before a model sees them; returns their names.

    Arguments:
      channels (Sequence[Volume]): the case's channels, each (D, H, W).
      in_channels (int): how many the model takes (files ``_0000`` ... ``_{in_channels - 1:04d}``).
      names (Sequence[str] | None): how to name each channel in messages (default ``channel i``).

    Raises:
      InputError: a wrong channel count, a volume that is not 3D, NaN or infinite intensities, or channels
        whose geometry differs from the first one's.
    """
    names = list(names) if names is not None else [f"channel {i}" for i in range(len(channels))]
    if len(channels) != in_channels:
        raise InputError(f"{names[0] if names else 'input'}: the model expects {in_channels} channel(s) "
                         f"(_0000 ... _{in_channels - 1:04d}), got {len(channels)}")
    for volume, name in zip(channels, names, strict=True):
        if volume.array.ndim != 3:
            raise InputError(f"{name}: expected a 3D volume, got shape {volume.array.shape}")
        if not np.isfinite(volume.array).all():
            raise InputError(f"{name}: image holds NaN or infinite intensities")
    for volume, name in zip(channels[1:], names[1:], strict=True):
        check_same_geometry(channels[0], volume, names[0], name)
    return names


def resolve_lesion_model_dir(path: str | Path) -> Path:
    """A lesion model folder: ``path`` itself when it holds ``config.json``, else ``path/best``.

    Raises:
      InputError: neither holds a lesion model (``config.json`` with a ``lesion`` section).
    """
    from irisseg.models.folder import resolve_run_model

    return resolve_run_model(path, "lesion", "lesion", "irisseg lesion train")


class LesionPredictor:
    """Whole-volume lesion segmentation with a trained residual U-Net.

    Arguments:
      model_dir (str | Path): a model folder (``config.json`` + ``model.safetensors``) or a run folder
        (its ``best/`` is used).
      device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
      precision (str): ``auto`` (bf16 autocast on CUDA and on CPUs with native bf16, i.e. AMX; float32
        elsewhere), ``fp32`` or ``bf16`` (see :func:`sliding_window_logits`).
      overlap (float | None): sliding-window overlap (default: the training config's).
      threshold (float | None): probability threshold (default: the training config's, 0.5).
      sw_batch_size (int): windows per forward pass.
      tta (bool): mirror test-time augmentation, as nnU-Net predicts by default: the volume is also
        predicted flipped along every combination of the three axes (8 passes, 8x the time) and the
        probabilities are averaged after flipping back.

    Attributes:
      in_channels (int): image channels the model expects, in dataset channel order.
      patch (tuple[int, int, int]): sliding-window size (the training patch), voxels of the model grid.
      target_spacing (tuple[float, float, float] | None): the voxel size (mm, x, y, z) inputs are resampled to
        before the network sees them (the training ``target_spacing``), or None: the input's own grid.
      seconds (float): wall time of the last prediction.
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu", overlap: float | None = None,
                 threshold: float | None = None, sw_batch_size: int = 4, tta: bool = False,
                 precision: str = "auto"):
        from irisseg.incontext import resolve_device
        from irisseg.models.unet import ResidualUNet

        self.folder = resolve_lesion_model_dir(model_dir)
        self.device = resolve_device(device)
        self.precision = check_precision(precision)
        self.model = ResidualUNet.load(self.folder).to(self.device).eval()
        info = json.loads((self.folder / "config.json").read_text())["extra"]["lesion"]
        self.in_channels = int(self.model.config.in_channels)
        self.patch = tuple(int(p) for p in info["patch"])
        self.overlap = float(info.get("overlap", 0.5) if overlap is None else overlap)
        self.threshold = float(info.get("threshold", 0.5) if threshold is None else threshold)
        if not 0.0 <= self.overlap < 1.0:
            raise InputError(f"overlap must be in [0, 1), got {self.overlap}")
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"threshold must be between 0 and 1 (exclusive), got {self.threshold}")
        self.sw_batch_size = int(sw_batch_size)
        self.tta = bool(tta)
        self.reorient = bool(info.get("reorient", False))  # models trained before it existed: voxel grid as stored
        # models trained before the choice existed stored a description of clip_zscore here
        self.normalization = info["normalization"] if info.get("normalization") in NORMALIZATIONS else "clip_zscore"
        spacing = info.get("target_spacing")  # mm (x, y, z), or None: the input's own voxel grid
        self.target_spacing = tuple(float(v) for v in spacing) if spacing else None
        self.seconds = 0.0

    def predict_probabilities(self, channels: Sequence[Volume], names: Sequence[str] | None = None) -> Volume:
        """Lesion probability of every voxel.

        Arguments:
          channels (Sequence[Volume]): the C image channels of one case, each (D, H, W), same geometry.
          names (Sequence[str] | None): how to name each channel in error messages (e.g. file names).

        Returns:
          Volume: float32 (D, H, W) in [0, 1], in exactly the first channel's geometry.

        Raises:
          InputError: wrong channel count, non-3D input, NaN intensities, channels of different geometry.
        """
        check_channels(channels, self.in_channels, names)
        t0 = time.perf_counter()
        from irisseg.incontext import MIRROR_AXES

        arrays, back = canonical_arrays(channels, self.reorient, self.target_spacing)  # as in training
        image = torch.from_numpy(normalize_channels(arrays, normalization=self.normalization))[None]
        prob = torch.zeros(image.shape[2:])
        passes = MIRROR_AXES if self.tta else ((),)
        for axes in passes:
            flipped = image.flip(axes) if axes else image
            logits = sliding_window_logits(self.model, flipped, self.patch, self.overlap, self.sw_batch_size,
                                           self.device, self.precision)[0, 0]
            prob += torch.sigmoid(logits.flip(axes) if axes else logits)
        prob = (prob / len(passes)).numpy().astype(np.float32)
        prob = np.clip(back(prob), 0.0, 1.0)  # to the input's own grid (linear where resampled)
        self.seconds = time.perf_counter() - t0
        return channels[0].with_array(prob)

    def predict(self, channels: Sequence[Volume], names: Sequence[str] | None = None) -> Volume:
        """Binary lesion mask: uint8 (D, H, W), 1 where the probability exceeds the threshold, in the input's geometry."""
        return self.to_mask(self.predict_probabilities(channels, names))

    def to_mask(self, probabilities: Volume) -> Volume:
        """uint8 {0, 1} mask of a :meth:`predict_probabilities` output: 1 above the threshold, same geometry."""
        return probabilities.with_array((probabilities.array > self.threshold).astype(np.uint8))


def evaluate_dataset(predictor: LesionPredictor, data: str | Path, case_ids: Sequence[str] | None = None) -> list[dict]:
    """Predict and score every labelled case of a dataset folder.

    Arguments:
      predictor (LesionPredictor): the model.
      data (str | Path): nnU-Net-style dataset folder; its training cases (``imagesTr`` + ``labelsTr``) and
        its test cases that have a label (``imagesTs`` + ``labelsTs``) are evaluated.
      case_ids (Sequence[str] | None): only these cases (e.g. a run's validation split), in dataset order.

    Returns:
      list[dict]: per case ``case`` (id), the :func:`case_metrics` values and ``seconds`` (prediction time).

    Raises:
      InputError: an unreadable dataset or case, a channel count the model does not take, no labelled case.
    """
    from irisseg.data.datasets import load_dataset

    dataset = load_dataset(data)
    cases = [c for c in [*dataset.cases, *dataset.test_cases] if c.label_path is not None]
    if case_ids is not None:
        missing = sorted(set(case_ids) - {c.case_id for c in cases})
        if missing:
            raise InputError(f"{data}: no labelled case {missing[0]!r} (of {len(missing)} requested but missing)")
        cases = [c for c in cases if c.case_id in set(case_ids)]
    if not cases:
        raise InputError(f"{data}: no labelled case to evaluate (labelsTr / labelsTs)")
    rows = []
    for case in cases:
        channels, label = case.load()
        pred = predictor.predict(channels, names=[str(p) for p in case.image_paths])
        rows.append({"case": case.case_id, **case_metrics(pred.array, label.array, channels[0].spacing_zyx),
                     "seconds": predictor.seconds})
    return rows


def metric_summary(rows: Sequence[dict]) -> dict[str, float]:
    """One number per metric over cases, as validation reports it: the mean of each of :data:`METRIC_KEYS`,
    except HD95 (mm), the median (inf for a case with an empty prediction; the median stays finite unless
    most cases are).

    Arguments:
      rows (Sequence[dict]): per-case :func:`case_metrics` values (other keys are ignored).

    Returns:
      dict[str, float]: metric name -> summary.
    """
    return {k: float((np.median if k == "hd95" else np.mean)(np.array([r[k] for r in rows], float)))
            for k in METRIC_KEYS}


def summary_rows(rows: list[dict]) -> list[dict]:
    """``mean`` and ``median`` rows over cases of :func:`evaluate_dataset` rows (HD95: over finite values)."""
    out = []
    for name, fn in (("mean", np.mean), ("median", np.median)):
        row: dict = {"case": name}
        for k in rows[0]:
            if k == "case":
                continue
            values = np.array([r[k] for r in rows], float)
            finite = values[np.isfinite(values)]
            row[k] = float(fn(finite)) if finite.size else float("inf")
        out.append(row)
    return out
