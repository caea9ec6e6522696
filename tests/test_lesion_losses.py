"""Lesion losses: Tversky and focal-Dice against MONAI, hand values, perfect predictions, gradients, registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from irisseg.errors import InputError
from irisseg.losses import (
    LOSSES,
    batch_dice,
    blob_loss,
    deep_supervision_loss,
    dice_bce_loss,
    focal_dice_loss,
    get_loss,
    soft_dice_loss,
    tversky_loss,
)


def _pair(seed: int, shape=(2, 3, 6, 7, 5), empty: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g) * 3
    target = (torch.rand(*shape, generator=g) > 0.7).float()
    if empty:
        target[-1, -1] = 0  # an empty class too
    return logits, target


@pytest.mark.parametrize("alpha,beta", [(0.3, 0.7), (0.5, 0.5), (0.8, 0.2)])
def test_tversky_matches_monai(alpha, beta):
    from monai.losses import TverskyLoss

    logits, target = _pair(0)
    ref = TverskyLoss(sigmoid=True, alpha=alpha, beta=beta, reduction="none")(logits, target).reshape(2, 3)
    ours = tversky_loss(logits, target, alpha=alpha, beta=beta, reduction="none")
    assert ours.shape == (2, 3)
    assert torch.allclose(ours, ref, atol=1e-5)
    ref_mean = TverskyLoss(sigmoid=True, alpha=alpha, beta=beta)(logits, target)
    assert float(tversky_loss(logits, target, alpha=alpha, beta=beta)) == pytest.approx(float(ref_mean), abs=1e-5)
    ref_sum = TverskyLoss(sigmoid=True, alpha=alpha, beta=beta, reduction="sum")(logits, target)
    assert float(tversky_loss(logits, target, alpha=alpha, beta=beta, reduction="sum")) == pytest.approx(float(ref_sum), abs=1e-5)


def test_tversky_with_equal_weights_is_soft_dice():
    logits, target = _pair(1)
    dice = soft_dice_loss(logits, target, reduction="none")
    # the same formula when the smoothing is halved ...
    half = tversky_loss(logits, target, alpha=0.5, beta=0.5, smooth_nr=0.5e-5, smooth_dr=0.5e-5, reduction="none")
    assert torch.allclose(half, dice, atol=1e-6)
    # ... and within the smoothing's effect with the same defaults
    assert torch.allclose(tversky_loss(logits, target, alpha=0.5, beta=0.5, reduction="none"), dice, atol=1e-5)


def test_tversky_weighs_missed_foreground_more_than_false_alarms():
    target = torch.zeros(1, 1, 4, 4, 4)
    target[..., :2, :, :] = 1  # 32 foreground voxels
    miss = (target * 2 - 1) * 20
    miss[..., 0, 0, :] = -20  # 4 missed voxels
    alarm = (target * 2 - 1) * 20
    alarm[..., 3, 0, :] = 20  # 4 false alarms
    # Tversky (0.3, 0.7): 1 - 28 / 30.8 against 1 - 32 / 33.2; Dice: 1 - 56 / 60 against 1 - 64 / 68
    assert float(tversky_loss(miss, target)) > 2 * float(tversky_loss(alarm, target))
    assert float(soft_dice_loss(miss, target)) < 1.2 * float(soft_dice_loss(alarm, target))


def test_focal_dice_matches_monai():
    from monai.losses import DiceFocalLoss

    logits, target = _pair(2)
    for alpha in (None, 0.25):
        ref = DiceFocalLoss(sigmoid=True, gamma=2.0, alpha=alpha, smooth_nr=1e-5, smooth_dr=1e-5,
                            lambda_dice=0.7, lambda_focal=1.3)(logits, target)
        ours = focal_dice_loss(logits, target, gamma=2.0, alpha=alpha, dice_weight=0.7, focal_weight=1.3)
        assert float(ours) == pytest.approx(float(ref), abs=1e-5)


def test_focal_dice_by_hand():
    # p = sigmoid(logits) = (0.5, 0.75), g = (1, 0)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    target = torch.tensor([[[1.0, 0.0]]])
    s = 1e-5
    dice = 1 - (2 * 0.5 + s) / (1.25 + 1.0 + s)
    # (1 - p_t)^2 * bce: 0.5^2 * ln 2 for the foreground voxel, 0.75^2 * ln 4 for the background one
    focal = (0.25 * math.log(2.0) + 0.5625 * math.log(4.0)) / 2
    assert float(focal_dice_loss(logits, target, gamma=2.0)) == pytest.approx(dice + focal, abs=1e-6)
    # alpha weighs the foreground voxel by alpha and the background one by 1 - alpha
    focal_a = (0.25 * 0.25 * math.log(2.0) + 0.75 * 0.5625 * math.log(4.0)) / 2
    assert float(focal_dice_loss(logits, target, gamma=2.0, alpha=0.25)) == pytest.approx(dice + focal_a, abs=1e-6)
    # Tversky (alpha 0.3, beta 0.7): TP 0.5, FP 0.75, FN 0.5
    tv = 1 - (0.5 + s) / (0.5 + 0.3 * 0.75 + 0.7 * 0.5 + s)
    assert float(tversky_loss(logits, target)) == pytest.approx(tv, abs=1e-6)


def test_focal_dice_with_gamma_zero_is_dice_bce():
    logits, target = _pair(3)
    assert torch.allclose(focal_dice_loss(logits, target, gamma=0.0, reduction="none"),
                          dice_bce_loss(logits, target, reduction="none"), atol=1e-6)


@pytest.mark.parametrize("name", ["dice_bce", "tversky", "focal_dice"])
def test_perfect_prediction_is_near_zero_and_gradients_are_finite(name):
    loss_fn = get_loss(name)
    _, target = _pair(4)
    perfect = (target * 2 - 1) * 50.0
    assert float(loss_fn(perfect, target)) < 1e-5
    assert float(loss_fn(-perfect, target)) > 0.5
    for scale in (1.0, 100.0):  # ordinary and saturated logits
        logits, _ = _pair(5)
        logits = (logits * scale).requires_grad_(True)
        loss = loss_fn(logits, target)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
        assert logits.grad.abs().sum() > 0
    assert loss_fn(perfect.bfloat16(), target).dtype == torch.float32


def test_get_loss_names_and_options():
    assert set(LOSSES) == {"dice_bce", "tversky", "focal_dice"}
    logits, target = _pair(6)
    assert float(get_loss("tversky", alpha=0.2, beta=0.8)(logits, target)) == float(
        tversky_loss(logits, target, alpha=0.2, beta=0.8))
    assert get_loss("focal-dice", gamma=1.0, reduction="none")(logits, target).shape == (2, 3)
    assert float(get_loss("dice_bce")(logits, target)) == float(dice_bce_loss(logits, target))
    with pytest.raises(InputError, match="unknown loss 'dice'"):
        get_loss("dice")
    with pytest.raises(InputError, match="takes no option"):
        get_loss("dice_bce", alpha=0.3)


def test_deep_supervision_loss_pools_the_target():
    g = torch.Generator().manual_seed(7)
    target = (torch.rand(2, 1, 8, 8, 8, generator=g) > 0.8).float()
    outs = [torch.randn(2, 1, 8, 8, 8, generator=g), torch.randn(2, 1, 4, 4, 4, generator=g),
            torch.randn(2, 1, 2, 2, 2, generator=g)]
    loss_fn = get_loss("tversky")
    w = [4 / 7, 2 / 7, 1 / 7]
    expected = (w[0] * loss_fn(outs[0], target) + w[1] * loss_fn(outs[1], F.avg_pool3d(target, 2))
                + w[2] * loss_fn(outs[2], F.avg_pool3d(target, 4)))
    assert float(deep_supervision_loss(loss_fn, outs, target)) == pytest.approx(float(expected), abs=1e-6)
    assert float(deep_supervision_loss(loss_fn, outs[0], target)) == float(loss_fn(outs[0], target))
    mx = deep_supervision_loss(loss_fn, outs, target, weights=[0, 1, 0], mode="max")
    assert float(mx) == pytest.approx(float(loss_fn(outs[1], F.max_pool3d(target, 2))), abs=1e-6)
    with pytest.raises(ValueError, match="weights"):
        deep_supervision_loss(loss_fn, outs, target, weights=[1.0])


def test_batch_dice_matches_monai_batch_mode():
    from monai.losses import DiceLoss, TverskyLoss

    logits, target = _pair(3)
    ref = DiceLoss(sigmoid=True, batch=True)(logits, target)
    assert float(batch_dice(soft_dice_loss)(logits, target)) == pytest.approx(float(ref), abs=1e-5)
    ref_t = TverskyLoss(sigmoid=True, alpha=0.3, beta=0.7, batch=True)(logits, target)
    assert float(batch_dice(get_loss("tversky"))(logits, target)) == pytest.approx(float(ref_t), abs=1e-5)
    # Dice + BCE: the BCE (a voxel mean) is unchanged by folding the batch in.
    bce = F.binary_cross_entropy_with_logits(logits, target)
    folded = batch_dice(dice_bce_loss)(logits, target)
    assert float(folded) == pytest.approx(float(ref) + float(bce), abs=1e-5)
    # A lesion-free patch beside a lesion patch: its false positives now cost something.
    logits = torch.zeros(2, 1, 4, 4, 4)
    target = torch.zeros(2, 1, 4, 4, 4)
    target[0, 0, :2] = 1
    logits[1] = 5.0  # confident false positives on the empty patch
    per_patch = soft_dice_loss(logits, target, reduction="none")
    assert per_patch[1, 0] > 0.99  # alone, the empty patch's loss is ~1 with or without the mistakes
    fixed = logits.clone()
    fixed[1] = -5.0  # the empty patch predicted empty
    assert float(batch_dice(soft_dice_loss)(logits, target)) > float(batch_dice(soft_dice_loss)(fixed, target)) + 0.1


@pytest.mark.parametrize("name", ["dice_bce", "tversky", "focal_dice"])
def test_blob_loss_scores_every_lesion_on_its_own(name):
    """Two lesions of 2 and 216 voxels in one patch: a prediction of the large one alone has a small global
    Dice loss, but the blob term is the mean of the two per-lesion losses, each computed with the other
    lesion left out, so the missed small lesion costs half of it."""
    loss_fn = get_loss(name)
    instances = torch.zeros(2, 1, 12, 12, 12, dtype=torch.int16)
    instances[0, 0, 1:7, 1:7, 1:7] = 1  # 216 voxels
    instances[0, 0, 10, 10, 9:11] = 2  # 2 voxels
    target = (instances > 0).float()  # the second item has no lesion
    logits = torch.where(instances == 1, 8.0, -8.0)  # finds the large lesion, misses the small one
    blob = blob_loss(loss_fn, logits, instances)
    alone = []
    for k, other in ((1, 2), (2, 1)):  # each lesion scored on its own, the other one removed from the case
        alone.append(loss_fn(logits[:1].masked_fill(instances[:1] == other, -1e4), (instances[:1] == k).float()))
    assert float(blob) == pytest.approx(float(sum(alone) / 2), rel=1e-5)
    assert float(alone[0]) < 0.01 < 0.5 < float(alone[1])
    assert float(blob) > 10 * float(loss_fn(logits[:1], target[:1]))  # the global loss barely sees the miss
    # one lesion: the blob term is the loss of the items that have it
    single = torch.where(instances == 2, 0, instances)
    assert float(blob_loss(loss_fn, logits, single)) == pytest.approx(float(loss_fn(logits[:1], target[:1] * (single[:1] > 0))), rel=1e-5)
    # no lesion in the batch: zero, with a gradient path
    x = logits.clone().requires_grad_(True)
    empty = blob_loss(loss_fn, x, torch.zeros_like(instances))
    empty.backward()
    assert float(empty.detach()) == 0.0 and x.grad is not None and float(x.grad.abs().sum()) == 0.0
    # the gradient raises the missed lesion's logits
    x = logits.clone().requires_grad_(True)
    blob_loss(loss_fn, x, instances).backward()
    assert torch.isfinite(x.grad).all() and float(x.grad[0, 0, 10, 10, 9]) < 0  # raise the missed voxels
    with pytest.raises(ValueError, match="one shape"):
        blob_loss(loss_fn, logits, instances[:, :, :-1])
