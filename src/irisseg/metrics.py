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

The retrieval and multi-label classification metrics at the end of the file (:func:`rank_by_similarity`,
:func:`retrieval_metrics`, :func:`classification_f1`) work on per-case label vectors and embeddings, not
masks; their conventions are stated in their docstrings.
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
    "lesion_components",
    "evaluate",
    "summarize",
    "rank_by_similarity",
    "retrieval_metrics",
    "classification_f1",
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


def lesion_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The lesions of a mask as :func:`lesion_detection` counts them: connected components with full
    connectivity (26-connectivity in 3D).

    Arguments:
      mask (np.ndarray): (D, H, W) (or any-dimensional) mask; non-zero = lesion.

    Returns:
      tuple[np.ndarray, int]: int32 component map of the mask's shape (0 outside, ``1..n`` on the lesions)
      and ``n``.
    """
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
    ref_labels, n_ref = lesion_components(ref)
    pred_labels, n_pred = lesion_components(pred)
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


# ========================================================================================================
# retrieval and multi-label classification metrics
#
# These work on case-level labels, not masks. Every case carries a binary label vector (n_classes,)
# (multi-label: any number of positives, including none). A query q and a gallery item g are *relevant*
# to each other when they share at least one positive label; their graded relevance is the Jaccard index
# of the label vectors, |q AND g| / |q OR g| (0 when both are empty).


def _binary_matrix(x, name: str) -> np.ndarray:
    """A 2-D array of 0/1 (bool, int or float) values as a bool array, checked."""
    arr = _to_numpy(x)
    if arr.ndim != 2:
        raise InputError(f"{name} must be a 2-D (n, n_classes) array, got shape {arr.shape}")
    if arr.dtype != bool:
        if arr.dtype.kind not in "biuf" or not np.all((arr == 0) | (arr == 1)):
            raise InputError(f"{name} must be binary (0/1 or bool), found other values")
        arr = arr != 0
    return arr


def _label_pair(query_labels, gallery_labels) -> tuple[np.ndarray, np.ndarray]:
    q = _binary_matrix(query_labels, "query_labels")
    g = _binary_matrix(gallery_labels, "gallery_labels")
    if q.shape[1] != g.shape[1]:
        raise InputError(f"query_labels and gallery_labels must have the same number of classes, "
                         f"got {q.shape[1]} and {g.shape[1]}")
    return q, g


def _label_jaccard(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """(Q, G) Jaccard index of bool label vectors (0 where both are empty), float64."""
    qf, gf = q.astype(np.float64), g.astype(np.float64)
    inter = qf @ gf.T
    union = qf.sum(1)[:, None] + gf.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _excluded_index(exclude_self, n_query: int, n_gallery: int) -> np.ndarray:
    """(Q,) int64: the gallery index each query must not be matched with, -1 for none."""
    if exclude_self is None or isinstance(exclude_self, (bool, np.bool_)):
        if not exclude_self:
            return np.full(n_query, -1, dtype=np.int64)
        if n_query != n_gallery:
            raise InputError(f"exclude_self=True needs the queries to be the gallery itself (query i = "
                             f"gallery item i), got {n_query} queries and {n_gallery} gallery items")
        return np.arange(n_query, dtype=np.int64)
    idx = _to_numpy(exclude_self)
    if idx.shape != (n_query,) or idx.dtype.kind not in "iu":
        raise InputError(f"exclude_self must be a bool or an integer array of shape ({n_query},) (one "
                         f"gallery index per query, -1 for none), got {idx.dtype} array of shape {idx.shape}")
    idx = idx.astype(np.int64)
    if np.any((idx < -1) | (idx >= n_gallery)):
        raise InputError(f"exclude_self indices must be in [-1, {n_gallery - 1}] "
                         f"(gallery indices, -1 = none)")
    return idx


def rank_by_similarity(query_emb, gallery_emb, k: int, exclude_self=False) -> np.ndarray:
    """The k gallery items of largest inner product with each query, best first (exact, brute force).

    With L2-normalised embeddings (as :class:`irisseg.models.embedding.EmbeddingNet` returns) the inner
    product is the cosine similarity. Scores are computed in float64; ties are broken by the smaller
    gallery index, so the result is deterministic. The cost is O(Q * G * (E + log G)) time and
    O(G) memory per query row (queries go in chunks): meant for evaluation sets, not for large indexes.

    Arguments:
      query_emb (np.ndarray | torch.Tensor): (Q, E) query embeddings.
      gallery_emb (np.ndarray | torch.Tensor): (G, E) gallery embeddings.
      k (int): items to return per query, 1 <= k <= G (G - 1 when any query excludes an item).
      exclude_self (bool | np.ndarray): False: nothing excluded. True: leave-one-out on one set, query i
        is gallery item i (needs Q == G) and is never returned for itself. A (Q,) integer array: the
        gallery index to leave out for each query, -1 for none.

    Returns:
      np.ndarray: (Q, k) int64 gallery indices, best first, distinct within a row, never the excluded
        item; pass it to :func:`retrieval_metrics` with the same ``exclude_self``.

    Raises:
      InputError: wrong shapes, non-finite embeddings, a bad ``exclude_self``, or ``k`` out of range.
    """
    q = np.asarray(_to_numpy(query_emb), dtype=np.float64)
    g = np.asarray(_to_numpy(gallery_emb), dtype=np.float64)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise InputError(f"query_emb and gallery_emb must be (Q, E) and (G, E) arrays with the same E, "
                         f"got shapes {q.shape} and {g.shape}")
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(g))):
        raise InputError("query_emb and gallery_emb must be finite (found NaN or inf)")
    excluded = _excluded_index(exclude_self, q.shape[0], g.shape[0])
    available = g.shape[0] - (1 if np.any(excluded >= 0) else 0)
    if int(k) != k or not 1 <= k <= available:
        raise InputError(f"k must be an integer between 1 and {available} (the gallery items a query can "
                         f"be matched with), got {k}")
    k = int(k)
    ranking = np.empty((q.shape[0], k), dtype=np.int64)
    chunk = max(1, (1 << 22) // max(g.shape[0], 1))
    for start in range(0, q.shape[0], chunk):
        rows = slice(start, start + chunk)
        scores = q[rows] @ g.T
        ex = excluded[rows]
        has = np.flatnonzero(ex >= 0)
        scores[has, ex[has]] = -np.inf
        # stable sort of the negated scores: descending score, ties by ascending gallery index
        ranking[rows] = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ranking


def _check_ks(ks) -> tuple[int, ...]:
    values = tuple(ks) if isinstance(ks, Iterable) else (ks,)
    if not values:
        raise InputError("ks must hold at least one cutoff")
    out = []
    for k in values:
        if float(k) != int(k) or int(k) < 1:
            raise InputError(f"every cutoff in ks must be a positive integer, got {k}")
        out.append(int(k))
    return tuple(dict.fromkeys(out))


def _check_ranking(ranking, n_query: int, n_gallery: int, k_max: int, excluded: np.ndarray) -> np.ndarray:
    """The first ``k_max`` columns of a (Q, >= k_max) ranking as int64, checked."""
    r = _to_numpy(ranking)
    if r.ndim != 2 or r.shape[0] != n_query:
        raise InputError(f"ranking must be a ({n_query}, >= {k_max}) array (one row per query), "
                         f"got shape {r.shape}")
    if r.shape[1] < k_max:
        raise InputError(f"ranking has {r.shape[1]} columns, fewer than the largest cutoff k = {k_max}")
    if r.dtype.kind not in "iu":
        raise InputError(f"ranking must hold integer gallery indices, got dtype {r.dtype}")
    r = r[:, :k_max].astype(np.int64)
    if np.any((r < 0) | (r >= n_gallery)):
        raise InputError(f"ranking indices must be gallery indices in [0, {n_gallery - 1}]")
    if k_max > 1 and np.any(np.diff(np.sort(r, axis=1), axis=1) == 0):
        raise InputError(f"ranking rows must not repeat a gallery item within the first {k_max} columns")
    if np.any(r == excluded[:, None]):
        raise InputError("ranking contains an excluded item (the query itself): leave it out of the ranking")
    return r


def retrieval_metrics(
    query_labels, gallery_labels, ranking, ks=(1, 3, 5, 10, 20), exclude_self=False, per_query: bool = False
) -> dict:
    """Precision, recall, mean average precision and NDCG at cutoffs k of a multi-label retrieval.

    Relevance: query q and gallery item g are relevant when they share at least one positive label
    (``rel = 1``, else 0); graded relevance (the NDCG gain) is the Jaccard index of their label vectors,
    ``|q AND g| / |q OR g|`` (0 if both are empty). R is the number of gallery items relevant to the query,
    not counting the query's own excluded item (``exclude_self``). With ``rel_i`` the relevance of the
    item at rank i (i = 1 first), per query:

    * ``precision@k = (#relevant in the top k) / k``
    * ``recall@k = (#relevant in the top k) / R``
    * ``map@k`` (AP@k averaged over queries): ``AP@k = sum_{i <= k} P@i * rel_i / min(k, R)``
    * ``ndcg@k = DCG@k / IDCG@k`` with ``DCG@k = sum_{i <= k} jaccard_i / log2(i + 1)`` and IDCG@k the DCG@k
      of the best possible ordering of the whole gallery (the k largest Jaccard gains over all gallery
      items, the excluded one left out, sorted descending).

    Queries with R = 0 (no relevant item in the gallery, e.g. a case with no positive label) have
    undefined recall, AP and NDCG: they are left out of every mean, and their count is reported as
    ``n_queries_without_relevant``. If no query has a relevant item the means are NaN.

    Arguments:
      query_labels (np.ndarray | torch.Tensor): (Q, L) binary (bool or 0/1) label vectors of the queries.
      gallery_labels (np.ndarray | torch.Tensor): (G, L) binary label vectors of the gallery.
      ranking (np.ndarray | torch.Tensor): (Q, >= max(ks)) integer gallery indices, best first, distinct
        within the first max(ks) columns, without the query's own excluded item (e.g. from
        :func:`rank_by_similarity`); columns beyond max(ks) are ignored.
      ks (Iterable[int] | int): cutoffs (positive; duplicates dropped, order kept).
      exclude_self (bool | np.ndarray): which gallery item is the query itself and is left out of R and
        of the ideal ordering, as in :func:`rank_by_similarity`: False (none), True (query i is gallery
        item i, Q == G: leave-one-out evaluation of a set against itself) or a (Q,) integer array of
        gallery indices (-1 for none).
      per_query (bool): return the per-query values instead of the means.

    Returns:
      dict: with ``per_query=False``, ``{"precision@k", "recall@k", "map@k", "ndcg@k"}`` for each k in ks
        (float means over the queries with R > 0), ``"n_queries"`` (int, the queries averaged) and
        ``"n_queries_without_relevant"`` (int, the queries left out). With ``per_query=True``, the same
        metric keys with (Q,) float64 arrays (NaN for queries with R = 0) and ``"n_relevant"``, the (Q,)
        int64 array of R.

    Raises:
      InputError: non-binary or mis-shaped labels, a ranking with out-of-range, repeated or excluded
        indices or fewer than max(ks) columns, or invalid cutoffs.
    """
    q, g = _label_pair(query_labels, gallery_labels)
    ks = _check_ks(ks)
    k_max = max(ks)
    excluded = _excluded_index(exclude_self, q.shape[0], g.shape[0])
    r = _check_ranking(ranking, q.shape[0], g.shape[0], k_max, excluded)

    gains = _label_jaccard(q, g)  # (Q, G); > 0 exactly where a positive label is shared
    has = np.flatnonzero(excluded >= 0)
    gains[has, excluded[has]] = 0.0
    relevant = gains > 0
    n_relevant = relevant.sum(axis=1)
    valid = n_relevant > 0

    rows = np.arange(q.shape[0])[:, None]
    rel = relevant[rows, r].astype(np.float64)  # (Q, k_max)
    ranked_gains = gains[rows, r]
    positions = np.arange(1, k_max + 1, dtype=np.float64)
    discount = 1.0 / np.log2(positions + 1.0)
    hits = np.cumsum(rel, axis=1)
    ap_sum = np.cumsum(hits / positions * rel, axis=1)
    dcg = np.cumsum(ranked_gains * discount, axis=1)
    # the k_max largest gains of each row (the whole gallery, excluded item at 0), sorted descending
    cut = g.shape[0] - k_max
    top = np.partition(gains, cut, axis=1)[:, cut:] if cut > 0 else gains
    ideal = -np.sort(-top, axis=1)[:, :k_max]
    idcg = np.cumsum(ideal * discount, axis=1)

    safe_r = np.maximum(n_relevant, 1).astype(np.float64)
    values: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in ks:
            c = k - 1
            values[f"precision@{k}"] = hits[:, c] / k
            values[f"recall@{k}"] = hits[:, c] / safe_r
            values[f"map@{k}"] = ap_sum[:, c] / np.minimum(k, safe_r)
            values[f"ndcg@{k}"] = np.divide(dcg[:, c], idcg[:, c], out=np.zeros(len(q)), where=idcg[:, c] > 0)
    for name in values:
        values[name] = np.where(valid, values[name], np.nan)

    if per_query:
        return {**values, "n_relevant": n_relevant.astype(np.int64)}
    n_used = int(np.count_nonzero(valid))
    out: dict = {name: float(v[valid].mean()) if n_used else float("nan") for name, v in values.items()}
    out["n_queries"] = n_used
    out["n_queries_without_relevant"] = int(q.shape[0] - n_used)
    return out


def classification_f1(pred, target) -> dict:
    """Micro, macro, weighted and per-class F1 of multi-label binary predictions.

    Per class c, with TP / FP / FN counted over the N cases: ``F1_c = 2 TP / (2 TP + FP + FN)``, and 0 when
    that denominator is 0 (no predicted and no true positive: scikit-learn's ``zero_division=0``).
    ``micro_f1`` is the same formula on TP / FP / FN summed over classes (0 if all are 0); ``macro_f1`` the
    unweighted mean of ``F1_c``; ``weighted_f1`` the mean of ``F1_c`` weighted by the support (true
    positives count, ``target[:, c].sum()``), 0 when no class has support. These match
    ``sklearn.metrics.f1_score(average="micro" | "macro" | "weighted" | None, zero_division=0)``.

    Arguments:
      pred (np.ndarray | torch.Tensor): (N, L) binary (bool or 0/1) predictions, N >= 1.
      target (np.ndarray | torch.Tensor): (N, L) binary ground truth.

    Returns:
      dict: ``micro_f1``, ``macro_f1``, ``weighted_f1`` (float), ``per_class_f1`` ((L,) float64 array) and
        ``support`` ((L,) int64 array, true positives per class).

    Raises:
      InputError: non-binary values, arrays that are not 2-D, different shapes, or no cases.
    """
    p = _binary_matrix(pred, "pred")
    t = _binary_matrix(target, "target")
    if p.shape != t.shape:
        raise InputError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    if p.shape[0] == 0:
        raise InputError("pred and target must hold at least one case")
    tp = np.count_nonzero(p & t, axis=0)
    fp = np.count_nonzero(p & ~t, axis=0)
    fn = np.count_nonzero(~p & t, axis=0)
    denom = 2 * tp + fp + fn
    per_class = np.divide(2.0 * tp, denom, out=np.zeros(p.shape[1]), where=denom > 0)
    total = int(denom.sum())
    support = tp + fn
    return {
        "micro_f1": 2.0 * int(tp.sum()) / total if total else 0.0,
        "macro_f1": float(per_class.mean()) if per_class.size else 0.0,
        "weighted_f1": float(np.dot(per_class, support) / support.sum()) if support.sum() else 0.0,
        "per_class_f1": per_class,
        "support": support.astype(np.int64),
    }
