"""Two-channel territory losses: hand-computed values, perfect predictions, references, gradients, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from irisseg.losses import (
    TerritoryLoss,
    adaptive_spatial_weight,
    complementary_loss,
    multiscale_spatial_loss,
    spatial_consistency_loss,
    territory_base_loss,
)

# A 1 x 2 x 2 x 2 example (B = 1, two channels, 2 x 2 pixels), voxels a b / c d:
#   t1 = 1 1 / 0 0     t2 = 0 1 / 1 0     (b: both territories; d: neither)
#   p1 = .9 .5 / .2 .1  p2 = .3 .6 / .8 .4
T1 = [[1.0, 1.0], [0.0, 0.0]]
T2 = [[0.0, 1.0], [1.0, 0.0]]
P1 = [[0.9, 0.5], [0.2, 0.1]]
P2 = [[0.3, 0.6], [0.8, 0.4]]


def _tiny() -> tuple[torch.Tensor, torch.Tensor]:
    prob = torch.tensor([[P1, P2]])
    target = torch.tensor([[T1, T2]])
    return prob, target


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def _random(seed: int, shape=(2, 2, 5, 6, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g) * 2
    target = (torch.rand(*shape, generator=g) > 0.5).float()
    return logits, target


def _territories(shape=(2, 8, 8, 8)) -> torch.Tensor:
    """Binary (B, 2, D, H, W) targets: two halves that overlap in a band, background at the border."""
    b, d, h, w = shape
    t = torch.zeros(b, 2, d, h, w)
    t[:, 0, :, 2:, : w // 2 + 1] = 1
    t[:, 1, :, 2:, w // 2 - 1:] = 1
    return t


# ---- hand-computed values ----------------------------------------------------------------------------------


def test_spatial_consistency_hand_value():
    prob, target = _tiny()
    # overlap where t1 + t2 <= 1 (a, c, d): .9*.3 + .2*.8 + .1*.4 = .47, over 4 voxels
    overlap = (0.27 + 0.16 + 0.04) / 4
    # union coverage: clamp(p1 + p2) = 1, 1, 1, .5 against 1, 1, 1, 0
    coverage = 0.5**2 / 4
    # a: p2 where only t1 (.3); c: p1 where only t2 (.2)
    exclusivity = (0.3 + 0.2) / 4
    expected = overlap + coverage + exclusivity  # 0.305
    assert expected == pytest.approx(0.305)
    got = spatial_consistency_loss(prob, target)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_complementary_hand_value():
    prob, target = _tiny()
    exclusivity = 0.1 * 0.4 / 4  # only d has neither target
    frac_pred = (0.9 + 0.6 + 0.8 + 0.4) / 4  # mean of max(p1, p2)
    frac_true = 3 / 4
    expected = exclusivity + (frac_pred - frac_true) ** 2  # 0.01 + 0.075^2
    assert expected == pytest.approx(0.015625)
    assert float(complementary_loss(prob, target)) == pytest.approx(expected, abs=1e-6)


def test_complementary_coverage_is_per_batch_item():
    # item 0 predicts 1/4 too much union, item 1 1/4 too little: per-item squares do not cancel
    target = torch.zeros(2, 2, 2, 2)
    target[:, 0, 0, 0] = 1
    target[:, 1, 0, 1] = 1  # union 2/4 in both items
    prob = target.clone()
    prob[0, 0, 1, 0] = 1.0  # union 3/4, no p1*p2 where neither
    prob[1, 1, 0, 1] = 0.0  # union 1/4
    assert float(complementary_loss(prob, target)) == pytest.approx(0.25**2, abs=1e-7)


def test_multiscale_hand_value_and_minimum_size():
    prob, target = _tiny()
    full = 0.305
    # scale 1/2 of 2 x 2 is 1 x 1: bilinear (align_corners=False) averages all four probabilities,
    # nearest picks the target at a (t1 = 1, t2 = 0)
    q1, q2 = (0.9 + 0.5 + 0.2 + 0.1) / 4, (0.3 + 0.6 + 0.8 + 0.4) / 4
    coarse = q1 * q2 + (q1 + q2 - 1.0) ** 2 + q2  # overlap + coverage + exclusivity
    assert float(multiscale_spatial_loss(prob, target, scales=(1.0, 0.5))) == pytest.approx(
        (full + coarse) / 2, abs=1e-6)
    # default scales: 1/4 of 2 is 0.5, kept at size 1 -> the same coarse value again
    assert float(multiscale_spatial_loss(prob, target)) == pytest.approx((full + 2 * coarse) / 3, abs=1e-6)
    assert float(multiscale_spatial_loss(prob, target, scales=(1.0,))) == pytest.approx(full, abs=1e-6)


def test_base_loss_hand_value():
    prob, target = _tiny()
    logits = _logit(prob.double()).float()
    bce_1 = -(math.log(0.9) + math.log(0.5) + math.log(1 - 0.2) + math.log(1 - 0.1)) / 4
    bce_2 = -(math.log(1 - 0.3) + math.log(0.6) + math.log(0.8) + math.log(1 - 0.4)) / 4
    s = 1e-5
    dice_1 = 1 - (2 * (0.9 + 0.5) + s) / ((0.9 + 0.5 + 0.2 + 0.1) + 2 + s)
    dice_2 = 1 - (2 * (0.6 + 0.8) + s) / ((0.3 + 0.6 + 0.8 + 0.4) + 2 + s)
    expected = 0.5 * bce_1 + 0.5 * bce_2 + (dice_1 + dice_2) / 2
    assert float(territory_base_loss(logits, target)) == pytest.approx(expected, abs=1e-5)


def test_territory_loss_combines_terms_by_hand():
    prob, target = _tiny()
    logits = _logit(prob.double()).float()
    base = float(territory_base_loss(logits, target))
    spatial, comp = 0.305, 0.015625
    assert float(TerritoryLoss()(logits, target)) == pytest.approx(base, abs=1e-6)
    assert float(TerritoryLoss(spatial=True)(logits, target)) == pytest.approx(base + 0.1 * spatial, abs=1e-5)
    assert float(TerritoryLoss(complementary=True, weight=0.5)(logits, target)) == pytest.approx(
        base + 0.5 * comp, abs=1e-5)
    both = TerritoryLoss(spatial=True, complementary=True)
    assert float(both(logits, target)) == pytest.approx(base + 0.1 * spatial + 0.1 * comp, abs=1e-5)
    # adaptive: the spatial weight follows progress, the complementary weight stays ``weight``
    adaptive = TerritoryLoss(adaptive=True, complementary=True)
    assert adaptive.spatial
    for progress, w in [(0.0, 0.05), (0.5, 0.10), (1.0, 0.15)]:
        assert float(adaptive(logits, target, progress=progress)) == pytest.approx(
            base + w * spatial + 0.1 * comp, abs=1e-5)
    # multiscale uses the multi-scale spatial term
    ms = TerritoryLoss(multiscale=True)
    assert ms.spatial
    expected_ms = float(multiscale_spatial_loss(prob, target))
    assert float(ms(logits, target)) == pytest.approx(base + 0.1 * expected_ms, abs=1e-5)


def test_components_are_logged_terms():
    logits, target = _random(3)
    loss = TerritoryLoss(spatial=True, complementary=True, weight=0.2)
    parts = loss.components(logits, target)
    assert set(parts) == {"base", "spatial", "complementary", "total"}
    prob = torch.sigmoid(logits)
    assert float(parts["base"]) == pytest.approx(float(territory_base_loss(logits, target)), abs=1e-6)
    assert float(parts["spatial"]) == pytest.approx(float(spatial_consistency_loss(prob, target)), abs=1e-6)
    assert float(parts["complementary"]) == pytest.approx(float(complementary_loss(prob, target)), abs=1e-6)
    total = parts["base"] + 0.2 * parts["spatial"] + 0.2 * parts["complementary"]
    assert float(parts["total"]) == pytest.approx(float(total), abs=1e-6)
    assert float(loss(logits, target)) == pytest.approx(float(parts["total"]), abs=1e-7)
    off = TerritoryLoss().components(logits, target)
    assert float(off["spatial"]) == 0.0 and float(off["complementary"]) == 0.0


def test_adaptive_weight_schedule():
    assert adaptive_spatial_weight(0.0) == pytest.approx(0.05)
    assert adaptive_spatial_weight(0.5) == pytest.approx(0.10)
    assert adaptive_spatial_weight(1.0) == pytest.approx(0.15)
    assert adaptive_spatial_weight(0.25) == pytest.approx(0.075)
    assert adaptive_spatial_weight(-1.0) == pytest.approx(0.05)  # clamped
    assert adaptive_spatial_weight(3.0) == pytest.approx(0.15)
    assert adaptive_spatial_weight(0.5, start=0.0, end=1.0) == pytest.approx(0.5)


# ---- perfect predictions -----------------------------------------------------------------------------------


def test_perfect_binary_prediction_gives_exact_zero():
    target = _territories()
    prob = target.clone()  # binary probabilities equal to the targets, overlap band included
    assert float(spatial_consistency_loss(prob, target)) == 0.0
    assert float(complementary_loss(prob, target)) == 0.0
    assert float(multiscale_spatial_loss(prob, target, scales=(1.0,))) == 0.0


def test_multiscale_perfect_prediction():
    # targets constant on aligned 4 x 4 blocks: bilinear and nearest resizing agree at 1/2 and 1/4 -> exactly 0
    blocks = torch.zeros(1, 2, 8, 8)
    blocks[:, 0, :, :4] = 1
    blocks[:, 1, 4:, :] = 1
    assert float(multiscale_spatial_loss(blocks.clone(), blocks)) == 0.0
    # in general the coarse scales blur borders (an overlap band 2 voxels wide here): not 0, but far below
    # an uninformative prediction, and smaller on a larger grid where borders are a smaller fraction
    target = _territories()
    value = float(multiscale_spatial_loss(target.clone(), target))
    assert 0.0 < value < 0.25 * float(multiscale_spatial_loss(torch.full_like(target, 0.5), target))
    big = _territories((1, 32, 32, 32))
    assert 0.0 < float(multiscale_spatial_loss(big.clone(), big)) < value


def test_confident_perfect_logits_give_near_zero_total():
    target = _territories()
    logits = (2 * target - 1) * 30.0
    loss = TerritoryLoss(spatial=True, complementary=True)
    parts = loss.components(logits, target)
    assert float(parts["base"]) < 1e-5
    assert float(parts["spatial"]) < 1e-6
    assert float(parts["complementary"]) < 1e-6
    assert float(parts["total"]) < 1e-5


# ---- references --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 2, 5, 6, 7), (3, 2, 9, 8)])
def test_base_loss_matches_torch_bce_and_monai_dice(shape):
    from monai.losses import DiceLoss

    logits, target = _random(1, shape)
    bce = torch.nn.BCEWithLogitsLoss()
    ref = (0.5 * bce(logits[:, 0], target[:, 0]) + 0.5 * bce(logits[:, 1], target[:, 1])
           + DiceLoss(sigmoid=True)(logits, target))
    assert float(territory_base_loss(logits, target)) == pytest.approx(float(ref), abs=1e-5)


def test_multiscale_matches_manual_resizing():
    logits, target = _random(2, (1, 2, 8, 6, 4))
    prob = torch.sigmoid(logits)
    expected = float(spatial_consistency_loss(prob, target))
    for size in [(4, 3, 2), (2, 1, 1)]:
        p = F.interpolate(prob, size=size, mode="trilinear", align_corners=False)
        t = F.interpolate(target, size=size, mode="nearest")
        expected += float(spatial_consistency_loss(p, t))
    assert float(multiscale_spatial_loss(prob, target)) == pytest.approx(expected / 3, abs=1e-6)


# ---- gradients, dimensions, dtypes, validation ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 2, 4, 6, 5), (2, 2, 8, 6)])
def test_differentiable_in_2d_and_3d(shape):
    logits, target = _random(4, shape)
    logits.requires_grad_(True)
    for loss in [TerritoryLoss(spatial=True, complementary=True), TerritoryLoss(multiscale=True),
                 TerritoryLoss(adaptive=True)]:
        logits.grad = None
        value = loss(logits, target, progress=0.3)
        assert value.ndim == 0 and torch.isfinite(value)
        value.backward()
        assert torch.isfinite(logits.grad).all()
        assert logits.grad.abs().sum() > 0
    prob = torch.sigmoid(logits.detach()).requires_grad_(True)
    for fn in [spatial_consistency_loss, complementary_loss, multiscale_spatial_loss]:
        prob.grad = None
        fn(prob, target).backward()
        assert torch.isfinite(prob.grad).all() and prob.grad.abs().sum() > 0


def test_bf16_logits_give_float32_loss():
    logits, target = _random(5, (1, 2, 4, 4, 4))
    loss = TerritoryLoss(spatial=True, complementary=True, multiscale=True)
    ref = loss(logits.bfloat16().float(), target)
    out = loss(logits.bfloat16(), target)
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(float(ref), abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss(logits.bfloat16(), target.bfloat16())
    assert inside.dtype == torch.float32
    assert float(inside) == pytest.approx(float(ref), abs=1e-6)
    for fn in [spatial_consistency_loss, complementary_loss, multiscale_spatial_loss]:
        assert fn(torch.sigmoid(logits).bfloat16(), target).dtype == torch.float32
    assert territory_base_loss(logits.bfloat16(), target).dtype == torch.float32


def test_shape_validation():
    logits, target = _random(6, (1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        territory_base_loss(logits, target[..., :3])
    three = torch.zeros(1, 3, 4, 4)
    for fn in [territory_base_loss, spatial_consistency_loss, complementary_loss, multiscale_spatial_loss]:
        with pytest.raises(ValueError, match="B, 2"):
            fn(three, three)
    flat = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="B, 2"):
        TerritoryLoss()(flat, flat)
    with pytest.raises(ValueError, match="positive"):
        multiscale_spatial_loss(torch.sigmoid(logits), target, scales=(1.0, 0.0))
    with pytest.raises(ValueError, match="weight"):
        TerritoryLoss(weight=-1.0)
