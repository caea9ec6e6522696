"""Tests of irisseg.metrics: agreement with MONAI, hand-computed values, empty-mask conventions, errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
)
from scipy import ndimage

from irisseg import metrics
from irisseg.errors import InputError

ANISO = (3.0, 0.7, 1.2)
SPACINGS = [None, ANISO, (1.0, 1.0, 1.0), (0.5, 2.0, 0.8)]
TOLERANCES = [1.0, 1.5, 2.5]
SHAPES = [(24, 32, 28), (20, 26, 30), (16, 24, 20)]
SURFACE_METRICS = ("hd95", "assd", "surface_dice")


# --------------------------------------------------------------------------------------------------------
# helpers


def blob(noise: np.ndarray, sigma: float, fraction: float) -> np.ndarray:
    """Smoothed noise thresholded so that about ``fraction`` of the voxels are foreground."""
    smooth = ndimage.gaussian_filter(noise, sigma)
    return smooth > np.quantile(smooth, 1.0 - fraction)


def random_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A reference blob mask and a perturbed prediction; sizes, shapes and smoothness vary with the seed."""
    rng = np.random.default_rng(seed)
    shape = SHAPES[seed % len(SHAPES)]
    sigma = rng.uniform(1.0, 3.0)
    noise = rng.normal(size=shape)
    ref = blob(noise, sigma, rng.uniform(0.01, 0.3))
    pred = blob(noise + rng.uniform(0.2, 1.0) * rng.normal(size=shape), sigma, rng.uniform(0.01, 0.3))
    return pred, ref


def monai_values(pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float) -> dict[str, float]:
    """MONAI's dice, iou, hd95, assd and surface dice of two binary masks (NaN/inf where MONAI gives them)."""
    y_pred = torch.as_tensor(pred[None, None], dtype=torch.float32)
    y = torch.as_tensor(ref[None, None], dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks
        out = {
            "dice": compute_dice(y_pred, y, include_background=True),
            "iou": compute_iou(y_pred, y, include_background=True),
            "hd95": compute_hausdorff_distance(
                y_pred, y, include_background=True, percentile=95, spacing=spacing
            ),
            "assd": compute_average_surface_distance(
                y_pred, y, include_background=True, symmetric=True, spacing=spacing
            ),
            "surface_dice": compute_surface_dice(
                y_pred, y, class_thresholds=[tolerance_mm], include_background=True, spacing=spacing
            ),
        }
    return {name: float(value.item()) for name, value in out.items()}


def our_values(pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float) -> dict[str, float]:
    return {
        "dice": metrics.dice(pred, ref),
        "iou": metrics.iou(pred, ref),
        "hd95": metrics.hd95(pred, ref, spacing),
        "assd": metrics.assd(pred, ref, spacing),
        "surface_dice": metrics.surface_dice(pred, ref, spacing, tolerance_mm),
    }


BOTH_EMPTY = {
    "dice": 1.0,
    "iou": 1.0,
    "precision": 1.0,
    "recall": 1.0,
    "hd95": 0.0,
    "assd": 0.0,
    "surface_dice": 1.0,
}
ONE_EMPTY = {
    "dice": 0.0,
    "iou": 0.0,
    "precision": 0.0,
    "recall": 0.0,
    "hd95": math.inf,
    "assd": math.inf,
    "surface_dice": 0.0,
}


def assert_matches_monai(pred, ref, spacing, tolerance_mm) -> int:
    """Our values equal MONAI's where MONAI's are finite and our convention elsewhere; returns # compared."""
    ours = our_values(pred, ref, spacing, tolerance_mm)
    theirs = monai_values(pred, ref, spacing, tolerance_mm)
    convention = BOTH_EMPTY if not pred.any() and not ref.any() else ONE_EMPTY
    compared = 0
    for name, value in theirs.items():
        if math.isfinite(value):
            assert ours[name] == pytest.approx(value, abs=1e-4), name
            compared += 1
        else:
            assert ours[name] == convention[name], name
    return compared


# --------------------------------------------------------------------------------------------------------
# agreement with MONAI


@pytest.mark.parametrize("seed", range(24))
def test_random_blobs_match_monai(seed):
    pred, ref = random_pair(seed)
    assert pred.any() and ref.any()
    spacing = SPACINGS[seed % len(SPACINGS)]
    assert assert_matches_monai(pred, ref, spacing, TOLERANCES[seed % len(TOLERANCES)]) == 5


def test_random_blobs_cover_the_border():
    touching = 0
    for seed in range(24):
        pred, ref = random_pair(seed)
        for mask in (pred, ref):
            faces = [np.take(mask, i, axis=a) for a in range(3) for i in (0, -1)]
            touching += any(face.any() for face in faces)
    assert touching >= 24  # at least half the masks reach the volume border


@pytest.mark.parametrize("spacing", [None, ANISO])
def test_masks_touching_the_border_match_monai(spacing):
    shape = (12, 16, 14)
    full = np.ones(shape, bool)
    slab = np.zeros(shape, bool)
    slab[:4] = True  # a whole face of the volume
    corner = np.zeros(shape, bool)
    corner[-5:, -6:, -3:] = True  # three faces
    line = np.zeros(shape, bool)
    line[:, 0, 0] = True  # an edge of the volume, end to end
    masks = [full, slab, corner, line]
    for a in masks:
        for b in masks:
            if a is not b:
                assert assert_matches_monai(a, b, spacing, 1.5) == 5


@pytest.mark.parametrize("seed", range(6))
def test_zero_padding_changes_nothing(seed):
    """Outside the array counts as background, so the crop at the border equals padding with zeros."""
    pred, ref = random_pair(seed)
    padded = [np.pad(m, 3) for m in (pred, ref)]
    assert our_values(pred, ref, ANISO, 1.5) == pytest.approx(our_values(*padded, ANISO, 1.5), abs=1e-12)


@pytest.mark.parametrize("which", ["pred", "ref", "both"])
def test_empty_masks_follow_the_convention_where_monai_is_undefined(which):
    _, blob_mask = random_pair(3)
    empty = np.zeros_like(blob_mask)
    pred = empty if which in ("pred", "both") else blob_mask
    ref = empty if which in ("ref", "both") else blob_mask
    theirs = monai_values(pred, ref, ANISO, 1.0)
    # MONAI's own reports on empty masks: all NaN when both are empty; with one empty, HD95 NaN (the empty
    # side's distance list gives a NaN percentile, and max(inf, NaN) is NaN), ASSD inf, surface Dice 0,
    # and dice/iou NaN when the reference is empty (ignore_empty=True) but 0 when only the prediction is.
    if which == "both":
        assert all(math.isnan(v) for v in theirs.values())
    else:
        assert math.isnan(theirs["hd95"]) and theirs["assd"] == math.inf and theirs["surface_dice"] == 0
        assert math.isnan(theirs["dice"]) if which == "ref" else theirs["dice"] == 0
    assert_matches_monai(pred, ref, ANISO, 1.0)
    expected = BOTH_EMPTY if which == "both" else ONE_EMPTY
    ours = our_values(pred, ref, ANISO, 1.0) | {
        "precision": metrics.precision(pred, ref),
        "recall": metrics.recall(pred, ref),
    }
    assert ours == expected


# --------------------------------------------------------------------------------------------------------
# hand-computed values


def test_two_boxes_overlap_exact():
    pred = np.zeros((8, 8, 8), bool)
    ref = np.zeros((8, 8, 8), bool)
    pred[0:4, 0:4, 0:4] = True  # 64 voxels
    ref[2:6, 0:4, 0:6] = True  # 96 voxels, 32 shared
    assert metrics.dice(pred, ref) == pytest.approx(2 * 32 / (64 + 96))
    assert metrics.iou(pred, ref) == pytest.approx(32 / (64 + 96 - 32))
    assert metrics.precision(pred, ref) == pytest.approx(32 / 64)
    assert metrics.recall(pred, ref) == pytest.approx(32 / 96)


def test_nonzero_is_foreground_for_any_dtype():
    ref = np.zeros((5, 5, 5), np.int32)
    ref[1:3, 1:3, 1:3] = 7
    pred = np.zeros((5, 5, 5), np.float32)
    pred[1:3, 1:3, 1:2] = 0.25
    assert metrics.dice(pred, ref) == pytest.approx(2 * 4 / (4 + 8))
    assert metrics.dice(torch.from_numpy(pred), torch.from_numpy(ref)) == pytest.approx(2 * 4 / (4 + 8))


def test_single_voxels_anisotropic_distance_exact():
    pred = np.zeros((8, 6, 7), bool)
    ref = np.zeros((8, 6, 7), bool)
    pred[2, 3, 4] = True
    ref[5, 1, 4] = True
    distance = math.sqrt((3 * 3.0) ** 2 + (2 * 0.7) ** 2)
    assert metrics.hd95(pred, ref, ANISO) == pytest.approx(distance)
    assert metrics.assd(pred, ref, ANISO) == pytest.approx(distance)
    assert metrics.surface_dice(pred, ref, ANISO, tolerance_mm=distance + 1e-6) == 1.0
    assert metrics.surface_dice(pred, ref, ANISO, tolerance_mm=distance - 1e-3) == 0.0
    assert metrics.hd95(pred, ref) == pytest.approx(math.sqrt(3**2 + 2**2))  # default 1 mm spacing


def test_hd95_and_assd_pool_like_monai():
    """HD95 = max of the directed 95th percentiles; ASSD = mean of all distances pooled (not of the means)."""
    pred = np.zeros((3, 3, 5), bool)
    ref = np.zeros((3, 3, 5), bool)
    pred[0, 0, 0] = pred[0, 0, 2] = True  # two isolated voxels
    ref[0, 0, 0] = True
    spacing = (1.0, 1.0, 1.5)
    # pred -> ref: [0, 3]; ref -> pred: [0]
    assert metrics.hd95(pred, ref, spacing) == pytest.approx(0.95 * 3.0)
    assert metrics.assd(pred, ref, spacing) == pytest.approx((0 + 3 + 0) / 3)
    assert metrics.surface_dice(pred, ref, spacing, tolerance_mm=1.0) == pytest.approx(2 / 3)
    assert assert_matches_monai(pred, ref, spacing, 1.0) == 5


def test_surface_dice_tolerance_is_inclusive_despite_rounding():
    pred = np.zeros((1, 1, 12), bool)
    ref = np.zeros((1, 1, 12), bool)
    pred[0, 0, 0] = True
    ref[0, 0, 3] = True
    spacing = (1.0, 1.0, 0.1)  # 3 * 0.1 = 0.30000000000000004 in float64
    assert metrics.surface_dice(pred, ref, spacing, tolerance_mm=0.3) == 1.0
    assert assert_matches_monai(pred, ref, spacing, 0.3) == 5


# --------------------------------------------------------------------------------------------------------
# lesion detection


def lesion_scene() -> tuple[np.ndarray, np.ndarray]:
    """Three reference lesions (one made of two corner-touching voxels) and three predicted components."""
    ref = np.zeros((24, 24, 24), bool)
    pred = np.zeros_like(ref)
    ref[2:5, 2:5, 2:5] = True  # L1: 27 voxels
    ref[10, 10, 10] = ref[11, 11, 11] = True  # L2: 2 voxels touching only at a corner
    ref[15:17, 2:4, 2:4] = True  # L3: 8 voxels, missed
    pred[4:6, 4:6, 4:6] = True  # P1: 8 voxels, 1 of them in L1 (covers 1/27 of L1, 1/8 of P1 inside)
    pred[10, 10, 10] = True  # P2: half of L2
    pred[20, 20, 20] = True  # P3: false positive
    return pred, ref


def test_lesion_detection_counts_with_26_connectivity():
    pred, ref = lesion_scene()
    result = metrics.lesion_detection(pred, ref, spacing=(2.0, 1.0, 1.0))
    assert (result.n_ref, result.n_pred, result.n_detected, result.n_true_positive_pred) == (3, 3, 2, 2)
    assert result.lesion_recall == pytest.approx(2 / 3)
    assert result.lesion_precision == pytest.approx(2 / 3)
    assert result.lesion_f1 == pytest.approx(2 / 3)
    assert result.ref_volumes_ml == pytest.approx((0.054, 0.004, 0.016))
    assert result.ref_detected == (True, True, False)
    as_dict = result.as_dict()
    assert as_dict["n_ref"] == 3 and as_dict["ref_volumes_ml"] == pytest.approx([0.054, 0.004, 0.016])
    with pytest.raises(AttributeError):
        result.n_ref = 4  # frozen


@pytest.mark.parametrize(
    "min_overlap, n_detected, n_tp_pred",
    [
        (0.0, 2, 2),
        (1 / 27, 2, 2),
        (0.05, 1, 2),
        (0.125, 1, 2),
        (0.13, 1, 1),
        (0.5, 1, 1),
        (0.51, 0, 1),
        (1.0, 0, 1),
    ],
)
def test_lesion_detection_min_overlap(min_overlap, n_detected, n_tp_pred):
    pred, ref = lesion_scene()
    result = metrics.lesion_detection(pred, ref, min_overlap=min_overlap)
    assert (result.n_detected, result.n_true_positive_pred) == (n_detected, n_tp_pred)
    recall, precision = n_detected / 3, n_tp_pred / 3
    assert result.lesion_recall == pytest.approx(recall)
    assert result.lesion_precision == pytest.approx(precision)
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    assert result.lesion_f1 == pytest.approx(f1)


def test_lesion_detection_empty_conventions():
    pred, ref = lesion_scene()
    empty = np.zeros_like(ref)
    both = metrics.lesion_detection(empty, empty)
    assert (both.n_ref, both.n_pred, both.lesion_recall, both.lesion_precision, both.lesion_f1) == (
        0,
        0,
        1,
        1,
        1,
    )
    assert both.ref_volumes_ml == ()
    missed = metrics.lesion_detection(empty, ref)
    assert (
        missed.n_ref,
        missed.n_detected,
        missed.lesion_recall,
        missed.lesion_precision,
        missed.lesion_f1,
    ) == (
        3,
        0,
        0,
        0,
        0,
    )
    spurious = metrics.lesion_detection(pred, empty)
    assert (spurious.n_pred, spurious.lesion_recall, spurious.lesion_precision, spurious.lesion_f1) == (
        3,
        0,
        0,
        0,
    )


# --------------------------------------------------------------------------------------------------------
# evaluate and summarize


def label_maps() -> tuple[np.ndarray, np.ndarray]:
    """Integer label maps with labels 1, 2, 3 in both and a label 5 only in the prediction."""
    rng = np.random.default_rng(7)
    ref_noise = rng.normal(size=(20, 26, 24))
    pred_noise = ref_noise + 0.6 * rng.normal(size=ref_noise.shape)
    pred, ref = (
        np.digitize(smooth, np.quantile(smooth, [0.55, 0.7, 0.85])).astype(np.int16)
        for smooth in (ndimage.gaussian_filter(noise, 2.0) for noise in (pred_noise, ref_noise))
    )
    pred[0:2, 0:2, 0:2] = 5
    return pred, ref


def test_evaluate_matches_binary_functions():
    pred, ref = label_maps()
    results = metrics.evaluate(pred, ref, spacing=ANISO, tolerance_mm=2.0, lesion_wise=True)
    assert list(results) == [1, 2, 3, 5]
    for label, values in results.items():
        p, r = pred == label, ref == label
        assert values["dice"] == metrics.dice(p, r)
        assert values["iou"] == metrics.iou(p, r)
        assert values["precision"] == metrics.precision(p, r)
        assert values["recall"] == metrics.recall(p, r)
        assert values["hd95"] == metrics.hd95(p, r, ANISO)
        assert values["assd"] == metrics.assd(p, r, ANISO)
        assert values["surface_dice"] == metrics.surface_dice(p, r, ANISO, 2.0)
        assert values["pred_voxels"] == p.sum() and values["ref_voxels"] == r.sum()
        assert values["pred_volume_ml"] == pytest.approx(p.sum() * 3.0 * 0.7 * 1.2 / 1000)
        assert values["ref_volume_ml"] == pytest.approx(r.sum() * 3.0 * 0.7 * 1.2 / 1000)
        lesions = metrics.lesion_detection(p, r, ANISO)
        assert values["lesion_n_ref"] == lesions.n_ref and values["lesion_n_pred"] == lesions.n_pred
        assert values["lesion_recall"] == lesions.lesion_recall
        assert values["lesion_precision"] == lesions.lesion_precision
        assert values["lesion_f1"] == lesions.lesion_f1
    assert results[1]["dice"] > 0.3 and results[1]["hd95"] > 0  # a real, non-trivial case
    assert results[5]["hd95"] == math.inf and results[5]["dice"] == 0.0  # label only in the prediction


def test_evaluate_labels_argument_and_keys():
    pred, ref = label_maps()
    results = metrics.evaluate(pred, ref, labels=[2, 9])
    assert list(results) == [2, 9]
    assert {k: results[9][k] for k in BOTH_EMPTY} == BOTH_EMPTY  # absent from both
    assert not any(key.startswith("lesion_") for key in results[2])


def test_summarize_keeps_inf():
    cases = [
        {1: {"dice": 0.5, "hd95": 2.0}, 2: {"dice": 0.0, "hd95": math.inf}},
        {1: {"dice": 0.7, "hd95": 4.0}},
        {1: {"dice": 0.9, "hd95": math.inf}},
    ]
    summary = metrics.summarize(cases)
    assert summary[1]["dice"] == {
        "mean": pytest.approx(0.7),
        "median": pytest.approx(0.7),
        "n": 3,
        "n_inf": 0,
    }
    assert summary[1]["hd95"] == {"mean": math.inf, "median": 4.0, "n": 3, "n_inf": 1}
    assert summary[2]["hd95"] == {"mean": math.inf, "median": math.inf, "n": 1, "n_inf": 1}


def test_summarize_of_evaluate():
    pred, ref = label_maps()
    summary = metrics.summarize([metrics.evaluate(pred, ref), metrics.evaluate(ref, ref)])
    assert summary[1]["dice"]["n"] == 2 and summary[5]["dice"]["n"] == 1
    assert summary[5]["hd95"]["n_inf"] == 1


# --------------------------------------------------------------------------------------------------------
# errors and speed


@pytest.mark.parametrize(
    "call",
    [
        lambda a, b: metrics.dice(a, b[:-1]),
        lambda a, b: metrics.hd95(a, b[:, :-1]),
        lambda a, b: metrics.evaluate(a.astype(int), b[..., :-1].astype(int)),
        lambda a, b: metrics.hd95(a, b, spacing=(1.0, 1.0)),
        lambda a, b: metrics.assd(a, b, spacing=(1.0, 0.0, 1.0)),
        lambda a, b: metrics.surface_dice(a, b, spacing=(1.0, -2.0, 1.0)),
        lambda a, b: metrics.lesion_detection(a, b, spacing=(1.0, 1.0, 1.0, 1.0)),
        lambda a, b: metrics.evaluate(a.astype(int), b.astype(int), spacing=(1.0, math.nan, 1.0)),
        lambda a, b: metrics.surface_dice(a, b, tolerance_mm=-1.0),
        lambda a, b: metrics.lesion_detection(a, b, min_overlap=1.5),
    ],
)
def test_bad_input_raises_input_error(call):
    a, b = random_pair(0)
    with pytest.raises(InputError) as info:
        call(a, b)
    assert "\n" not in str(info.value)


def test_hd95_on_a_large_volume_matches_monai():
    # (its speed is measured in benchmarks/metrics_speed.py, not asserted here)
    pred = np.zeros((128, 128, 128), bool)
    ref = np.zeros_like(pred)
    pred[40:80, 40:80, 40:80] = True
    ref[43:83, 38:78, 41:81] = True
    value = metrics.hd95(pred, ref, ANISO)
    assert value == pytest.approx(monai_values(pred, ref, ANISO, 1.0)["hd95"], abs=1e-4)
