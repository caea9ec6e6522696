"""Segmentation metrics: overlap, surface distances, lesion-wise detection, per-label evaluation.

Conventions shared by every function here:

* Masks are numpy arrays (or torch tensors, moved to the CPU) of shape ``(D, H, W)``; any number of
  dimensions >= 1 works. ``pred`` and ``ref`` must have the same shape. Binary functions treat every
  nonzero value as foreground (bool, int or float input). :func:`evaluate` takes integer label maps.
* ``spacing`` is the voxel size in **mm** in **array-axis order** (``(dz, dy, dx)`` for a ``(D, H, W)``
  array), as MONAI expects; note that SimpleITK reports spacing in the reverse ``(x, y, z)`` order
  (``irisseg.io.Volume.spacing_zyx`` gives the right one). ``None`` means 1 mm along every axis; a single
  number means that size along every axis. Distances are returned in mm, volumes in ml (1 ml = 1000 mm^3).
* Surface distances follow MONAI (``monai.metrics``, ``use_subvoxels=False``) so that the numbers agree
  with it: the surface of a mask is ``mask XOR binary_erosion(mask)`` with scipy's default structuring
  element (face connectivity) and everything outside the array counted as background, so a mask touching
  the array border has surface voxels on that border. Distances are exact Euclidean distances in mm
  between surface-voxel centres. HD95 is the larger of the two directed 95th percentiles (linear
  interpolation); ASSD is the mean of both directed distance sets pooled together (not the mean of the two
  directed means); surface Dice counts the surface voxels of both masks lying within the tolerance of the
  other surface, over all surface voxels.

Empty masks give defined values instead of NaN (MONAI gives NaN or inf with a warning):

=====================================  =================  ========================
metric                                 both masks empty   exactly one mask empty
=====================================  =================  ========================
dice, iou, precision, recall           1                  0
hd95, assd (mm)                        0                  inf
surface_dice                           1                  0
lesion recall / precision / F1         1                  0
=====================================  =================  ========================

For lesions, "exactly one empty" covers both cases: an empty prediction with reference lesions gives
lesion recall 0 (no lesion found) and lesion precision 0 (by convention; there is no predicted component
to be right), and predicted components without any reference lesion give precision 0 and recall 0
(by convention; nothing could be found). Lesion F1 is then 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from irisseg.errors import InputError

__all__ = [
    "dice",
    "iou",
    "precision",
    "recall",
    "hd95",
    "assd",
    "surface_dice",
    "LesionDetection",
    "lesion_detection",
    "evaluate",
    "summarize",
]

_MM3_PER_ML = 1000.0


# --------------------------------------------------------------------------------------------------------
# input handling


def _to_numpy(x) -> np.ndarray:
    """A numpy view of an array-like or a torch tensor (detached and moved to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as numpy arrays of the same shape (not yet binarised)."""
    pred, ref = _to_numpy(pred), _to_numpy(ref)
    if pred.shape != ref.shape:
        raise InputError(f"pred and ref must have the same shape, got {pred.shape} and {ref.shape}")
    if pred.ndim == 0:
        raise InputError("pred and ref must be arrays with at least one dimension, got scalars")
    return pred, ref


def _binary_pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as boolean arrays (nonzero = foreground) of the same shape."""
    pred, ref = _check_pair(pred, ref)
    return pred != 0, ref != 0


def _spacing(spacing, ndim: int) -> np.ndarray:
    """Voxel size in mm per array axis as a float array of length ``ndim``."""
    if spacing is None:
        return np.ones(ndim)
    values = np.asarray(_to_numpy(spacing), dtype=float).reshape(-1)
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.size != ndim:
        raise InputError(f"spacing must have {ndim} values (one per array axis), got {values.size}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise InputError(f"spacing must be positive and finite (mm), got {tuple(values.tolist())}")
    return values


def _voxel_ml(spacing: np.ndarray) -> float:
    return float(np.prod(spacing)) / _MM3_PER_ML


def _ratio(numerator: int, denominator: int, both_empty: bool) -> float:
    """``numerator / denominator`` with the module's empty-mask convention for a zero denominator."""
    if both_empty:
        return 1.0
    return numerator / denominator if denominator else 0.0


# --------------------------------------------------------------------------------------------------------
# overlap metrics


def _overlap_counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int]:
    """(true-positive voxels, pred voxels, ref voxels) of two boolean masks."""
    return int(np.count_nonzero(pred & ref)), int(np.count_nonzero(pred)), int(np.count_nonzero(ref))


def _overlap_metrics(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    tp, n_pred, n_ref = _overlap_counts(pred, ref)
    both_empty = n_pred == 0 and n_ref == 0
    return {
        "dice": _ratio(2 * tp, n_pred + n_ref, both_empty),
        "iou": _ratio(tp, n_pred + n_ref - tp, both_empty),
        "precision": _ratio(tp, n_pred, both_empty),
        "recall": _ratio(tp, n_ref, both_empty),
    }


def dice(pred, ref) -> float:
    """Dice coefficient ``2 |P & R| / (|P| + |R|)`` of two binary masks.

    Arguments:
      pred (np.ndarray | torch.Tensor): predicted mask, shape (D, H, W) (any ndim), nonzero = foreground.
      ref (np.ndarray | torch.Tensor): reference mask, same shape as ``pred``.

    Returns:
      float: in [0, 1]; 1 when both masks are empty, 0 when exactly one is.
    """
    return _overlap_metrics(*_binary_pair(pred, ref))["dice"]


def iou(pred, ref) -> float:
    """Intersection over union (Jaccard index) ``|P & R| / |P | R|`` of two binary masks.

    Arguments:
      pred (np.ndarray | torch.Tensor): predicted mask, shape (D, H, W) (any ndim), nonzero = foreground.
      ref (np.ndarray | torch.Tensor): reference mask, same shape as ``pred``.

    Returns:
      float: in [0, 1]; 1 when both masks are empty, 0 when exactly one is.
    """
    return _overlap_metrics(*_binary_pair(pred, ref))["iou"]


def precision(pred, ref) -> float:
    """Voxel-wise precision (positive predictive value) ``|P & R| / |P|``.

    Arguments:
      pred (np.ndarray | torch.Tensor): predicted mask, shape (D, H, W) (any ndim), nonzero = foreground.
      ref (np.ndarray | torch.Tensor): reference mask, same shape as ``pred``.

    Returns:
      float: in [0, 1]; 1 when both masks are empty, 0 when exactly one is.
    """
    return _overlap_metrics(*_binary_pair(pred, ref))["precision"]


def recall(pred, ref) -> float:
    """Voxel-wise recall (sensitivity) ``|P & R| / |R|``.

    Arguments:
      pred (np.ndarray | torch.Tensor): predicted mask, shape (D, H, W) (any ndim), nonzero = foreground.
      ref (np.ndarray | torch.Tensor): reference mask, same shape as ``pred``.

    Returns:
      float: in [0, 1]; 1 when both masks are empty, 0 when exactly one is.
    """
    return _overlap_metrics(*_binary_pair(pred, ref))["recall"]


# --------------------------------------------------------------------------------------------------------
# surface distances


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the bounding box of their union plus one voxel, clipped to the array.

    Cropping changes no surface and no distance: the one-voxel margin is background, which is what the
    erosion assumes outside the array, and where the box is clipped at the array border the full-size
    erosion assumes background there too. Distances are between surface voxels, all inside the box.
    """
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        other_axes = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(np.any(union, axis=other_axes))
        box.append(slice(max(int(hits[0]) - 1, 0), int(hits[-1]) + 2))
    return pred[tuple(box)], ref[tuple(box)]


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a boolean mask: ``mask XOR binary_erosion(mask)`` (outside the array = background)."""
    return mask ^ ndimage.binary_erosion(mask)


def _surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm between two boolean masks, at least one of them non-empty.

    Returns ``(pred_to_ref, ref_to_pred)``: for every surface voxel of ``pred`` the distance to the nearest
    surface voxel of ``ref``, and vice versa (float64, mm). If one mask is empty, the distances from the
    other mask's surface are all ``inf`` and the array from the empty mask is empty.
    """
    pred, ref = _crop_to_union(pred, ref)
    surf_pred, surf_ref = _surface(pred), _surface(ref)
    if not surf_pred.any() or not surf_ref.any():
        inf_pred = np.full(int(np.count_nonzero(surf_pred)), np.inf)
        inf_ref = np.full(int(np.count_nonzero(surf_ref)), np.inf)
        return inf_pred, inf_ref
    to_ref = ndimage.distance_transform_edt(~surf_ref, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)
    return to_ref[surf_pred], to_pred[surf_ref]


def _hd95_from(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray) -> float:
    """Larger of the two directed 95th percentiles (linear interpolation), as MONAI does."""
    if pred_to_ref.size == 0 or ref_to_pred.size == 0:
        return np.inf
    return float(max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95)))


def _assd_from(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray) -> float:
    """Mean of both directed distance sets pooled (weighted by surface size), as MONAI does."""
    if pred_to_ref.size == 0 or ref_to_pred.size == 0:
        return np.inf
    return float(np.concatenate([pred_to_ref, ref_to_pred]).mean())


def _surface_dice_from(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray, tolerance_mm: float) -> float:
    """Fraction of all surface voxels within ``tolerance_mm`` of the other surface.

    Compared in float32, as MONAI does, so that a distance equal to the tolerance in exact arithmetic
    counts as within it whatever the float64 rounding (e.g. 3 x 0.1 mm against a 0.3 mm tolerance).
    """
    if pred_to_ref.size == 0 or ref_to_pred.size == 0:
        return 0.0
    tol = np.float32(tolerance_mm)
    within = np.count_nonzero(pred_to_ref.astype(np.float32) <= tol) + np.count_nonzero(
        ref_to_pred.astype(np.float32) <= tol
    )
    return float(within / (pred_to_ref.size + ref_to_pred.size))


def _check_tolerance(tolerance_mm: float) -> float:
    tolerance_mm = float(tolerance_mm)
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise InputError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm}")
    return tolerance_mm


def _surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray, tolerance_mm: float
) -> dict[str, float]:
    """hd95, assd and surface_dice of two boolean masks, from one pair of distance computations."""
    if not pred.any() and not ref.any():
        return {"hd95": 0.0, "assd": 0.0, "surface_dice": 1.0}
    distances = _surface_distances(pred, ref, spacing)
    return {
        "hd95": _hd95_from(*distances),
        "assd": _assd_from(*distances),
        "surface_dice": _surface_dice_from(*distances, tolerance_mm),
    }


def _binary_pair_and_spacing(pred, ref, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred, ref = _binary_pair(pred, ref)
    return pred, ref, _spacing(spacing, pred.ndim)


def hd95(pred, ref, spacing=None) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two binary masks (MONAI's).

    Arguments:
      pred (np.ndarray | torch.Tensor): predicted mask, shape (D, H, W) (any ndim), nonzero = foreground.
      ref (np.ndarray | torch.Tensor): reference mask, same shape as ``pred``.
      spacing (Sequence[float] | float | None): voxel size in mm in array-axis order, e.g. (dz, dy, dx);
        None = 1 mm isotropic.

    Returns:
      float: max of the 95th percentiles of the pred->ref and ref->pred surface distances, in mm;
        0 when both masks are empty, inf when exactly one is.
    """
    pred, ref, spacing = _binary_pair_and_spacing(pred, ref, spacing)
    return _surface_metrics(pred, ref, spacing, 0.0)["hd95"]


def assd(pred, ref, spacing=None) -> float:
    """Average symmetric surface distance (MONAI's ``compute_average_surface_distance(symmetric=True)``).

    Arguments:
      pred (np.ndarray | torch.Tensor): predicted mask, shape (D, H, W) (any ndim), nonzero = foreground.
      ref (np.ndarray | torch.Tensor): reference mask, same shape as ``pred``.
      spacing (Sequence[float] | float | None): voxel size in mm in array-axis order, e.g. (dz, dy, dx);
        None = 1 mm isotropic.

    Returns:
      float: mean over all surface voxels of both masks of the distance to the other surface, in mm;
        0 when both masks are empty, inf when exactly one is.
    """
    pred, ref, spacing = _binary_pair_and_spacing(pred, ref, spacing)
    return _surface_metrics(pred, ref, spacing, 0.0)["assd"]


def surface_dice(pred, ref, spacing=None, tolerance_mm=1.0) -> float:
    """Normalised surface Dice at a tolerance (MONAI's ``compute_surface_dice``, ``use_subvoxels=False``).

    Arguments:
      pred (np.ndarray | torch.Tensor): predicted mask, shape (D, H, W) (any ndim), nonzero = foreground.
      ref (np.ndarray | torch.Tensor): reference mask, same shape as ``pred``.
      spacing (Sequence[float] | float | None): voxel size in mm in array-axis order, e.g. (dz, dy, dx);
        None = 1 mm isotropic.
      tolerance_mm (float): largest distance in mm (inclusive) at which a surface voxel counts as correct.

    Returns:
      float: in [0, 1], (surface voxels of pred within tolerance of ref's surface + those of ref within
        tolerance of pred's) / (all surface voxels of both); 1 when both masks are empty, 0 when exactly
        one is.
    """
    tolerance_mm = _check_tolerance(tolerance_mm)
    pred, ref, spacing = _binary_pair_and_spacing(pred, ref, spacing)
    return _surface_metrics(pred, ref, spacing, tolerance_mm)["surface_dice"]


# --------------------------------------------------------------------------------------------------------
# lesion-wise detection


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise detection counts and rates (see :func:`lesion_detection`).

    Arguments:
      n_ref (int): connected components (lesions) in the reference.
      n_pred (int): connected components in the prediction.
      n_detected (int): reference lesions found by the prediction.
      n_true_positive_pred (int): predicted components that hit a reference lesion.
      lesion_recall (float): n_detected / n_ref (empty-mask conventions in the module docstring).
      lesion_precision (float): n_true_positive_pred / n_pred.
      lesion_f1 (float): harmonic mean of lesion_recall and lesion_precision (0 when both are 0).
      ref_volumes_ml (tuple[float, ...]): volume in ml of each reference lesion, in scipy's labelling
        order (raster order of each lesion's first voxel).
      ref_detected (tuple[bool, ...]): whether each reference lesion was detected, same order.
    """

    n_ref: int
    n_pred: int
    n_detected: int
    n_true_positive_pred: int
    lesion_recall: float
    lesion_precision: float
    lesion_f1: float
    ref_volumes_ml: tuple[float, ...]
    ref_detected: tuple[bool, ...]

    def as_dict(self) -> dict:
        """All fields as a plain dict (tuples become lists, so it serialises to JSON as is)."""
        out = asdict(self)
        out["ref_volumes_ml"] = list(self.ref_volumes_ml)
        out["ref_detected"] = list(self.ref_detected)
        return out


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components with full connectivity (26-connectivity in 3D)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labels, n = ndimage.label(mask, structure=structure)
    return labels, int(n)


def _hit_components(labels: np.ndarray, n: int, other: np.ndarray, min_overlap: float) -> np.ndarray:
    """Per component (1..n): whether the fraction of its voxels inside ``other`` is > 0 and >= min_overlap."""
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    covered = np.bincount(labels[other], minlength=n + 1)[1:]
    return (covered > 0) & (covered / np.maximum(sizes, 1) >= min_overlap)


def _check_min_overlap(min_overlap: float) -> float:
    min_overlap = float(min_overlap)
    if not 0.0 <= min_overlap <= 1.0:
        raise InputError(f"min_overlap must be between 0 and 1, got {min_overlap}")
    return min_overlap


def _lesion_detection(
    pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray, min_overlap: float
) -> LesionDetection:
    ref_labels, n_ref = _components(ref)
    pred_labels, n_pred = _components(pred)
    ref_hit = _hit_components(ref_labels, n_ref, pred, min_overlap)
    n_detected = int(np.count_nonzero(ref_hit))
    n_tp_pred = int(np.count_nonzero(_hit_components(pred_labels, n_pred, ref, min_overlap)))
    both_empty = n_ref == 0 and n_pred == 0
    lesion_recall = _ratio(n_detected, n_ref, both_empty)
    lesion_precision = _ratio(n_tp_pred, n_pred, both_empty)
    denominator = lesion_recall + lesion_precision
    lesion_f1 = 2 * lesion_recall * lesion_precision / denominator if denominator else 0.0
    ref_voxels = np.bincount(ref_labels.ravel(), minlength=n_ref + 1)[1:]
    return LesionDetection(
        n_ref=n_ref,
        n_pred=n_pred,
        n_detected=n_detected,
        n_true_positive_pred=n_tp_pred,
        lesion_recall=lesion_recall,
        lesion_precision=lesion_precision,
        lesion_f1=lesion_f1,
        ref_volumes_ml=tuple(float(v) * _voxel_ml(spacing) for v in ref_voxels),
        ref_detected=tuple(bool(h) for h in ref_hit),
    )


def lesion_detection(pred, ref, spacing=None, min_overlap=0.0) -> LesionDetection:
    """Lesion-wise detection from connected components (26-connectivity in 3D: faces, edges and corners).

    A reference lesion is detected when the fraction of its voxels covered by the prediction is > 0 and
    >= ``min_overlap``; a predicted component is a true positive when the fraction of its voxels inside
    the reference is > 0 and >= ``min_overlap``. Counting both sides separately means one predicted
    component spanning two lesions detects both, and two predicted pieces of one lesion are both true
    positives.

    Arguments:
      pred (np.ndarray | torch.Tensor): predicted mask, shape (D, H, W) (any ndim), nonzero = foreground.
      ref (np.ndarray | torch.Tensor): reference mask, same shape as ``pred``.
      spacing (Sequence[float] | float | None): voxel size in mm in array-axis order, e.g. (dz, dy, dx);
        None = 1 mm isotropic. Only used for the lesion volumes.
      min_overlap (float): in [0, 1], the covered fraction a component needs; 0 = any overlap.

    Returns:
      LesionDetection: counts, lesion recall / precision / F1 (1 when both masks are empty, 0 when exactly
        one is) and per-reference-lesion volumes in ml.
    """
    min_overlap = _check_min_overlap(min_overlap)
    pred, ref, spacing = _binary_pair_and_spacing(pred, ref, spacing)
    return _lesion_detection(pred, ref, spacing, min_overlap)


# --------------------------------------------------------------------------------------------------------
# per-label evaluation and summaries


def _labels(pred: np.ndarray, ref: np.ndarray, labels: Iterable[int] | None) -> list[int]:
    if labels is None:
        found = np.union1d(np.unique(pred), np.unique(ref))
        if found.dtype.kind in "fc" and not np.all(found == np.floor(found.real)):
            raise InputError("pred and ref must be integer label maps, found non-integer values")
        return [int(v) for v in found if v != 0]
    out = []
    for value in labels:
        if float(value) != int(value):
            raise InputError(f"labels must be integers, got {value}")
        out.append(int(value))
    return out


def evaluate(
    pred, ref, spacing=None, labels=None, tolerance_mm=1.0, lesion_wise=False
) -> dict[int, dict[str, float]]:
    """All metrics, per label, of a predicted label map against a reference label map.

    Arguments:
      pred (np.ndarray | torch.Tensor): predicted integer label map, shape (D, H, W) (any ndim).
      ref (np.ndarray | torch.Tensor): reference integer label map, same shape as ``pred``.
      spacing (Sequence[float] | float | None): voxel size in mm in array-axis order, e.g. (dz, dy, dx);
        None = 1 mm isotropic.
      labels (Iterable[int] | None): labels to evaluate (each as the binary mask ``map == label``);
        default: every nonzero label present in pred or ref, sorted. A requested label absent from both
        gets the both-empty values.
      tolerance_mm (float): tolerance in mm of the surface Dice.
      lesion_wise (bool): also compute lesion detection per label (:func:`lesion_detection` with
        ``min_overlap=0``).

    Returns:
      dict[int, dict[str, float]]: ``{label: metrics}`` in label order, metrics with keys ``dice``,
        ``iou``, ``precision``, ``recall``, ``hd95`` (mm), ``assd`` (mm), ``surface_dice``,
        ``pred_voxels``, ``ref_voxels`` (int), ``pred_volume_ml``, ``ref_volume_ml``, and with
        ``lesion_wise`` also ``lesion_n_ref``, ``lesion_n_pred``, ``lesion_n_detected``,
        ``lesion_n_true_positive_pred`` (int), ``lesion_recall``, ``lesion_precision``, ``lesion_f1``.
    """
    tolerance_mm = _check_tolerance(tolerance_mm)
    pred, ref = _check_pair(pred, ref)
    spacing = _spacing(spacing, pred.ndim)
    voxel_ml = _voxel_ml(spacing)
    results: dict[int, dict[str, float]] = {}
    for label in _labels(pred, ref, labels):
        pred_mask, ref_mask = pred == label, ref == label
        metrics = _overlap_metrics(pred_mask, ref_mask)
        metrics.update(_surface_metrics(pred_mask, ref_mask, spacing, tolerance_mm))
        n_pred, n_ref = int(np.count_nonzero(pred_mask)), int(np.count_nonzero(ref_mask))
        metrics.update(
            pred_voxels=n_pred,
            ref_voxels=n_ref,
            pred_volume_ml=n_pred * voxel_ml,
            ref_volume_ml=n_ref * voxel_ml,
        )
        if lesion_wise:
            lesions = _lesion_detection(pred_mask, ref_mask, spacing, 0.0)
            metrics.update(
                lesion_n_ref=lesions.n_ref,
                lesion_n_pred=lesions.n_pred,
                lesion_n_detected=lesions.n_detected,
                lesion_n_true_positive_pred=lesions.n_true_positive_pred,
                lesion_recall=lesions.lesion_recall,
                lesion_precision=lesions.lesion_precision,
                lesion_f1=lesions.lesion_f1,
            )
        results[label] = metrics
    return results


def summarize(results: Sequence[Mapping[int, Mapping[str, float]]]) -> dict[int, dict[str, dict[str, float]]]:
    """Summary statistics over cases of :func:`evaluate` outputs, per label and metric.

    Infinite values (hd95 / assd when exactly one mask is empty) are kept, not dropped: the mean of a
    metric with any inf value is inf, the median is inf when at least half are, and ``n_inf`` counts them.
    A label is summarised over the cases whose result contains it (with the default ``labels`` of
    :func:`evaluate`, the cases where it is present in pred or ref); ``n`` says how many.

    Arguments:
      results (Sequence[Mapping[int, Mapping[str, float]]]): one :func:`evaluate` result per case.

    Returns:
      dict[int, dict[str, dict[str, float]]]: ``{label: {metric: {"mean", "median", "n", "n_inf"}}}``,
        labels sorted, metrics in the order they first appear.
    """
    values: dict[int, dict[str, list[float]]] = {}
    for case in results:
        for label, metrics in case.items():
            per_metric = values.setdefault(int(label), {})
            for name, value in metrics.items():
                per_metric.setdefault(name, []).append(float(value))
    summary: dict[int, dict[str, dict[str, float]]] = {}
    for label in sorted(values):
        summary[label] = {}
        for name, series in values[label].items():
            arr = np.asarray(series, dtype=float)
            summary[label][name] = {
                "mean": float(np.mean(arr)),
                "median": float(np.median(arr)),
                "n": int(arr.size),
                "n_inf": int(np.count_nonzero(np.isinf(arr))),
            }
    return summary
